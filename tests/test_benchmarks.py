"""The benchmark scripts keep working (tiny sizes; speed itself is never asserted here)."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_smoke

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str) -> dict:
    return run_smoke(ROOT / "benchmarks" / script, *args, timeout=600)


def encoder_flops_per_step(cfg: dict, ffn: int) -> int:
    """Matmul FLOPs that every variant's training step must run, forward and backward (3 x the
    forward's 2 per multiply-add): each layer's Q, K, V, output and FFN projections on every
    token, and the attention scores and weighted sums of every row."""
    tokens, h = cfg["batch"] * cfg["seq"], cfg["hidden"]
    per_layer = 6 * tokens * (4 * h * h + 2 * h * ffn) + 3 * 2 * 2 * cfg["batch"] * cfg["seq"] ** 2 * h
    return cfg["layers"] * per_layer


@pytest.mark.parametrize("script,variants,full_head", [
    ("bench_bert_mlm.py", ["lmforge", "hf", "hf-selected"], {"hf"}),  # the others: the head on masked rows only
    ("bench_gpt_clm.py", ["lmforge", "hf"], {"lmforge", "hf"})])
def test_training_benchmark_rows_are_consistent_with_their_measurements(script, variants, full_head):
    report = run_benchmark(script)
    cfg = report["config"]
    assert [t["precision"] for t in report["tables"]] == ["fp32", "bf16"]
    assert report["results"] == [r for t in report["tables"] for r in t["results"]]
    ffn = cfg.get("ffn", 4 * cfg["hidden"])  # GPT: 4 x hidden
    encoder = encoder_flops_per_step(cfg, ffn)
    head = 6 * cfg["batch"] * cfg["seq"] * cfg["hidden"] * cfg["vocab"]  # the vocabulary projection on every token
    transform = 6 * cfg["batch"] * cfg["seq"] * cfg["hidden"] ** 2  # BERT's head transform on every token
    for table in report["tables"]:
        assert [r["variant"] for r in table["results"]] == variants
        assert all(r["precision"] == table["precision"] for r in table["results"])
        peak = table["matmul_peak_gflops"] * 1e9
        ours = table["results"][0]
        for r in table["results"]:
            assert r["step_s"] > 0 and r["peak_rss_mb"] >= 0 and r["final_loss"] > 0
            # throughput, MFU and speedup are the quotients of what was measured and counted
            assert r["tokens_per_s"] == pytest.approx(cfg["batch"] * cfg["seq"] / r["step_s"], rel=1e-9)
            assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["step_s"] / peak, rel=1e-9)
            assert r["lmforge_speedup"] == pytest.approx(ours["tokens_per_s"] / r["tokens_per_s"], rel=1e-9)
            if r["peak_rss_mb"] > 0:
                assert r["lmforge_rss_fraction"] == pytest.approx(ours["peak_rss_mb"] / r["peak_rss_mb"], rel=1e-9)
            # the counted FLOPs hold at least the work every variant runs, at most a full model's
            least = encoder + (head if r["variant"] in full_head else 0)
            assert least <= r["flops_per_step"] <= 1.05 * (encoder + head + transform), r
        assert ours["variant"] == "lmforge" and ours["lmforge_speedup"] == 1.0
    # FLOPs are counted on shapes, not timed: each variant counts the same in fp32 and in bf16
    fp32, bf16 = ({r["variant"]: r["flops_per_step"] for r in t["results"]} for t in report["tables"])
    assert fp32 == bf16
    if "hf-selected" in fp32:  # a head on the selected positions only runs fewer FLOPs than a full one
        assert fp32["lmforge"] < fp32["hf"] and fp32["hf-selected"] < fp32["hf"]


def test_data_wait_benchmark_reads_the_share_the_loop_logs():
    report = run_benchmark("bench_data_wait.py")
    assert [r["variant"] for r in report["results"]] == ["mlm", "clm"]
    for r in report["results"]:
        # the mean and max of the same logged shares: a share of the step time, so below 1
        assert 0 < r["data_wait_mean"] <= r["data_wait_max"] < 1 and r["tokens_per_s"] > 0
        assert r["steps"] == report["config"]["steps"] and r["log_records"] >= 1
        assert r["config"] == "configs/" + ("bert-tiny.yaml" if r["variant"] == "mlm" else "gpt-tiny.yaml")


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
        # the ratio of this strategy's largest per-rank peak to the first strategy's
        base = max(report["results"][0]["per_rank_peak_mb"])
        assert r["vs_first"] == pytest.approx(max(r["per_rank_peak_mb"]) / base, abs=1e-3)
    assert report["results"][0]["vs_first"] == 1.0


def test_layer_stats_benchmark_compares_the_same_runs_with_and_without_statistics():
    report = run_benchmark("bench_layer_stats.py")
    off, on = report["results"]
    assert (off["variant"], on["variant"]) == ("layer_stats=false", "layer_stats=true")
    assert off["records"] == on["records"] >= 1 and off["tokens_per_s"] > 0
    assert on["cost"] == 1 - on["tokens_per_s"] / off["tokens_per_s"]  # the ratio of the two medians shown


def test_prepare_benchmark_times_prepare_against_its_tokenizer_on_the_same_documents():
    report = run_benchmark("bench_prepare.py")
    raw, prep = report["results"]
    assert (raw["variant"], prep["variant"]) == ("encode_batch", "lmforge prepare")
    assert report["config"]["documents"] > 0 and report["config"]["tokens"] > 0
    seconds = report["seconds"]
    assert prep["tokens_per_s"] == report["config"]["tokens"] / min(seconds["prepare"])  # one round: its time
    assert prep["ratio"] == prep["tokens_per_s"] / raw["tokens_per_s"] and prep["peak_added_mb"] >= 0


def test_activation_checkpointing_benchmark_reports_the_ratios_of_its_own_rows():
    report = run_benchmark("bench_activation_checkpointing.py")
    for table in report["tables"]:
        plain, ckpt = table["results"]
        assert (plain["variant"], ckpt["variant"]) == ("plain", "checkpointed")
        assert ckpt["time_vs_plain"] == ckpt["step_s"] / plain["step_s"]
        # the recomputation is counted: the checkpointed step runs more matmul FLOPs than the plain one
        assert ckpt["flops_per_step"] > plain["flops_per_step"]


def test_plan_memory_benchmark_compares_the_plan_with_a_measured_run():
    report = run_benchmark("bench_plan_memory.py")
    assert [r["variant"] for r in report["results"]] == ["bert-tiny", "gpt-tiny", "llama-tiny"]
    for r in report["results"]:
        assert r["measured_mb"] > 0 and r["planned_mb"] == pytest.approx(r["static_mb"] + r["activations_mb"])
        assert r["ratio"] == r["planned_mb"] / r["measured_mb"]


@pytest.mark.slow  # ~45 s: three torchrun launches
def test_the_gpu_check_runs_every_check_on_the_cpu_with_smoke():
    report = run_benchmark("gpu_check.py")
    statuses = {r["check"]: r["status"] for r in report["results"]}
    assert list(statuses) == ["bf16", "tf32", "fused-adamw", "flash-sdpa", "compile", "fp16-resume", "ddp", "fsdp",
                              "deepspeed", "speed bert-base", "speed gpt2-124m"]
    assert "FAIL" not in statuses.values()
    # what needs CUDA says so on a CPU; every path that runs on a CPU ran
    assert statuses["tf32"] == statuses["flash-sdpa"] == "n/a" and statuses["compile"] == "skipped"
    assert all(statuses[k] == "ok" for k in ("bf16", "fused-adamw", "fp16-resume", "ddp", "fsdp", "deepspeed"))
