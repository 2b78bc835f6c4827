"""Classification metrics (lmforge/eval/metrics.py) against hand-computed cases."""

import pytest
import torch

from lmforge.eval.metrics import (accuracy_by_length, classification_metrics, expected_calibration_error,
                                  fit_temperature, plot_reliability, reliability_bins)


def one_hot_probs(predicted, classes, confidence=0.8):
    probs = torch.full((len(predicted), classes), (1 - confidence) / (classes - 1))
    probs[torch.arange(len(predicted)), torch.tensor(predicted)] = confidence
    return probs


def test_three_classes_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    probs = one_hot_probs([0, 1, 1, 1, 2, 0], 3)
    m = classification_metrics(probs, labels, ["neg", "neu", "pos"], lengths=[3, 20, 20, 40, 200, 5])
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class: tp / fp / fn = 1/1/1, 2/1/0, 1/0/1
    assert m["f1"] == pytest.approx({"neg": 0.5, "neu": 0.8, "pos": 2 / 3})
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["majority_accuracy"] == pytest.approx(2 / 6)
    # every prediction has confidence 0.8; 4 of 6 are right: ECE = |4/6 - 0.8|
    assert m["ece"] == pytest.approx(0.8 - 4 / 6, abs=1e-6)
    assert m["nll"] == pytest.approx(-(4 * torch.tensor(0.8).log() + 2 * torch.tensor(0.1).log()).item() / 6,
                                     rel=1e-5)
    assert m["accuracy_by_length"] == [{"tokens": "0-15", "count": 2, "accuracy": 0.5},
                                       {"tokens": "16-31", "count": 2, "accuracy": 0.5},
                                       {"tokens": "32-63", "count": 1, "accuracy": 1.0},
                                       {"tokens": "128+", "count": 1, "accuracy": 1.0}]


def test_a_calibrated_toy_has_zero_ece_and_an_overconfident_one_its_gap():
    # 10 predictions at confidence 0.7, 7 of them right; 5 at confidence 0.6, 3 right: calibrated
    probs = torch.tensor([[0.7, 0.3]] * 10 + [[0.4, 0.6]] * 5)
    labels = torch.tensor([0] * 7 + [1] * 3 + [1] * 3 + [0] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-6)
    bins = reliability_bins(probs, labels)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 15
    assert [b["count"] for b in bins if b["count"]] == [5, 10]  # 0.6 in [0.6, 0.667), 0.7 in [0.667, 0.733)
    # confidence 0.9 everywhere, half right: ECE 0.4
    probs = torch.tensor([[0.9, 0.1]] * 10)
    labels = torch.tensor([0, 1] * 5)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4, abs=1e-6)


def test_confidence_one_goes_in_the_top_bin():
    bins = reliability_bins(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert bins[-1]["count"] == 1 and bins[-1]["accuracy"] == 1.0


def test_rating_mae_leaves_out_examples_without_a_rating():
    m = classification_metrics(one_hot_probs([0, 1, 1], 2), torch.tensor([0, 1, 0]), ["a", "b"],
                               ratings=torch.tensor([0.5, 1.0, -1.0]),
                               true_ratings=torch.tensor([1.0, float("nan"), -2.0]))
    assert m["rating_mae"] == pytest.approx(0.75)


def test_temperature_scaling_recovers_the_temperature_the_labels_were_drawn_at():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 3, generator=g) * 4
    labels = torch.multinomial((logits / 2.5).softmax(-1), 1, generator=g).squeeze(1)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.5, rel=0.05)
    before = expected_calibration_error(logits.softmax(-1), labels)
    after = expected_calibration_error((logits / t).softmax(-1), labels)
    assert after < before / 3 and after < 0.02


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="probs is"):
        classification_metrics(torch.rand(4, 3), torch.tensor([0, 1, 0, 1]), ["a", "b"])


def test_reliability_diagram_is_written(tmp_path):
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    plot_reliability(reliability_bins(probs, torch.tensor([0, 1, 1])), tmp_path / "r.png", "test")
    assert (tmp_path / "r.png").stat().st_size > 1000
