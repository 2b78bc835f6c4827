"""The experiment scripts keep working (tiny --smoke runs; their findings are in the README), and
their reports hold together: every summary is computed from the runs it summarises, every ratio
from the two numbers it compares."""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from conftest import run_smoke
from lmforge.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def run_experiment(script: str) -> dict:
    return run_smoke(ROOT / "experiments" / script)


def assert_summarises(summary: dict, accuracies: list[float]) -> None:
    """`summary` is mean / std / min / max of `accuracies`, as the scripts print them."""
    assert accuracies and all(0 <= a <= 1 for a in accuracies)
    assert summary["mean"] == pytest.approx(statistics.mean(accuracies), rel=1e-12)
    assert summary["std"] == pytest.approx(statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0, abs=1e-12)
    assert (summary["min"], summary["max"]) == (min(accuracies), max(accuracies))


def test_finetune_fixes_experiment_runs_both_settings_over_the_seeds_and_summarises_each():
    report = run_experiment("finetune_fixes.py")
    assert report["examples"] == 64 and report["seeds"] == [0, 1]  # what --smoke sets
    assert [(r["setting"], r["seed"]) for r in report["results"]] == [("original", 0), ("original", 1),
                                                                       ("fixed", 0), ("fixed", 1)]
    steps_per_epoch = math.ceil(report["examples"] / 32)  # the script's batch of 32
    for name, epochs in (("original", 3), ("fixed", 10)):  # the two settings' epochs
        runs = [r for r in report["results"] if r["setting"] == name]
        assert all(r["steps"] == epochs * steps_per_epoch for r in runs)
        assert all(Path(r["run_dir"]).parent.name == name and 0 <= r["val_accuracy"] <= 1 for r in runs)
        assert report["summary"][name]["runs"] == len(runs) == len(report["seeds"])
        assert_summarises(report["summary"][name], [r["test_accuracy"] for r in runs])
    assert len({r["run_dir"] for r in report["results"]}) == 4  # a run directory each


def test_finetune_levers_experiment_runs_each_lever_and_summarises_every_set(tmp_path):
    report = run_smoke(ROOT / "experiments" / "finetune_levers.py", "--out", str(tmp_path))
    assert [(r["variant"], r["seed"]) for r in report["rows"]] == [("shipped", 0), ("pooler", 0), ("dapt", 0)]
    # a lever changes the recipe it was measured on (v1), whatever configs/mr-minilm.yaml ships now
    assert report["variants"]["pooler"]["overrides"] == [
        "model.classifier_pooling=cls", "optim.lr=5e-5", "train.max_steps=792", "train.eval_every=264",
        "train.checkpoint_every=264", "classify.probe_first=false", "classify.token_noise=0", "classify.wise_alpha=1",
        "model.classifier_pooling=pooler"]
    assert report["variants"]["shipped"]["overrides"] == []
    # dapt fine-tunes from its own continued-pretraining run, made on the train split's texts
    dapt_cfg = (Path(report["rows"][2]["run_dir"]) / "config.yaml").read_text()
    pretrained = next(Path(tmp_path / "dapt" / "pretrain").glob("mlm.*"))
    assert f"init_from: {pretrained}" in dapt_cfg
    assert "train-texts:movie-reviews" in (pretrained / "config.yaml").read_text()
    for name, s in report["summary"].items():
        rows = [r for r in report["rows"] if r["variant"] == name]
        for key in ("val", "test", "vader-tweets", "vader-nyt"):
            assert_summarises(s[key], [r[key] for r in rows])
        summary = json.loads((Path(rows[0]["run_dir"]) / "summary.json").read_text())
        assert summary["vader_nyt_accuracy"] == rows[0]["vader-nyt"]  # read from the run, not made up
        assert summary["test_accuracy"] == rows[0]["test"]
    # each run was recorded as it finished; run again with the same --out, nothing is trained again
    recorded = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in recorded] == [("shipped", 0), ("pooler", 0), ("dapt", 0)]
    again = run_smoke(ROOT / "experiments" / "finetune_levers.py", "--out", str(tmp_path), "--only", "shipped")
    assert again["rows"] == report["rows"][:1]
    assert len(list((tmp_path / "shipped").glob("classify.*"))) == 1  # no second run directory
    # a row of another recipe (configs/mr-minilm.yaml changed since) is not taken for this one
    recorded[0]["recipe"] = "an older recipe"
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recorded))
    run_smoke(ROOT / "experiments" / "finetune_levers.py", "--out", str(tmp_path), "--only", "shipped")
    assert len(list((tmp_path / "shipped").glob("classify.*"))) == 2


def test_finetune_vs_transformers_runs_both_sides_in_both_precisions():
    report = run_experiment("finetune_vs_transformers.py")
    assert [(r["side"], r["precision"]) for r in report["rows"]] == [
        ("lmforge", "fp32"), ("transformers", "fp32"), ("lmforge", "bf16"), ("transformers", "bf16")]
    for key, s in report["summary"].items():
        side, precision = key.split()
        rows = [r for r in report["rows"] if r["side"] == side and r["precision"] == precision]
        for name in ("test", "vader-tweets", "vader-nyt"):
            assert_summarises(s[name], [r[name] for r in rows])
            # how often it answered "positive", from its predictions: 1 - that is the other class's share
            assert all(0 <= r[f"{name} positive"] <= 1 for r in rows)
            assert s[f"{name} positive"] == pytest.approx(sum(r[f"{name} positive"] for r in rows) / len(rows))
    assert 0.5 <= report["majority"]["vader-tweets"] <= 1 and report["hf_max_len"] == 64


def test_electra_vs_bert_experiment_pretrains_both_and_fine_tunes_each():
    report = run_experiment("electra_vs_bert.py")
    assert [(r["model"], r["seed"]) for r in report["results"]] == [("bert", 0), ("electra", 0)]  # --smoke: 1 seed
    for name, config in (("bert", "bert-tiny.yaml"), ("electra", "electra-tiny.yaml")):
        s = report["summary"][name]
        assert_summarises(s, [r["test_accuracy"] for r in report["results"] if r["model"] == name])
        assert Path(s["run_dir"]).name.startswith("mlm." if name == "bert" else "electra.")
        # --smoke pretrains 4 steps of the config's batch: the tokens seen are those steps' tokens
        cfg = load_config(ROOT / "configs" / config, [])
        assert s["steps"] == 4
        assert s["tokens"] == 4 * cfg.train.batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len
        assert s["seconds"] > 0 and math.isfinite(s["val_loss"]) and s["val_loss"] > 0


def test_distill_experiment_trains_a_teacher_and_a_half_depth_student_and_times_both():
    report = run_experiment("distill_classifier.py")
    teacher, student = report["teacher"], report["student"]
    assert teacher["layers"] == 6 and student["layers"] == 3
    assert Path(teacher["run_dir"]).name.startswith("classify.") and Path(student["run_dir"]).name.startswith("distill.")
    for r in (teacher, student):
        assert r["examples_per_s"] > 0 and 0 <= r["test_accuracy"] <= 1
    # the two ratios the script prints, of the numbers beside them
    assert report["student_speedup"] == pytest.approx(student["examples_per_s"] / teacher["examples_per_s"], rel=1e-9)
    assert report["accuracy_kept"] == pytest.approx(student["test_accuracy"] / teacher["test_accuracy"], rel=1e-9)


def test_general_distillation_experiment_trains_teacher_distilled_and_scratch_students():
    report = run_experiment("distill_mlm.py")
    assert report["teacher"]["layers"] == 4 and report["distilled"]["layers"] == report["scratch"]["layers"] == 2
    for name in ("teacher", "distilled", "scratch"):
        r = report[name]
        assert r["tokens_per_s"] > 0 and math.isfinite(r["val_loss"]) and r["val_loss"] > 0
        assert 0 <= r["val_accuracy"] <= 1 and r["train_s"] > 0
    assert Path(report["teacher"]["run_dir"]).name.startswith("mlm.")
    assert Path(report["distilled"]["run_dir"]).name.startswith("distill-mlm.")
    assert Path(report["scratch"]["run_dir"]).name.startswith("mlm.")
    assert report["distilled"]["steps"] == report["scratch"]["steps"] == 4  # equal steps, not equal time
    assert report["unigram_val_loss"] > 0
    assert report["student_speedup"] == pytest.approx(
        report["distilled"]["tokens_per_s"] / report["teacher"]["tokens_per_s"], rel=1e-9)


@pytest.mark.slow  # ~70 s: four families' runs and fine-tunings (CI runs the slow tests)
def test_recipes_experiment_runs_each_group_against_its_reference_and_summarises_the_rows(tmp_path):
    report = run_smoke(ROOT / "experiments" / "recipes.py", "--out", str(tmp_path / "runs"))
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert "model.classifier_pooling=mean" in report["finetune_overrides"]
    names = {(r["variant"], r["seed"]) for r in report["rows"]}
    assert names == {(v, s) for v in ("bert", "modernbert", "gpt", "llama") for s in (0, 1)}  # what --smoke runs
    for name, s in report["summary"].items():
        rows = [r for r in report["rows"] if r["variant"] == name]
        reference = "bert" if report["variants"][name]["group"] == "encoder" else "gpt"
        ref_loss = statistics.mean(r["val_loss"] for r in report["rows"] if r["variant"] == reference)
        assert s["val_loss"] == pytest.approx(statistics.mean(r["val_loss"] for r in rows), rel=1e-12)
        assert s["vs_reference"] == pytest.approx(s["val_loss"] - ref_loss, abs=1e-12)
        assert s["time_vs_budget"] == pytest.approx(statistics.mean(r["wall_time_s"] / r["budget_s"] for r in rows))
        for r in rows:  # each seed's budget is the reference's wall time with that seed
            ref = next(x for x in report["rows"] if x["variant"] == reference and x["seed"] == r["seed"])
            assert r["budget_s"] == ref["wall_time_s"] and math.isfinite(r["val_loss"])
        if report["variants"][name]["group"] == "encoder":
            assert_summarises(s["test_accuracy"], [r["test_accuracy"] for r in rows])
            assert all(Path(r["run_dir"]).name.startswith("mlm.") for r in rows)
        else:
            assert s["test_accuracy"] is None and all(Path(r["run_dir"]).name.startswith("clm.") for r in rows)
    assert report["scratch_test_accuracy"]["max"] <= 1.0
    # --pretrained: the same pretrained encoders fine-tuned again, another way; no pretraining run
    again = run_smoke(ROOT / "experiments" / "recipes.py", "--pretrained", str(tmp_path / "report.json"),
                      "--group", "encoder", "--out", str(tmp_path / "again"), "--finetune", "model.classifier_pooling=cls")
    assert [(r["variant"], r["seed"], r["run_dir"], r["val_loss"]) for r in again["rows"]] == [
        (r["variant"], r["seed"], r["run_dir"], r["val_loss"]) for r in report["rows"] if r["variant"] in ("bert", "modernbert")]
    assert again["finetune_overrides"][-1] == "model.classifier_pooling=cls"
    assert not (tmp_path / "again" / "pretrain").exists() and (tmp_path / "again" / "finetune" / "modernbert").is_dir()
    assert_summarises(again["summary"]["modernbert"]["test_accuracy"],
                      [r["test_accuracy"] for r in again["rows"] if r["variant"] == "modernbert"])


def test_when_it_does_not_learn_reports_each_tool_on_both_learning_rates():
    report = run_experiment("when_it_does_not_learn.py")
    assert {name: r["lr"] for name, r in report["rates"].items()} == {"shipped": 1e-3, "broken": 0.3}
    for r in report["rates"].values():
        o = r["overfit"]
        assert o["verdict"] in ("ok", "did not overfit") and (o["reached_step"] is None) == (o["verdict"] != "ok")
        assert o["loss_ratio"] == pytest.approx(o["last_loss"] / o["first_loss"], rel=1e-12)
        assert (o["hint"] == "") == (o["verdict"] == "ok")
        ratios = r["layer_stats"]["median_update_ratio"]
        assert set(ratios) == {"bert.layers.0", "bert.layers.1"} and all(v > 0 for v in ratios.values())
        assert set(r["layer_stats"]["median_act_rms"]) == set(ratios)
    # the same blocks move faster at first with a 300x higher learning rate
    shipped, broken = (report["rates"][k]["layer_stats"]["first_update_ratio"] for k in ("shipped", "broken"))
    assert all(broken[b] > shipped[b] for b in shipped)
    assert report["lr_find"]["stopped"] in ("end", "diverged", "non-finite")


def test_ood_diagnosis_breaks_each_set_down_consistently_for_a_run_and_its_probe():
    report = run_smoke(ROOT / "experiments" / "ood_diagnosis.py", "--probe")
    (run, probe), diagnoses = report["diagnoses"], list(report["diagnoses"].values())
    assert probe == f"{run} (linear probe of its start)"
    for d in diagnoses:
        assert set(d["sentences"]) and all(0 <= v <= 1 for p in d["sentences"].values() for v in p.values())
        for name in ("vader-tweets", "vader-nyt"):
            r, n = d[name], d[name]["examples"]
            assert n == 64 and 0 <= r["answered positive"] <= 1 and 0.3 < r["positive"] < 0.8
            # the bands of |rating| cover every example (none is rated exactly 0), so their
            # accuracies weighted by their sizes are the set's accuracy
            bands = r["by rating strength"].values()
            assert sum(b["examples"] for b in bands) == n
            assert sum(b["accuracy"] * b["examples"] for b in bands) == pytest.approx(r["accuracy"] * n)
            for m in r["markers"].values():  # with and without a marker split the set
                assert m["accuracy with"] * m["examples"] + m["accuracy without"] * (n - m["examples"]) == \
                    pytest.approx(r["accuracy"] * n)
    assert "http://url_removed" in diagnoses[0]["vader-tweets"]["markers"]


def _experiment_module(name: str, monkeypatch):
    """experiments/NAME.py imported, with its own `common` (benchmarks/ has one too) only for now."""
    import importlib.util

    def load(stem):
        spec = importlib.util.spec_from_file_location(stem, ROOT / "experiments" / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    monkeypatch.setitem(sys.modules, "common", load("common"))
    return load(name)


def test_wise_ft_interpolates_tensor_by_tensor_and_chooses_alpha_on_validation(monkeypatch, tmp_path):
    import torch
    wise = _experiment_module("wise_ft", monkeypatch)
    start = {"w": torch.zeros(3), "steps": torch.tensor([1])}
    end = {"w": torch.tensor([2.0, 4.0, -2.0]), "steps": torch.tensor([7])}
    assert torch.equal(wise.interpolate(start, end, 0.0)["w"], start["w"])
    assert torch.equal(wise.interpolate(start, end, 1.0)["w"], end["w"])
    assert wise.interpolate(start, end, 0.25)["w"].tolist() == [0.5, 1.0, -0.5]
    assert wise.interpolate(start, end, 0.25)["steps"].tolist() == [7]  # integer buffers are the run's own

    # a soup is the mean of its ingredients; they must differ in their seed alone
    soup = wise.soup_of([{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])},
                         {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor([5])}])
    assert soup["w"].tolist() == [2.0, 4.0] and soup["n"].tolist() == [3]
    from lmforge.config import dump_yaml
    runs = []
    for name, keys in [("a", ["train.seed=0"]), ("b", ["train.seed=1", "out_dir=elsewhere/"]), ("c", ["optim.lr=1e-5"])]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(dump_yaml(load_config(None, ["task.name=classify", *keys])))
        runs.append(tmp_path / name)
    wise.same_start(runs[:2])
    with pytest.raises(SystemExit, match="not an ingredient of the same soup"):
        wise.same_start([runs[0], runs[2]])

    report = run_smoke(ROOT / "experiments" / "wise_ft.py", "--alphas", "0", "0.5", "1")
    (study,) = report["runs"].values()
    assert list(study["alphas"]) == ["0", "0.5", "1"]
    best = max(r["val"]["accuracy"] for r in study["alphas"].values())
    assert study["alphas"][study["chosen on val"]]["val"]["accuracy"] == best
    for a, row in report["mean"].items():  # one run: its mean is its own row
        assert row == {s: study["alphas"][a][s]["accuracy"] for s in ("val", "test", "vader-tweets", "vader-nyt")}
    soup = run_smoke(ROOT / "experiments" / "wise_ft.py", "--soup", "--alphas", "0", "1")
    (name,) = soup["runs"]  # one study of the two ingredients' average
    assert name.startswith("soup of 2: ") and len(name.split()) == 5
    # alpha 0 is the first ingredient's start whatever the ingredients are: the single run's probe
    assert soup["runs"][name]["alphas"]["0"] == study["alphas"]["0"]
