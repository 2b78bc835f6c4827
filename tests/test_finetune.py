"""Fine-tuning: data loading and splitting, the two-head classifier, finetune + classify end to end."""

import json
import random
from collections import Counter

import pytest
import torch

from conftest import interrupt_during_step, tiny_config, tiny_finetune_config as _cfg
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.data.sentiment import load_labeled, load_movie_reviews, stratified_split, stratified_subset
from lmforge.errors import LmforgeError
from lmforge.jobs import finetune
from lmforge.tasks.classify import load_classifier
from lmforge.models.classifier import Classifier
from lmforge.tasks.loading import load_model
from lmforge.jobs import pretrain

GOOD = ["good", "great", "fine", "lovely", "superb"]
BAD = ["bad", "awful", "poor", "dull", "boring"]


@pytest.fixture()
def tiny_reviews(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "reviews.tsv"
    lines = ["text\tlabel\trating"]
    for _ in range(200):
        label = rng.randrange(2)
        words = GOOD if label else BAD
        text = f"the cat is {rng.choice(words)} and {rng.choice(words)} ."
        lines.append(f"{text}\t{label}\t{(2.5 if label else -2.5) + rng.uniform(-1, 1):.2f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_stratified_split_is_80_10_10_per_label_disjoint_and_seeded():
    labels = [0] * 700 + [1] * 300
    split = stratified_split(labels, seed=3)
    assert sorted(sum(split.values(), [])) == list(range(1000))
    for name, share in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        counts = Counter(labels[i] for i in split[name])
        assert counts[0] == round(700 * share) and counts[1] == round(300 * share)
    assert stratified_split(labels, seed=3) == split and stratified_split(labels, seed=4) != split
    few = stratified_subset(split["train"], labels, 100, seed=3)  # data.train_examples
    assert len(few) == 100 and set(few) <= set(split["train"])
    assert Counter(labels[i] for i in few) == {0: 70, 1: 30}
    assert stratified_subset(split["train"], labels, 100, seed=3) == few != stratified_subset(split["train"], labels,
                                                                                              100, seed=4)
    assert stratified_subset(split["train"], labels, 5000, seed=3) == split["train"]


def test_movie_reviews_are_fetched_checked_and_parsed_from_the_vader_source_release():
    data = load_movie_reviews()
    assert len(data.examples) == 10605 - 37
    assert sum(e.label for e in data.examples) == 5242
    assert all("\r" not in e.text and e.rating != 0 and (e.rating > 0) == bool(e.label) for e in data.examples)
    assert data.examples[0].text.startswith("The Rock is destined to be the 21st Century's new")
    assert data.rating_range == (-4.0, 4.0)


def test_local_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("review,label\nfine,1\n")
    with pytest.raises(LmforgeError, match="has no column 'text'"):
        load_labeled(str(bad))
    bad.write_text("text,label\nfine,positive\ndull,maybe\n")  # a typo among sentiment names
    with pytest.raises(LmforgeError, match="label 'maybe' is not a sentiment class, but 'positive' is"):
        load_labeled(str(bad))
    bad.write_text("text,label\nfine,1\ndull,\n")
    with pytest.raises(LmforgeError, match="row 2: the label is empty"):
        load_labeled(str(bad))
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"text": "fine", "label": "positive"}\n')
    data = load_labeled(str(jl))
    assert data.examples[0].label == 1 and data.rating_range is None


def test_rating_head_starts_centred_in_the_rating_range():
    torch.manual_seed(0)
    model = Classifier(ModelConfig(vocab_size=100, hidden_size=32, num_layers=1, num_heads=2,
                                       intermediate_size=64, dropout=0.0), 2, (1.0, 10.0)).eval()
    out = model(torch.randint(5, 100, (64, 12)))
    logits, rating = out.logits, out.rating
    assert logits.shape == (64, 2) and rating.shape == (64,)
    assert abs(rating.mean().item() - 5.5) < 0.5 and rating.std().item() < 4.5


def test_finetune_learns_a_tiny_file_and_classify_reports_every_input(tiny_prepared, tiny_reviews, tmp_path, capsys):
    run_dir, summary = finetune(_cfg(tiny_prepared, tmp_path, tiny_reviews))
    assert summary["test_accuracy"] >= 0.9 and summary["val_accuracy"] >= 0.9
    assert set(summary) >= {"val_accuracy", "test_accuracy", "test_f1", "test_rating_mae"}
    for name in ("errors.md", "confusion.png", "split.json", "dataset.json", "report.png", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    split = json.loads((run_dir / "split.json").read_text())
    assert [len(split[k]) for k in ("train", "validation", "test")] == [160, 20, 20]
    capsys.readouterr()
    inputs = tmp_path / "in.txt"
    inputs.write_text("the cat is superb and lovely .\n\nthe cat is awful and dull . " + "bad " * 80 + "\n")
    assert main(["classify", str(run_dir), "--input", str(inputs), "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r.get("label") for r in rows] == ["positive", None, "negative"]
    assert rows[1]["error"] == "empty input" and 0.5 <= rows[0]["probability"] <= 1.0
    assert rows[0]["rating"] > 0 > rows[2]["rating"]
    assert "input 2 is empty" in captured.err and "truncated" in captured.err
    assert main(["classify", str(run_dir), "--text", "the cat is great and fine ."]) == 0
    assert capsys.readouterr().out.startswith("positive\t")
    assert main(["classify", str(run_dir)]) == 2
    capsys.readouterr()
    assert main(["predict", str(run_dir), "the [MASK]"]) == 2
    assert main(["generate", str(run_dir), "the"]) == 2
    assert "is a fine-tuning run" in capsys.readouterr().err


def test_finetune_starts_from_an_lmforge_pretraining_run(tiny_prepared, tiny_reviews, tmp_path):
    pre_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "pre", "train.max_steps=2"))
    run_dir, _ = finetune(_cfg(tiny_prepared, tmp_path, tiny_reviews, f"model.init_from={pre_dir}",
                               "train.max_steps=1", "optim.lr=1e-12", "optim.weight_decay=0"))
    _, _, clf = load_classifier(run_dir)
    pre = load_model(pre_dir).model
    word = "bert.embeddings.token.weight"
    assert torch.allclose(clf.state_dict()[word], pre.state_dict()[word], atol=1e-6)


def test_fine_tuned_encoder_exports_as_a_bertmodel_with_identical_hidden_states(tiny_prepared, tiny_reviews,
                                                                               tmp_path):
    import transformers

    from lmforge.export import export_hf

    run_dir, _ = finetune(_cfg(tiny_prepared, tmp_path, tiny_reviews, "train.max_steps=3"))
    out = export_hf(run_dir, tmp_path / "enc")
    ref = transformers.AutoModel.from_pretrained(out, add_pooling_layer=False).eval()
    _, _, clf = load_classifier(run_dir)
    ids = torch.randint(5, clf.cfg.vocab_size, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = clf.bert(ids, attention_mask=mask)
    assert (ours - theirs)[mask.bool()].abs().max().item() <= 1e-5


@pytest.mark.usefixtures("offline_datasets")
def test_hf_dataset_names_load_the_configs_train_split_through_real_datasets_without_ratings(monkeypatch, tmp_path):
    # `datasets` itself, offline, on a local dataset folder whose README names two configs, each
    # with its own files: `hf:FOLDER:sst2` must load sst2's train split and nothing else
    folder = tmp_path / "reviews"
    for config in ("sst2", "other"):
        (folder / config).mkdir(parents=True)
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: sst2\n  data_files:\n  - split: train\n    path: sst2/train.jsonl\n"
        "  - split: validation\n    path: sst2/validation.jsonl\n"
        "- config_name: other\n  data_files:\n  - split: train\n    path: other/train.jsonl\n---\n")
    (folder / "sst2" / "train.jsonl").write_text('{"text": "a fine film", "label": 1}\n{"text": "dull", "label": 0}\n'
                                                 '{"text": "superb", "label": 1}\n')
    (folder / "sst2" / "validation.jsonl").write_text('{"text": "not a train example", "label": 0}\n')
    (folder / "other" / "train.jsonl").write_text('{"text": "the other config", "label": 0}\n')
    data = load_labeled(f"hf:{folder}:sst2")
    assert [(e.text, e.label, e.rating) for e in data.examples] == [("a fine film", 1, None), ("dull", 0, None),
                                                                    ("superb", 1, None)]
    assert data.rating_range is None
    assert [e.text for e in load_labeled(f"hf:{folder}:other").examples] == ["the other config"]


# a batch-size ramp (lmforge/train/schedule.py) from 1 to 2 micro-batches of 16 examples
RAMP = ("train.grad_accum_steps=2", "train.batch_ramp_start_tokens=512", "train.batch_ramp_tokens=4000")


WISE = ("classify.probe_first=true", "classify.wise_alpha=0.5")


@pytest.mark.parametrize("extra", [(), RAMP, ("classify.token_noise=0.2",), WISE],
                         ids=["plain", "batch-ramp", "token-noise", "wise-ft"])
def test_finetune_resume_is_bit_exact(tiny_prepared, tiny_reviews, tmp_path, monkeypatch, extra):
    from lmforge.jobs import resume_finetune
    from lmforge.tasks.classify import ClassifyTask
    from lmforge.train.log import read_metrics

    full_dir, _ = finetune(_cfg(tiny_prepared, tmp_path / "full", tiny_reviews, "train.max_steps=12",
                                "train.eval_every=6", "train.checkpoint_every=6", "train.log_every=1",
                                "model.dropout=0.1", *extra))
    if extra == RAMP:  # one micro-batch of 16 examples a step at first, two at the end
        step_tokens = [r["step_tokens"] for r in read_metrics(full_dir) if r["split"] == "train"]
        assert max(step_tokens[:3]) < min(step_tokens[-3:])
    interrupt_during_step(monkeypatch, ClassifyTask, 3 if extra == RAMP else 8)
    cut_dir, summary = finetune(_cfg(tiny_prepared, tmp_path / "cut", tiny_reviews, "train.max_steps=12",
                                     "train.eval_every=6", "train.checkpoint_every=6", "train.log_every=1",
                                     "model.dropout=0.1", *extra))
    assert summary["stopped_by"] == "signal"
    monkeypatch.undo()
    with pytest.raises(LmforgeError, match="is a fine-tuning run"):
        from lmforge.jobs import resume
        resume(cut_dir)
    resume_finetune(cut_dir)
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if r["split"] == "train"]  # noqa: E731
    assert losses(cut_dir) == losses(full_dir)
    assert json.loads((cut_dir / "summary.json").read_text())["test_accuracy"] == \
        json.loads((full_dir / "summary.json").read_text())["test_accuracy"]
    if extra == WISE:  # the start is the first run's, kept across the resume: the same interpolation
        from safetensors.torch import load_file
        for name in ("start.safetensors", "wise.safetensors"):
            a, b = load_file(full_dir / name), load_file(cut_dir / name)
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_wise_alpha_interpolates_toward_the_probed_start_and_readers_load_the_result(tiny_prepared, tiny_reviews,
                                                                                      tmp_path):
    from safetensors.torch import load_file
    from lmforge.runs.readers import run_weights
    from lmforge.tasks.classify import ClassifyTask, evaluate_run
    from lmforge.train.log import read_metrics
    from lmforge.train.loop import autocast_for

    cfg = _cfg(tiny_prepared, tmp_path, tiny_reviews, "classify.probe_first=true", "classify.wise_alpha=0.25",
               "train.max_steps=10", "train.eval_every=10", "train.checkpoint_every=10", "model.dropout=0.1")
    run_dir, summary = finetune(cfg)
    start, mixed, tuned = (load_file(run_dir / "start.safetensors"), load_file(run_dir / "wise.safetensors"),
                           run_weights(run_dir))
    # the start is what the run began from: the same config's task before any update (probe heads)
    task = ClassifyTask.create(cfg)
    begun = task.model.state_dict()
    assert set(start) == set(begun) and all(torch.equal(start[k], begun[k]) for k in start)
    # the last checkpoint stays the fine-tuned model; the run's model is 0.75 x start + 0.25 x it
    assert any(not torch.equal(start[k], tuned[k]) for k in start)
    for k in start:
        assert torch.allclose(mixed[k], 0.75 * start[k] + 0.25 * tuned[k], atol=1e-6), k
    _, _, model = load_classifier(run_dir)
    assert all(torch.equal(v, mixed[k]) for k, v in model.state_dict().items())
    evaluated = evaluate_run(run_dir, str(tiny_reviews), write=False)  # the run's test split, of that model
    assert evaluated["checkpoint"] == "step_00000010-wise"
    # the summary's validation figures: the fine-tuned model's as the loop logged them, and the
    # interpolated model's measured the same way (the run's precision)
    last_eval = [r for r in read_metrics(run_dir) if r["split"] == "validation"][-1]
    assert summary["fine_tuned_val_accuracy"] == last_eval["accuracy"]
    precision = json.loads((run_dir / "checkpoints" / "step_00000010" / "state.json").read_text())["precision"]
    with autocast_for(precision, torch.device("cpu")):
        ours = task.metrics(task.predict_split(model, "validation", torch.device("cpu")))
    assert summary["val_accuracy"] == ours["accuracy"] and summary["val_rating_mae"] == ours["rating_mae"]
    assert summary["fine_tuned_val_rating_mae"] != summary["val_rating_mae"]  # two models, two figures
    assert summary["wise_alpha"] == 0.25
    # a run whose start was deleted cannot interpolate: one line, and wise.safetensors is left as it was
    before = (run_dir / "wise.safetensors").read_bytes()
    (run_dir / "start.safetensors").rename(tmp_path / "kept.safetensors")
    with pytest.raises(LmforgeError, match="start.safetensors is missing"):
        task.interpolate_toward_start(task.model, run_dir, torch.device("cpu"))
    assert (run_dir / "wise.safetensors").read_bytes() == before
    # off by default; refused where it cannot mean anything
    plain_dir, plain = finetune(_cfg(tiny_prepared, tmp_path, tiny_reviews, "train.max_steps=2",
                                     "train.eval_every=2", "train.checkpoint_every=2"))
    assert "wise_alpha" not in plain and not (plain_dir / "start.safetensors").exists()
    for bad, message in [(["classify.wise_alpha=0.5"], "set classify.probe_first=true"),
                         (["classify.probe_first=true", "classify.wise_alpha=1.5"], "must be in \\[0, 1\\]"),
                         (["classify.probe_first=true", "classify.wise_alpha=0.5", "model.reinit_layers=1"],
                          "makes partly random")]:
        with pytest.raises(LmforgeError, match=message):
            _cfg(tiny_prepared, tmp_path, tiny_reviews, *bad)


def test_a_run_resumed_to_train_longer_interpolates_its_new_end_and_is_not_stuck_by_its_old_summary(
        tiny_prepared, tiny_reviews, tmp_path, monkeypatch, capsys):
    from lmforge.jobs import resume_finetune
    from lmforge.tasks.classify import ClassifyTask, evaluate_run

    wise = ("classify.probe_first=true", "classify.wise_alpha=0.5", "train.eval_every=4", "train.checkpoint_every=4")
    run_dir, first = finetune(_cfg(tiny_prepared, tmp_path, tiny_reviews, "train.max_steps=4", *wise))
    assert first["steps"] == 4
    # resumed to 12 steps and killed after its last checkpoint, inside its final reports: summary.json
    # and wise.safetensors are still the 4-step run's
    monkeypatch.setattr(ClassifyTask, "finish", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        resume_finetune(run_dir, ["train.max_steps=12"])
    monkeypatch.undo()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    # the readers take checkpoint 12 as it is, not the old end's mix, and say so
    capsys.readouterr()
    assert evaluate_run(run_dir, str(tiny_reviews), write=False)["checkpoint"] == "step_00000012"
    assert "interpolates checkpoint 'step_00000004'" in capsys.readouterr().err
    _, summary = resume_finetune(run_dir)  # not "already finished": it writes the reports of step 12
    assert summary["steps"] == 12 and summary["wise_alpha"] == 0.5
    assert evaluate_run(run_dir, str(tiny_reviews), write=False)["checkpoint"] == "step_00000012-wise"
    with pytest.raises(LmforgeError, match="already finished at step 12"):
        resume_finetune(run_dir)


def test_reinit_layers_restarts_only_the_top_layers_from_berts_init(tiny_prepared, tmp_path):
    from lmforge.tasks.classify import reinit_top_layers

    cfg = _cfg(tiny_prepared, tmp_path, "data.dataset=movie-reviews", "model.reinit_layers=1")
    cfg.model.vocab_size, cfg.model.init_from = 200, "a-pretrained-encoder"
    torch.manual_seed(1)
    source = Classifier(cfg.model, 2, (-4.0, 4.0))
    for p in source.bert.parameters():  # "pretrained": nothing like a fresh init
        p.data.add_(1.0)
    model = Classifier(cfg.model, 2, (-4.0, 4.0))
    model.load_state_dict(source.state_dict())
    reinit_top_layers(model, cfg)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # noqa: E731
    assert same(model.bert.embeddings, source.bert.embeddings) and same(model.bert.layers[0], source.bert.layers[0])
    top = model.bert.layers[1]
    assert torch.equal(top.ffn_norm.weight, torch.ones_like(top.ffn_norm.weight)) and not top.ffn_in.bias.any()
    assert top.ffn_in.weight.std().item() == pytest.approx(cfg.model.init_std, rel=0.15)
    cfg.model.reinit_layers = 3
    with pytest.raises(LmforgeError, match="exceeds the 2 layers"):
        reinit_top_layers(model, cfg)
    cfg.model.init_from = None
    with pytest.raises(LmforgeError, match="without model.init_from every layer is random"):
        reinit_top_layers(model, cfg)
