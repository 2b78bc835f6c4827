"""`lmforge evaluate` and what fine-tuning reports beyond its test split: labels from the data (any
number of classes), the out-of-domain sets, temperature calibration, BertForSequenceClassification
export with id2label, and one-line errors for bad inputs."""

import json
import math
import random

import pytest
import torch

import lmforge

from conftest import tiny_finetune_config
from lmforge.cli import main
from lmforge.data.sentiment import LabeledData, Example, load_labeled
from lmforge.errors import LmforgeError
from lmforge.eval.evaluate import evaluate_examples
from lmforge.jobs import finetune
from lmforge.models.classifier import ClassifierOutput
from lmforge.tasks.classify import evaluate_run, load_classifier, read_temperature

# words that are single tokens of the tiny test tokenizer (conftest.py), so a tiny model learns them fast
WORDS = {"negative": ["dog", "river", "road", "hill"], "neutral": ["apple", "bird", "moon", "house"],
         "positive": ["bright", "quiet", "small", "red"]}


def _reviews(path, n, classes, seed=0, rating=True):
    """A separable TSV of `n` rows: each row's two words tell its class."""
    rng = random.Random(seed)
    lines = ["text\tlabel" + ("\trating" if rating else "")]
    for _ in range(n):
        label = rng.choice(classes)
        text = f"the cat is {rng.choice(WORDS[label])} and {rng.choice(WORDS[label])} ."
        value = {"negative": -2.5, "neutral": 0.0, "positive": 2.5}[label] + rng.uniform(-1, 1)
        lines.append(f"{text}\t{label}" + (f"\t{value:.2f}" if rating else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(tiny_prepared, tmp_path, data_path, *overrides):
    return tiny_finetune_config(tiny_prepared, tmp_path, data_path, "train.eval_every=40", "train.checkpoint_every=40",
                                *overrides)


def test_labels_come_from_the_data_in_a_stable_order(tmp_path):
    three = _reviews(tmp_path / "three.tsv", 30, ["negative", "neutral", "positive"])
    assert load_labeled(str(three)).labels == ("negative", "neutral", "positive")
    stars = tmp_path / "stars.csv"
    stars.write_text("text,label\n" + "".join(f"t{i},{s}\n" for i, s in enumerate([5, 1, 10, 3, 1])))
    data = load_labeled(str(stars))
    assert data.labels == ("1", "3", "5", "10")  # as numbers, not as text ("10" < "3")
    assert [e.label for e in data.examples] == [2, 0, 3, 1, 0]
    binary = tmp_path / "b.jsonl"
    binary.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "NEG"}\n')
    data = load_labeled(str(binary))
    assert data.labels == ("negative", "positive") and [e.label for e in data.examples] == [1, 0]


def test_the_out_of_domain_sets_are_the_vader_archives_tweets_and_nyt_snippets():
    for name, rows, positive in (("vader-tweets", 4196, 0.690), ("vader-nyt", 4946, 0.446)):
        data = load_labeled(name)
        assert len(data.examples) == rows and data.labels == ("negative", "positive")
        assert sum(e.label for e in data.examples) / rows == pytest.approx(positive, abs=5e-4)
        assert all((e.rating > 0) == bool(e.label) for e in data.examples)


class _WordModel(torch.nn.Module):
    """Logits set by the first word of the text: "good" -> p(positive) = 0.75, "bad" -> p(negative) = 0.8."""

    def __init__(self, tokenizer):
        super().__init__()
        self.polarity = torch.nn.Linear(1, 2)  # its out_features is the number of classes
        self.good, self.bad = (tokenizer.encode_batch([w])[0][0] for w in ("good", "bad"))
        assert self.good != self.bad

    def forward(self, input_ids, attention_mask=None):
        first = input_ids[:, 1]
        logits = torch.zeros(len(first), 2)
        logits[first == self.good] = torch.tensor([0.0, math.log(3)])
        logits[first == self.bad] = torch.tensor([math.log(4), 0.0])
        return ClassifierOutput(logits, None, None)


def test_evaluate_metrics_equal_a_hand_computed_case(tiny_prepared):
    from lmforge.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_prepared.folder / "tokenizer.json"))
    # 4 "good" (3 positive, 1 negative), 5 "bad" (4 negative, 1 positive); labels given by name
    rows = [("good", 1)] * 3 + [("good", 0)] + [("bad", 0)] * 4 + [("bad", 1)]
    data = LabeledData("hand", "hand", [Example(f"{w} film", y) for w, y in rows], None, ("negative", "positive"))
    r = evaluate_examples(_WordModel(tokenizer), tokenizer, data, ("negative", "positive"), max_len=16)
    assert r["accuracy"] == pytest.approx(7 / 9)
    assert r["confusion"] == [[4, 1], [1, 3]]
    f1_neg, f1_pos = 2 * 4 / (2 * 4 + 1 + 1), 2 * 3 / (2 * 3 + 1 + 1)
    assert r["f1"] == pytest.approx({"negative": f1_neg, "positive": f1_pos})
    assert r["macro_f1"] == pytest.approx((f1_neg + f1_pos) / 2)
    # two bins: confidence 0.75 (4 predictions, 3 right) and 0.8 (5, 4 right)
    assert r["ece"] == pytest.approx(4 / 9 * abs(0.75 - 0.75) + 5 / 9 * abs(0.8 - 0.8), abs=1e-6)
    assert r["majority_accuracy"] == pytest.approx(5 / 9) and r["majority_label"] == "negative"
    assert r["nll"] == pytest.approx(-(3 * math.log(0.75) + math.log(0.25) + 4 * math.log(0.8) + math.log(0.2)) / 9)
    # the classifier's classes in another order: labels are matched by name, not by index
    swapped = evaluate_examples(_WordModel(tokenizer), tokenizer, data, ("positive", "negative"), max_len=16)
    assert swapped["accuracy"] == pytest.approx(2 / 9)
    # a temperature changes the confidences and never the predictions
    hot = evaluate_examples(_WordModel(tokenizer), tokenizer, data, ("negative", "positive"), max_len=16,
                            temperature=2.0)
    p_good, p_bad = 3 ** 0.5 / (1 + 3 ** 0.5), 2 / 3  # softmax([0, ln 3] / 2), softmax([ln 4, 0] / 2)
    assert hot["accuracy"] == r["accuracy"] and hot["ece_uncalibrated"] == pytest.approx(r["ece"], abs=1e-6)
    assert hot["ece"] == pytest.approx(4 / 9 * abs(0.75 - p_good) + 5 / 9 * abs(0.8 - p_bad), abs=1e-6)


def test_a_sentiment_run_is_calibrated_reports_out_of_domain_and_evaluate_measures_it(tiny_prepared, tmp_path,
                                                                                      capsys):
    run_dir, summary = finetune(_cfg(tiny_prepared, tmp_path, _reviews(tmp_path / "r.tsv", 200,
                                                                      ["negative", "positive"])))
    assert summary["test_accuracy"] >= 0.9
    calibration = json.loads((run_dir / "calibration.json").read_text())
    temperature = calibration["temperature"]
    assert temperature > 0 and temperature == read_temperature(run_dir) == summary["temperature"]
    assert summary["test_ece_calibrated"] == calibration["test_ece_calibrated"]
    # the out-of-domain entries are the evaluation of those sets at the run's temperature
    for name, majority in (("vader-tweets", 0.690), ("vader-nyt", 1 - 0.446)):
        key = name.replace("-", "_")
        assert summary[f"{key}_majority_accuracy"] == pytest.approx(majority, abs=5e-4)
        again = evaluate_run(run_dir, name, write=False)
        assert summary[f"{key}_accuracy"] == pytest.approx(again["accuracy"], abs=1e-9)
        assert summary[f"{key}_ece"] == pytest.approx(again["ece"], abs=1e-6)
    # `classify` prints the calibrated probability: softmax(logits / T)
    _, tokenizer, model = load_classifier(run_dir)
    text = "the cat is bright and red ."
    ids = torch.tensor([[tokenizer.cls_id, *tokenizer.encode_batch([text])[0], tokenizer.sep_id]])
    with torch.no_grad():
        expected = (model(ids).logits / temperature).softmax(-1)[0, 1].item()
    capsys.readouterr()
    assert main(["classify", str(run_dir), "--text", text, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["probability"] == pytest.approx(expected, rel=1e-5)
    # evaluate on the run's own data measures its test split, the same numbers as the summary
    result = evaluate_run(run_dir, str(tmp_path / "r.tsv"))
    assert result["part"] == "the run's test split" and result["examples"] == summary["test_examples"]
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert result["ece"] == pytest.approx(summary["test_ece_calibrated"], abs=1e-6)
    for path in result["files"]:
        assert (run_dir / "evaluations").samefile(path.rsplit("/", 1)[0])
    # a new file labelled 0/1, with ratings, through the CLI
    fresh = _reviews(tmp_path / "fresh.tsv", 40, ["negative", "positive"], seed=5)
    fresh.write_text(fresh.read_text().replace("\tnegative\t", "\t0\t").replace("\tpositive\t", "\t1\t"))
    assert main(["evaluate", str(run_dir), "--dataset", str(fresh), "--json", "--out", str(tmp_path / "ev")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["examples"] == 40 and out["part"] == "all of it" and out["accuracy"] >= 0.9
    rows = [line.split("\t") for line in fresh.read_text().splitlines()[1:]]  # text, label, rating
    predicted = lmforge.classify(run_dir, [text for text, _, _ in rows])
    by_hand = sum(abs(p["rating"] - float(r)) for p, (_, _, r) in zip(predicted, rows)) / len(rows)
    assert out["rating_mae"] == pytest.approx(by_hand, abs=1e-3)  # classify rounds ratings to 4 places
    assert sum(b["count"] for b in out["accuracy_by_length"]) == 40
    assert (tmp_path / "ev" / f"fresh.{out['checkpoint']}-reliability.png").is_file()
    assert main(["evaluate", str(run_dir), "--dataset", "vader-nyt"]) == 0
    text_out = capsys.readouterr().out
    assert "vader-nyt: 4,946 examples, 2 classes" in text_out and "majority class 'negative'" in text_out


def test_three_classes_fine_tune_evaluate_and_export_as_bert_for_sequence_classification(tiny_prepared,
                                                                                          tmp_path, capsys):
    import transformers

    from lmforge.export import export_hf

    classes = ["negative", "neutral", "positive"]
    data = _reviews(tmp_path / "three.tsv", 300, classes, rating=False)
    run_dir, summary = finetune(_cfg(tiny_prepared, tmp_path, data, "model.classifier_pooling=pooler",
                                     "train.max_steps=60", "train.eval_every=60", "train.checkpoint_every=60"))
    assert json.loads((run_dir / "dataset.json").read_text())["labels"] == classes
    assert summary["test_accuracy"] >= 0.9 and "test_rating_mae" not in summary
    assert "vader_tweets_accuracy" not in summary  # three classes: not a negative/positive sentiment model
    _, tokenizer, model = load_classifier(run_dir)
    assert model.rating is None and model.polarity.out_features == 3
    result = evaluate_run(run_dir, str(_reviews(tmp_path / "more.tsv", 60, classes, seed=9, rating=False)))
    assert len(result["confusion"]) == 3 and result["accuracy"] >= 0.9
    out = export_hf(run_dir, tmp_path / "hf")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["BertForSequenceClassification"]
    assert hf_cfg["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert theirs.config.id2label[1] == "neutral"
    ids = torch.randint(5, model.cfg.vocab_size, (3, 12))
    ids[:, 0] = tokenizer.cls_id
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        ref = theirs(input_ids=ids, attention_mask=mask).logits
    assert (ours - ref).abs().max().item() <= 1e-5
    # and the export reads back as a distillation teacher, its rows in the run's order
    from lmforge.runs.readers import load_hf_classifier

    _, _, teacher, notes = load_hf_classifier(out, tuple(classes))
    with torch.no_grad():
        assert (teacher(ids, attention_mask=mask).logits - ours).abs().max().item() <= 1e-5
    assert not notes


def test_evaluate_and_finetune_refuse_bad_inputs_in_one_line(tiny_prepared, tmp_path, capsys):
    reviews = _reviews(tmp_path / "r.tsv", 60, ["negative", "positive"])
    run_dir, _ = finetune(_cfg(tiny_prepared, tmp_path, reviews, "train.max_steps=2", "train.eval_every=2",
                               "train.checkpoint_every=2", "classify.evaluate_ood=false"))
    three = _reviews(tmp_path / "three.tsv", 30, ["negative", "neutral", "positive"])
    with pytest.raises(LmforgeError, match="has label 'neutral', which this classifier does not know"):
        evaluate_run(run_dir, str(three))
    cases = [
        (["evaluate", str(run_dir), "--dataset", str(tmp_path / "missing.tsv")], "unknown dataset"),
        (["evaluate", str(tmp_path), "--dataset", "vader-nyt"], "is not an lmforge fine-tuning run directory"),
        (["evaluate", str(run_dir), "--dataset", str(three)], "which this classifier does not know"),
        (["finetune", "data.dataset=vader-tweets", f"out_dir={tmp_path / 'x'}"], "is an out-of-domain evaluation set, never trained on"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "a,sports\n" * 20)
    with pytest.raises(LmforgeError, match="examples of one class only"):
        finetune(_cfg(tiny_prepared, tmp_path, one))
    (run_dir / "calibration.json").write_text("{}")
    with pytest.raises(LmforgeError, match="calibration.json is damaged"):
        read_temperature(run_dir)
