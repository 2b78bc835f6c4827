"""Labelled text for classification: the bundled movie-review set and its out-of-domain
companions, local files, `datasets` names.

`movie-reviews` (default): 10,605 Rotten Tomatoes review snippets, each with the mean rating of
20+ human raters on -4..+4 (Hutto & Gilbert, ICWSM 2014; the Pang & Lee "MR" sentences), shipped
in the source release of the PyPI package vaderSentiment==3.3.2 (MIT). The sign of the rating is
the polarity; the 37 snippets rated exactly 0 have no polarity and are dropped. The rating itself
feeds the regression head. `vader-tweets` and `vader-nyt` are the same archive's tweets and New
York Times editorial snippets, in the same layout: out-of-domain sets a movie-review classifier
is evaluated on (`lmforge evaluate`) and never trained on. The archive's fourth set (product
reviews) is reserved for a check outside lmforge, and lmforge never reads it.

Local files: .csv / .tsv / .jsonl with a text column and a label column, optionally a rating
column. The labels come from the data (`labels_of`): 0/1 or negative/positive are the two
sentiment classes, negative/neutral/positive three, integers (star ratings) sort as numbers, any
other names alphabetically. `hf:NAME[:CONFIG]` loads a Hugging Face dataset (online users):
glue/sst2, imdb, rotten_tomatoes; those have no rating, so the rating head is switched off.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lmforge.data.packages import fetch_package
from lmforge.errors import LmforgeError

MR_DIST, MR_VERSION = "vaderSentiment", "3.3.2"
ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
# name: (member of the archive, its sha256); each file is id, mean rating -4..+4, text; CRLF
BUNDLED = {
    "movie-reviews": ("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                      "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"),
    "vader-tweets": ("hutto_ICWSM_2014/tweets_GroundTruth.txt",
                     "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f"),
    "vader-nyt": ("hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
                  "7d8fbcce7dde5d716da53e78f4ef4be6b706e9ef1e1d51887e6d0ad4b69cc27e"),
}
EVALUATION_ONLY = ("vader-tweets", "vader-nyt")  # out of the movie reviews' domain: for evaluating, never training
LABELS = ("negative", "positive")  # the two sentiment classes (movie-reviews, 0/1 files)
THREE_WAY = ("negative", "neutral", "positive")
SENTIMENT_NAMES = {"0": "negative", "1": "positive", "neg": "negative", "negative": "negative", "pos": "positive",
                   "positive": "positive", "neu": "neutral", "neutral": "neutral"}


@dataclass
class Example:
    text: str
    label: int  # index into LabeledData.labels
    rating: Optional[float] = None  # -4..+4 for movie-reviews; None when the source has none


@dataclass
class LabeledData:
    name: str
    identity: str  # sha256 of the source file, or the dataset name
    examples: list[Example]
    rating_range: Optional[tuple[float, float]]  # None: no ratings, the rating head is off
    labels: tuple[str, ...] = LABELS  # the class names, in the order of the classifier's outputs


def load_bundled(name: str, cache_dir: Optional[str] = None) -> LabeledData:
    """One of BUNDLED's sets, checked against its sha256; polarity = the sign of the mean rating,
    the snippets rated exactly 0 dropped."""
    member, sha256 = BUNDLED[name]
    root = fetch_package(MR_DIST, MR_VERSION, source=True, cache_dir=cache_dir)
    archive = root / ARCHIVE
    if not archive.is_file():
        raise LmforgeError(f"{archive} is missing from the {MR_DIST} source release; delete {root} and retry")
    with tarfile.open(archive) as tf:
        raw = tf.extractfile(member).read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise LmforgeError(f"{member} has sha256 {digest[:12]}..., expected {sha256[:12]}...; "
                           f"delete {root} and retry")
    examples = []
    for line in raw.decode("utf-8").splitlines():  # the files have CRLF line ends
        if not line.strip():
            continue
        _, rating, text = line.split("\t", 2)
        value = float(rating)
        if value == 0.0:  # exactly neutral: no polarity
            continue
        examples.append(Example(text.strip(), int(value > 0), value))
    return LabeledData(name, f"sha256:{sha256}", examples, (-4.0, 4.0))


def load_movie_reviews(cache_dir: Optional[str] = None) -> LabeledData:
    return load_bundled("movie-reviews", cache_dir)


def labels_of(values: list[object], where: str) -> tuple[tuple[str, ...], list[int]]:
    """(class names, each value's class index) for a column of raw labels. Values that are all
    0/1 or sentiment names (neg/negative/pos/positive, and neu/neutral) are the sentiment classes:
    ("negative", "positive"), or ("negative", "neutral", "positive") when a neutral one occurs;
    integers are classes sorted as numbers ("1".."5" for star ratings); anything else sorts
    alphabetically. A column mixing sentiment names with other names is an error (a typo, most
    likely), as is an empty label."""
    names = []
    for i, value in enumerate(values):
        if value is None or isinstance(value, (list, dict)):
            raise LmforgeError(f"{where} row {i + 1}: label {value!r} is not a class name or number")
        if isinstance(value, bool) or (isinstance(value, float) and value.is_integer()):  # JSON true, 1.0
            value = int(value)
        name = str(value).strip()
        if not name:
            raise LmforgeError(f"{where} row {i + 1}: the label is empty")
        names.append(name)
    known = {n: SENTIMENT_NAMES.get(n.lower()) for n in set(names)}
    if all(known.values()):
        found = set(known.values())
        classes = THREE_WAY if "neutral" in found else LABELS
        return classes, [classes.index(known[n]) for n in names]
    sentiment_words = sorted(n for n, k in known.items() if k and not n.isdigit())
    if sentiment_words:
        odd = sorted(n for n, k in known.items() if not k)
        raise LmforgeError(f"{where}: label {odd[0]!r} is not a sentiment class, but {sentiment_words[0]!r} is; use "
                           f"negative/neutral/positive (or 0/1) throughout, or your own names throughout")
    if all(_is_int(n) for n in known):
        classes = tuple(sorted(known, key=int))
    else:
        classes = tuple(sorted(known))
    return classes, [classes.index(n) for n in names]


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def load_labeled_file(path: Path, text_col: str = "text", label_col: str = "label",
                      rating_col: str = "rating") -> LabeledData:
    """A .csv, .tsv or .jsonl file with text and label columns (rating optional)."""
    try:  # utf-8-sig: a byte-order mark (Excel, Notepad) is not part of the first column's name
        if path.suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8-sig") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError:  # JSONDecodeError, or an integer of more than 4300 digits
                            raise LmforgeError(f"{path} line {i + 1} is not valid JSON") from None
                        if not isinstance(rows[-1], dict):
                            raise LmforgeError(f"{path} line {i + 1} is not a JSON object with a text and a label")
        elif path.suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8-sig", newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        else:
            raise LmforgeError(f"{path}: use a .csv, .tsv or .jsonl file")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x}); save it as UTF-8") from None
    except csv.Error as e:  # e.g. a field longer than the csv module's limit of 131072 characters
        raise LmforgeError(f"{path} is not a readable {path.suffix[1:]} file: {e}") from None
    if not rows:
        raise LmforgeError(f"{path} has no rows; give a header row ({text_col}, {label_col}[, {rating_col}]) "
                           f"and one example per row")
    missing = [c for c in (text_col, label_col) if c not in rows[0]]
    if missing:
        raise LmforgeError(f"{path} has no column {missing[0]!r} (columns: {', '.join(map(str, rows[0]))}); "
                           f"name its columns {text_col} and {label_col} in the header row")
    has_rating = rating_col in rows[0]
    classes, label_ids = labels_of([row.get(label_col) for row in rows], str(path))
    examples, ratings = [], []
    for i, row in enumerate(rows):
        where = f"{path} row {i + 1}"
        rating = None
        if has_rating:
            try:
                rating = float(row.get(rating_col))
            except (TypeError, ValueError):
                raise LmforgeError(f"{where}: rating {row.get(rating_col)!r} is not a number") from None
            ratings.append(rating)
        if row.get(text_col) is None:  # a jsonl object without it, a csv row shorter than the header
            raise LmforgeError(f"{where} has no {text_col!r}")
        examples.append(Example(str(row[text_col]), label_ids[i], rating))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    rating_range = (min(ratings), max(ratings)) if has_rating else None
    return LabeledData(str(path), f"sha256:{digest}", examples, rating_range, classes)


HF_FIELDS = {"glue": ("sentence", "label"), "stanfordnlp/sst2": ("sentence", "label"),
             "imdb": ("text", "label"), "stanfordnlp/imdb": ("text", "label"),
             "rotten_tomatoes": ("text", "label"), "cornell-movie-review-data/rotten_tomatoes": ("text", "label")}


def load_hf_labeled(spec: str) -> LabeledData:
    """`hf:NAME[:CONFIG]`, train split only (lmforge makes its own split), no ratings."""
    name, _, config = spec[3:].partition(":")
    try:
        import datasets
    except ImportError:
        raise LmforgeError("dataset 'hf:...' needs the `datasets` package: pip install 'lmforge[hf]'") from None
    text_col, label_col = HF_FIELDS.get(name, ("text", "label"))
    ds = datasets.load_dataset(name, config or None, split="train")
    feature = ds.features.get(label_col)
    raw = ds[label_col]
    if getattr(feature, "names", None):  # a ClassLabel: its names, in its order
        raw = [feature.names[v] for v in raw]
    classes, label_ids = labels_of(raw, spec)
    examples = [Example(row[text_col], y) for row, y in zip(ds, label_ids)]
    return LabeledData(spec, spec, examples, None, classes)


def load_labeled(spec: str, cache_dir: Optional[str] = None) -> LabeledData:
    """A dataset by name (movie-reviews, vader-tweets, vader-nyt), a local file or hf:NAME."""
    if spec in BUNDLED:
        return load_bundled(spec, cache_dir)
    if spec.startswith("hf:"):
        return load_hf_labeled(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return load_labeled_file(path)
    raise LmforgeError(f"unknown dataset '{spec}': use {', '.join(BUNDLED)}, a .csv/.tsv/.jsonl file, or "
                       f"hf:NAME[:CONFIG]")


def stratified_split(labels: list[int], seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
                     ) -> dict[str, list[int]]:
    """Indices for train/validation/test, each label split in the same proportions, shuffled by a
    seeded RNG (the same on every machine and Python version)."""
    out: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        random.Random(f"{seed}:{label}").shuffle(idx)
        n_train = round(fractions[0] * len(idx))
        n_val = round(fractions[1] * len(idx))
        out["train"] += idx[:n_train]
        out["validation"] += idx[n_train:n_train + n_val]
        out["test"] += idx[n_train + n_val:]
    return {k: sorted(v) for k, v in out.items()}


def stratified_subset(indices: list[int], labels: list[int], n: int, seed: int) -> list[int]:
    """`n` of `indices` (or all, if fewer), each label keeping its share, chosen by a seeded RNG:
    a few-sample training set (data.train_examples) whose validation and test splits stay whole."""
    if n >= len(indices):
        return sorted(indices)
    by_label: dict[int, list[int]] = {}
    for i in indices:
        by_label.setdefault(labels[i], []).append(i)
    out = []
    for label, idx in sorted(by_label.items()):
        random.Random(f"{seed}:subset:{label}").shuffle(idx)
        out += idx[:max(1, round(n * len(idx) / len(indices)))]
    return sorted(out)
