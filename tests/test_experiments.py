"""The experiment scripts keep working (tiny --smoke runs; their findings are in the README)."""

from pathlib import Path

from conftest import run_smoke

ROOT = Path(__file__).resolve().parents[1]


def run_experiment(script: str) -> dict:
    return run_smoke(ROOT / "experiments" / script)


def test_finetune_fixes_experiment_runs_both_settings_over_the_seeds():
    report = run_experiment("finetune_fixes.py")
    assert [(r["setting"], r["seed"]) for r in report["results"]] == [("original", 0), ("original", 1),
                                                                       ("fixed", 0), ("fixed", 1)]
    assert report["results"][2]["steps"] > report["results"][0]["steps"]  # the fixed setting trains longer
    for name in ("original", "fixed"):
        s = report["summary"][name]
        assert 0 <= s["min"] <= s["mean"] <= s["max"] <= 1 and s["runs"] == 2


def test_electra_vs_bert_experiment_pretrains_both_and_fine_tunes_each():
    report = run_experiment("electra_vs_bert.py")
    assert [r["model"] for r in report["results"]] == ["bert", "electra"]
    for name in ("bert", "electra"):
        s = report["summary"][name]
        assert s["steps"] == 4 and 0 <= s["mean"] <= 1 and Path(s["run_dir"]).name.startswith(
            "mlm." if name == "bert" else "electra.")


def test_distill_experiment_trains_a_teacher_and_a_half_depth_student_and_times_both():
    report = run_experiment("distill_classifier.py")
    assert report["teacher"]["layers"] == 6 and report["student"]["layers"] == 3
    for name in ("teacher", "student"):
        assert report[name]["examples_per_s"] > 0 and 0 <= report[name]["test_accuracy"] <= 1
    assert report["student_speedup"] > 0 and report["accuracy_kept"] >= 0


def test_general_distillation_experiment_trains_teacher_distilled_and_scratch_students():
    report = run_experiment("distill_mlm.py")
    assert report["teacher"]["layers"] == 4 and report["distilled"]["layers"] == report["scratch"]["layers"] == 2
    for name in ("teacher", "distilled", "scratch"):
        assert report[name]["tokens_per_s"] > 0 and report[name]["val_loss"] > 0
    assert Path(report["distilled"]["run_dir"]).name.startswith("distill-mlm.")
    assert report["distilled"]["steps"] == report["scratch"]["steps"] == 4
