"""Classify texts with a fine-tuned run: label, probability of that label, and rating."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Sequence

import torch

from lmforge.data.sentiment import LABELS
from lmforge.data.text import READ_ARGS, invalid_utf8_warning, repair
from lmforge.data.tokenizers import TextTokenizer
from lmforge.errors import LmforgeError
from lmforge.eval.evaluate import predict_ids


def read_inputs(path: Path) -> list[str]:
    """Texts from a plain text file (one per line) or a .csv/.tsv file with a `text` column.

    Bytes that are not UTF-8 become U+FFFD, counted in one warning line. A file with no text at
    all is an error; an empty line among others is reported per line by `classify_texts`."""
    if not path.is_file():
        raise LmforgeError(f"input file not found: {path}")
    # utf-8-sig: a byte-order mark (Excel, Notepad) is not text; invalid bytes are repaired below.
    if path.suffix in (".csv", ".tsv"):
        with open(path, **READ_ARGS, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            try:
                if reader.fieldnames is not None and "text" not in reader.fieldnames:
                    raise LmforgeError(f"{path} has no 'text' column (columns: {', '.join(reader.fieldnames)}); "
                                       f"name the column of texts 'text' in the header row")
                texts = [row["text"] or "" for row in reader]
            except csv.Error as e:  # e.g. a field longer than the csv module's limit of 131072 characters
                raise LmforgeError(f"{path} is not a readable {path.suffix[1:]} file: {e}") from None
    else:
        # One text per line, a line ending at \n, \r\n or \r only: not at the form feeds, U+2028 and
        # other separators that str.splitlines() also splits on, which would shift every later result.
        with open(path, **READ_ARGS) as f:
            texts = [line[:-1] if line.endswith("\n") else line for line in f]
    repaired = [repair(text) for text in texts]
    bad_bytes = sum(bad for _, bad in repaired)
    if bad_bytes:
        print(invalid_utf8_warning(bad_bytes, str(path)), file=sys.stderr)
    texts = [text for text, _ in repaired]
    if not any(text.strip() for text in texts):
        raise LmforgeError(f"{path} has no text to classify (it is empty or blank); put one text per line")
    return texts


def classify_texts(model: torch.nn.Module, tokenizer: TextTokenizer, texts: list[str], max_len: int,
                   batch_size: int = 64, labels: Sequence[str] = LABELS, temperature: float = 1.0) -> list[dict]:
    """One dict per text: {"text", "label", "probability", "rating"} — or {"text", "error"} for an
    empty line. `labels` names the classifier's outputs; probabilities are softmax(logits /
    temperature), the run's calibration. Texts longer than max_len tokens are truncated with a
    warning on stderr."""
    results: list[dict] = [{} for _ in texts]
    todo = []
    for i, text in enumerate(texts):
        if not text.strip():
            results[i] = {"text": text, "error": "empty input"}
            print(f"warning: input {i + 1} is empty; skipped", file=sys.stderr)
        else:
            todo.append(i)
    encoded = tokenizer.encode_batch([texts[i] for i in todo])
    for i, ids in zip(todo, encoded):
        if len(ids) > max_len - 2:
            print(f"warning: input {i + 1} has {len(ids)} tokens; truncated to {max_len - 2}", file=sys.stderr)
    logits, ratings = predict_ids(model, tokenizer, encoded, max_len, batch_size)
    probs = (logits / temperature).softmax(-1)
    for r, i in enumerate(todo):
        label = int(probs[r].argmax())
        value = float(ratings[r])
        results[i] = {"text": texts[i], "label": labels[label], "probability": float(probs[r, label]),
                      "rating": None if math.isnan(value) else round(value, 4)}
    return results
