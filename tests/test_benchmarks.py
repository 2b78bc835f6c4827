"""The benchmark scripts keep working (tiny sizes; speed itself is never asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bert_mlm_benchmark_smoke_run_reports_every_variant():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_bert_mlm.py"), "--smoke", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["variant"] for r in report["results"]] == ["lmforge", "hf", "hf-selected"]
    for r in report["results"]:
        assert r["tokens_per_s"] > 0 and r["flops_per_step"] > 0 and 0 < r["mfu"]
    assert report["matmul_peak_gflops"] > 0
