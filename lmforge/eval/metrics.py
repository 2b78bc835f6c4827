"""Classification metrics from predicted probabilities: what `lmforge evaluate` and a fine-tuning
run's summary report.

Pure functions of tensors (probabilities (n, classes), labels (n,)), for any number of classes:
accuracy, macro-F1 (the unweighted mean of the per-class F1, so a rare class counts as much as a
common one), the confusion matrix, expected calibration error with its reliability bins, accuracy
by input length, and temperature scaling (the one-parameter recalibration of Guo et al. 2017,
"On Calibration of Modern Neural Networks"), which changes confidences and never the argmax.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

ECE_BINS = 15  # Guo et al.'s choice; the bins split confidence [0, 1] into equal widths


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(classes, classes) int64 counts, row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def f1_per_class(confusion: torch.Tensor) -> list[float]:
    """F1 of each class, one against the rest: 2 tp / (2 tp + fp + fn); 0 for a class that was
    neither present nor predicted (nothing to get right)."""
    tp = confusion.diag().double()
    fp = confusion.sum(0).double() - tp
    fn = confusion.sum(1).double() - tp
    denominator = 2 * tp + fp + fn
    return [float(2 * t / d) if d > 0 else 0.0 for t, d in zip(tp, denominator)]


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin (equal widths over [0, 1], the top one closed): its bounds, how many
    predictions fell in it, their mean confidence and their accuracy (None when empty).
    Confidence = the probability of the predicted class."""
    confidence, predicted = probs.float().max(-1)
    correct = (predicted == labels).float()
    index = (confidence * bins).long().clamp(0, bins - 1)  # confidence 1.0 goes in the last bin
    out = []
    for b in range(bins):
        members = index == b
        n = int(members.sum())
        out.append({"low": b / bins, "high": (b + 1) / bins, "count": n,
                    "confidence": float(confidence[members].mean()) if n else None,
                    "accuracy": float(correct[members].mean()) if n else None})
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: the mean over predictions of |accuracy - confidence| of their bin, i.e. the sum over
    bins of (bin's share of predictions) x |its accuracy - its mean confidence|. 0 = calibrated."""
    n = len(labels)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
               for b in reliability_bins(probs, labels, bins) if b["count"])


def accuracy_by_length(correct: torch.Tensor, lengths: Sequence[int],
                       edges: Sequence[int] = (16, 32, 64, 128)) -> list[dict]:
    """Accuracy per input-length bucket (tokens): [0, 16), [16, 32), ..., [128, inf); empty
    buckets left out. `correct` is (n,) bool."""
    lengths = torch.as_tensor(list(lengths))
    bounds = [0, *edges, None]
    out = []
    for low, high in zip(bounds[:-1], bounds[1:]):
        members = (lengths >= low) & (lengths < high) if high is not None else lengths >= low
        n = int(members.sum())
        if n:
            out.append({"tokens": f"{low}-{high - 1}" if high is not None else f"{low}+", "count": n,
                        "accuracy": float(correct[members].float().mean())})
    return out


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, label_names: Sequence[str], *,
                           ratings: Optional[torch.Tensor] = None, true_ratings: Optional[torch.Tensor] = None,
                           lengths: Optional[Sequence[int]] = None, bins: int = ECE_BINS) -> dict:
    """Everything `lmforge evaluate` prints, JSON-ready: accuracy, macro_f1, f1 per class, nll,
    ece, reliability bins, the confusion matrix, the majority-class accuracy (the guess to beat),
    rating_mae when both rating tensors are given (examples without a true rating, NaN, left
    out), and accuracy_by_length when `lengths` is given."""
    num_classes = len(label_names)
    if probs.dim() != 2 or probs.size(1) != num_classes or len(labels) != len(probs):
        raise ValueError(f"probs is (n, {num_classes}) and labels (n,); got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")
    labels = labels.long()
    predicted = probs.argmax(-1)
    confusion = confusion_matrix(predicted, labels, num_classes)
    f1 = f1_per_class(confusion)
    counts = confusion.sum(1)
    out = {"examples": len(labels), "accuracy": float((predicted == labels).float().mean()),
           "macro_f1": sum(f1) / num_classes, "f1": dict(zip(label_names, f1)),
           "nll": float(-probs.float().clamp_min(1e-12).log().gather(1, labels[:, None]).mean()),
           "ece": expected_calibration_error(probs, labels, bins),
           "majority_accuracy": float(counts.max()) / len(labels),
           "majority_label": label_names[int(counts.argmax())],
           "confusion": confusion.tolist(), "labels": list(label_names),
           "reliability": reliability_bins(probs, labels, bins)}
    if ratings is not None and true_ratings is not None:
        known = ~torch.isnan(true_ratings.float()) & ~torch.isnan(ratings.float())
        if bool(known.any()):
            out["rating_mae"] = float((ratings.float()[known] - true_ratings.float()[known]).abs().mean())
    if lengths is not None:
        out["accuracy_by_length"] = accuracy_by_length(predicted == labels, lengths)
    return out


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The temperature T > 0 that minimises the negative log-likelihood of softmax(logits / T) on
    (logits, labels), a validation split's: L-BFGS on log T, from T = 1. T > 1 softens
    over-confident predictions; the predicted class never changes."""
    logits, labels = logits.detach().double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def plot_reliability(bins: list[dict], path, title: str = "") -> None:
    """The reliability diagram: accuracy against confidence per bin (bars), the diagonal a
    calibrated model follows, and how many predictions each bin holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = bins[0]["high"] - bins[0]["low"]
    full = [b for b in bins if b["count"]]
    top.bar([b["low"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
            edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    top.legend(loc="upper left")
    bottom.bar([b["low"] for b in bins], [b["count"] for b in bins], width=width, align="edge", color="gray")
    bottom.set(xlabel="confidence (probability of the predicted class)", ylabel="predictions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
