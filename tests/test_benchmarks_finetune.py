"""The fine-tuning and inference benchmark scripts keep working (tiny --smoke runs; speed is never asserted)."""

from pathlib import Path

import pytest

from conftest import run_smoke

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str) -> dict:
    return run_smoke(ROOT / "benchmarks" / script, timeout=600)


def check_measured_rows(report: dict, items: int, seconds_key: str, flops_key: str, pairs: dict) -> None:
    """Each row's derived numbers are the quotients of its measured ones: throughput = items /
    median seconds, MFU = counted FLOPs / seconds / the measured matmul peak, and the speedup of
    the row's lmforge counterpart (`pairs`, default: lmforge) = its throughput / this row's."""
    peak = report["matmul_peak_gflops"] * 1e9
    speed = {r["variant"]: r["examples_per_s"] for r in report["results"]}
    for r in report["results"]:
        assert r[seconds_key] > 0 and r[flops_key] > 0 and r["peak_rss_mb"] >= 0
        assert r["examples_per_s"] == pytest.approx(items / r[seconds_key], rel=1e-9)
        assert r["mfu"] == pytest.approx(r[flops_key] / r[seconds_key] / peak, rel=1e-9)
        assert r["g" + flops_key] == pytest.approx(r[flops_key] / 1e9, rel=1e-12)
        ours = speed[pairs.get(r["variant"], "lmforge")]
        assert r["lmforge_speedup_over_this"] == pytest.approx(ours / r["examples_per_s"], rel=1e-9)


def test_finetune_benchmark_rows_are_consistent_with_their_measurements_and_batches():
    report = run_benchmark("bench_finetune.py")
    cfg = report["config"]
    assert [r["variant"] for r in report["results"]] == ["lmforge", "hf", "lmforge-random", "hf-grouped"]
    assert report["examples_per_round"] == cfg["batch"] * cfg["batches_per_round"]
    check_measured_rows(report, report["examples_per_round"], "round_s", "flops_per_round", {})
    row = {r["variant"]: r for r in report["results"]}
    assert row["lmforge"]["lmforge_speedup_over_this"] == 1.0
    # the same examples, batched two ways: length-grouped (lmforge, hf-grouped) or shuffled (hf,
    # lmforge-random); grouping can only remove padding, and a model on fewer positions counts fewer FLOPs
    assert row["lmforge"]["padding"] == row["hf-grouped"]["padding"]
    assert row["hf"]["padding"] == row["lmforge-random"]["padding"]
    assert 0 <= row["lmforge"]["padding"] <= row["lmforge-random"]["padding"] < 1
    assert row["lmforge"]["flops_per_round"] <= row["lmforge-random"]["flops_per_round"]
    assert row["hf-grouped"]["flops_per_round"] <= row["hf"]["flops_per_round"]


def test_inference_benchmark_rows_are_consistent_with_their_measurements():
    report = run_benchmark("bench_inference.py")
    assert [r["variant"] for r in report["results"]] == ["lmforge-classify", "hf-classify", "lmforge-fill-mask",
                                                         "hf-fill-mask"]
    assert report["texts"] == report["config"]["examples"]
    check_measured_rows(report, report["texts"], "pass_s", "flops_per_pass",
                        {"lmforge-classify": "lmforge-classify", "hf-classify": "lmforge-classify",
                         "lmforge-fill-mask": "lmforge-fill-mask", "hf-fill-mask": "lmforge-fill-mask"})
    row = {r["variant"]: r for r in report["results"]}
    # transformers' fill-mask pipeline runs the vocabulary head on every position, lmforge on the [MASK]s only
    assert row["lmforge-fill-mask"]["flops_per_pass"] < row["hf-fill-mask"]["flops_per_pass"]


def test_unpad_benchmark_changes_the_speed_and_never_the_losses():
    report = run_benchmark("bench_unpad.py")
    row = {r["variant"]: r for r in report["results"]}
    assert list(row) == ["unpad-bucketed", "padded-bucketed", "unpad-random", "padded-random"]
    for order in ("bucketed", "random"):
        unpad, padded = row[f"unpad-{order}"], row[f"padded-{order}"]
        assert padded["max_loss_diff"] < 1e-4  # the padded computation gives the same losses, step by step
        assert padded["padding"] == unpad["padding"]
        assert padded["unpad_speedup_over_this"] == pytest.approx(
            unpad["examples_per_s"] / padded["examples_per_s"], rel=1e-9)
    # the same examples: sorting by length can only remove padding
    assert 0 <= row["unpad-bucketed"]["padding"] <= row["unpad-random"]["padding"] < 1
    assert report["examples_per_round"] == report["config"]["batch"] * report["config"]["batches_per_round"]
