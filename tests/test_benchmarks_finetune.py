"""The fine-tuning and inference benchmark scripts keep working (tiny --smoke runs; speed is never asserted)."""

from pathlib import Path

from conftest import run_smoke

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str) -> dict:
    return run_smoke(ROOT / "benchmarks" / script, timeout=600)


def test_finetune_benchmark_smoke_run_reports_every_variant_with_positive_throughput():
    report = run_benchmark("bench_finetune.py")
    assert [r["variant"] for r in report["results"]] == ["lmforge", "hf", "lmforge-random", "hf-grouped"]
    for r in report["results"]:
        assert r["examples_per_s"] > 0 and r["flops_per_round"] > 0 and r["mfu"] > 0 and r["peak_rss_mb"] >= 0
        assert r["lmforge_speedup_over_this"] > 0
    assert report["matmul_peak_gflops"] > 0


def test_inference_benchmark_smoke_run_reports_every_variant_with_positive_throughput():
    report = run_benchmark("bench_inference.py")
    assert [r["variant"] for r in report["results"]] == ["lmforge-classify", "hf-classify", "lmforge-fill-mask",
                                                         "hf-fill-mask"]
    for r in report["results"]:
        assert r["examples_per_s"] > 0 and r["flops_per_pass"] > 0 and r["mfu"] > 0
        assert r["lmforge_speedup_over_this"] > 0
    assert report["matmul_peak_gflops"] > 0
