"""The experiment scripts keep working (tiny --smoke runs; their findings are in the README)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(script: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--smoke", "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_finetune_fixes_experiment_runs_both_settings_over_the_seeds():
    report = run_smoke("finetune_fixes.py")
    assert [(r["setting"], r["seed"]) for r in report["results"]] == [("original", 0), ("original", 1),
                                                                       ("fixed", 0), ("fixed", 1)]
    assert report["results"][2]["steps"] > report["results"][0]["steps"]  # the fixed setting trains longer
    for name in ("original", "fixed"):
        s = report["summary"][name]
        assert 0 <= s["min"] <= s["mean"] <= s["max"] <= 1 and s["runs"] == 2


def test_electra_vs_bert_experiment_pretrains_both_and_fine_tunes_each():
    report = run_smoke("electra_vs_bert.py")
    assert [r["model"] for r in report["results"]] == ["bert", "electra"]
    for name in ("bert", "electra"):
        s = report["summary"][name]
        assert s["steps"] == 4 and 0 <= s["mean"] <= 1 and Path(s["run_dir"]).name.startswith(
            "mlm." if name == "bert" else "electra.")
