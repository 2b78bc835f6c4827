"""A classifier measured on labelled examples: what `lmforge evaluate` prints and writes, and what
a fine-tuning run reports on its out-of-domain sets.

    texts -> tokens ([CLS] text [SEP], cut to the run's length) -> logits, ratings (length-sorted batches)
          -> probabilities softmax(logits / T) (T: the run's temperature, fitted on validation)
          -> accuracy, macro-F1, ECE and reliability, confusion, accuracy by length, rating MAE

The labels of the data are matched to the classifier's by name, so a file labelled 0/1 or
negative/positive evaluates a movie-review run; a label the classifier does not know is an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from lmforge.data.padding import mask_if_padded, pad_rows
from lmforge.data.sentiment import LabeledData
from lmforge.data.tokenizers import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.eval.metrics import classification_metrics, expected_calibration_error, plot_reliability
from lmforge.files import write_text_atomic


@torch.no_grad()  # not inference_mode: a sharded engine's gathered parameters stay usable for training
def predict_ids(model: torch.nn.Module, tokenizer: TextTokenizer, encoded: Sequence[Sequence[int]], max_len: int,
                batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, classes) float32, ratings (n,) float32, NaN without a rating head) for token
    ids without special tokens, each cut to max_len - 2 and framed as [CLS] ids [SEP]; batches of
    similar lengths (little padding), results in input order. The model's mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    logits, ratings = [None] * len(encoded), [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows = [[tokenizer.cls_id, *encoded[i][: max_len - 2], tokenizer.sep_id] for i in chunk]
        ids, mask = pad_rows(rows, tokenizer.pad_id)
        mask = mask_if_padded(mask, sum(map(len, rows)))
        out = model(ids.to(device), attention_mask=None if mask is None else mask.to(device))
        batch_logits = out.logits.float().cpu()
        batch_ratings = out.rating.float().cpu() if out.rating is not None else torch.full((len(chunk),), math.nan)
        for r, i in enumerate(chunk):
            logits[i], ratings[i] = batch_logits[r], batch_ratings[r]
    model.train(was_training)
    if not encoded:
        return torch.zeros(0, model.polarity.out_features), torch.zeros(0)
    return torch.stack(logits), torch.stack(ratings)


def class_indices(data: LabeledData, classes: Sequence[str]) -> torch.Tensor:
    """(n,) int64: each example's label as an index into the classifier's `classes`, matched by
    name; an error naming the first label the classifier does not have."""
    used = sorted({e.label for e in data.examples})
    unknown = [data.labels[k] for k in used if data.labels[k] not in classes]
    if unknown:
        raise LmforgeError(f"{data.name} has label {unknown[0]!r}, which this classifier does not know (its "
                           f"classes: {', '.join(classes)}); evaluate it on data labelled with those")
    to_run = [classes.index(name) if name in classes else -1 for name in data.labels]
    return torch.tensor([to_run[e.label] for e in data.examples], dtype=torch.long)


def evaluate_examples(model: torch.nn.Module, tokenizer: TextTokenizer, data: LabeledData, classes: Sequence[str],
                      max_len: int, temperature: float = 1.0, batch_size: int = 64) -> dict:
    """classification_metrics (lmforge/eval/metrics.py) of the model on `data`'s examples, with
    probabilities softmax(logits / temperature); also `ece_uncalibrated` (at T = 1), the
    temperature, and rating_mae where both the data and the model have ratings. JSON-ready."""
    if not data.examples:
        raise LmforgeError(f"{data.name} has no examples to evaluate")
    labels = class_indices(data, classes)
    encoded = tokenizer.encode_batch([e.text for e in data.examples])
    logits, ratings = predict_ids(model, tokenizer, encoded, max_len, batch_size)
    true_ratings = torch.tensor([math.nan if e.rating is None else e.rating for e in data.examples])
    lengths = [min(len(ids), max_len - 2) + 2 for ids in encoded]
    probs = (logits / temperature).softmax(-1)
    out = classification_metrics(probs, labels, list(classes), ratings=ratings, true_ratings=true_ratings,
                                 lengths=lengths)
    out.update(dataset=data.name, identity=data.identity, temperature=temperature,
               ece_uncalibrated=expected_calibration_error(logits.softmax(-1), labels),
               truncated=sum(len(ids) > max_len - 2 for ids in encoded))
    return out


def print_evaluation(result: dict) -> None:
    """The human-readable report of evaluate_examples' result."""
    r = result
    print(f"{r['dataset']}: {r['examples']:,} examples, {len(r['labels'])} classes")
    print(f"  accuracy {r['accuracy']:.4f} (majority class '{r['majority_label']}': {r['majority_accuracy']:.4f})  "
          f"macro-F1 {r['macro_f1']:.4f}" + (f"  rating MAE {r['rating_mae']:.3f}" if "rating_mae" in r else ""))
    print(f"  ECE {r['ece']:.4f} at temperature {r['temperature']:.3f} (at 1: {r['ece_uncalibrated']:.4f}), "
          f"NLL {r['nll']:.4f}")
    width = max(len(name) for name in r["labels"])
    print("  confusion (rows: true, columns: predicted)")
    print("  " + " " * width + " " + " ".join(f"{name:>{max(width, 6)}}" for name in r["labels"]))
    for name, row in zip(r["labels"], r["confusion"]):
        print(f"  {name:>{width}} " + " ".join(f"{n:>{max(width, 6)}}" for n in row))
    print("  accuracy by length (tokens): " + ", ".join(f"{b['tokens']}: {b['accuracy']:.3f} ({b['count']})"
                                                      for b in r["accuracy_by_length"]))
    if r.get("files"):
        print(f"  wrote {', '.join(r['files'])}")


def write_evaluation(result: dict, out_dir: Path, stem: str) -> list[str]:
    """OUT_DIR/STEM.json (the result), STEM-reliability.png and STEM-confusion.png; returns their
    paths. The same model on the same data writes the same files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}-reliability.png", out_dir / f"{stem}-confusion.png"]
    write_text_atomic(paths[0], json.dumps(result, indent=1) + "\n")
    plot_reliability(result["reliability"], paths[1],
                     f"{result['dataset']}: ECE {result['ece']:.3f} (T = {result['temperature']:.2f})")
    plot_confusion(np.array(result["confusion"]), result["labels"], paths[2],
                   f"{result['dataset']}: accuracy {result['accuracy']:.3f}")
    return [str(p) for p in paths]


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], path: Path, title: Optional[str] = None) -> None:
    """The confusion matrix as a picture: counts in cells, rows true, columns predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 3 + 0.5 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 0.5, size))
    ax.imshow(matrix, cmap="Blues")
    for (y, x), n in np.ndenumerate(matrix):
        ax.text(x, y, str(n), ha="center", va="center", color="black" if n < matrix.max() / 2 else "white")
    ticks = list(range(len(labels)))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=labels, yticklabels=labels, xlabel="predicted", ylabel="true",
           title=title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
