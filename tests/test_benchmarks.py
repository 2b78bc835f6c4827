"""The benchmark scripts keep working (tiny sizes; speed itself is never asserted here)."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_smoke

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str) -> dict:
    return run_smoke(ROOT / "benchmarks" / script, *args, timeout=600)


@pytest.mark.parametrize("script,variants", [("bench_bert_mlm.py", ["lmforge", "hf", "hf-selected"]),
                                             ("bench_gpt_clm.py", ["lmforge", "hf"])])
def test_training_benchmark_reports_every_variant_in_both_precisions(script, variants):
    report = run_benchmark(script)
    assert [t["precision"] for t in report["tables"]] == ["fp32", "bf16"]
    for table in report["tables"]:
        assert [r["variant"] for r in table["results"]] == variants
        assert table["matmul_peak_gflops"] > 0
        for r in table["results"]:
            assert r["tokens_per_s"] > 0 and r["flops_per_step"] > 0 and r["mfu"] > 0 and r["peak_rss_mb"] >= 0
        assert table["results"][0]["lmforge_speedup"] == 1.0
        flops = {r["variant"]: r["flops_per_step"] for r in table["results"]}
        if "hf-selected" in flops:  # a head on the selected positions only runs fewer FLOPs than a full one
            assert flops["lmforge"] < flops["hf"] and flops["hf-selected"] < flops["hf"]


def test_data_wait_benchmark_reads_the_share_the_loop_logs():
    report = run_benchmark("bench_data_wait.py")
    assert [r["variant"] for r in report["results"]] == ["mlm", "clm"]
    for r in report["results"]:
        assert 0 < r["data_wait_mean"] < 1 and r["tokens_per_s"] > 0


def test_a_bad_benchmark_option_is_a_one_line_usage_error():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_bert_mlm.py"), "--variants", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown variant 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_flop_count_of_the_fused_loss_equals_the_plain_paths():
    # MFU must count what runs: the fused loss's chunked matmuls (incl. in-place addmm_) add up to
    # the plain projection's forward and backward FLOPs.
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common
    from lmforge.ops.linear_cross_entropy import linear_cross_entropy, reference_linear_cross_entropy

    h = torch.randn(600, 32, requires_grad=True)
    w = torch.randn(1000, 32, requires_grad=True)
    b = torch.randn(1000, requires_grad=True)
    t = torch.randint(0, 1000, (600,))
    fused = common.count_flops(lambda: linear_cross_entropy(h, w, b, t, chunk_rows=256)[0].backward())
    plain = common.count_flops(lambda: reference_linear_cross_entropy(h, w, b, t)[0].backward())
    assert fused == plain == 3 * 2 * 600 * 32 * 1000


def test_zero_memory_benchmark_reports_each_ranks_peak():
    report = run_benchmark("bench_zero_memory.py")
    assert [r["strategy"] for r in report["results"]] == ["ddp", "zero-3"]
    for r in report["results"]:
        assert len(r["per_rank_peak_mb"]) == report["ranks"] == 2
        assert all(peak >= start > 0 for peak, start in zip(r["per_rank_peak_mb"], r["start_mb"]))
        assert r["checkpoint_mb"] > 0
