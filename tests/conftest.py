"""Shared fixtures: a tiny synthetic corpus, a tokenizer trained on it, and its prepared shards.

Everything is made here, offline, in a few seconds, so the default suite never needs the
network; the tests that exercise the bundled registry data say so in their names.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.data.corpora import open_corpus
from lmforge.data.shards import PreparedData, prepare
from lmforge.data.tokenizers import train_wordpiece

SUBJECTS = ["the cat", "a dog", "the old farmer", "my sister", "the president", "a small bird", "the river"]
VERBS = ["sees", "likes", "follows", "watches", "remembers", "crosses", "finds"]
OBJECTS = ["the hill", "a red apple", "the long road", "the city", "a quiet house", "the bright moon"]


def write_tiny_corpus(folder: Path, docs: int = 60, sentences: int = 30, seed: int = 0) -> Path:
    """`docs` text files of subject-verb-object sentences in which the subject decides the verb
    and the object, so a masked word is predictable from its context (unlike from unigram
    frequencies alone): learnable structure for tests that check that training learns."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        lines = []
        for _ in range(sentences):
            i = rng.randrange(len(SUBJECTS))
            lines.append(f"{SUBJECTS[i]} {VERBS[i]} {OBJECTS[i % len(OBJECTS)]}.")
        (folder / f"doc{d:03d}.txt").write_text(" ".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus") / "tiny")


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, tiny_corpus) -> PreparedData:
    corpus = open_corpus(str(tiny_corpus))
    tokenizer = train_wordpiece((t for _, t in corpus.documents()), 200)
    out = tmp_path_factory.mktemp("prepared") / "tiny"
    prepare(corpus, tokenizer, out, val_frac=0.2, split_seed=1, progress=False)
    return PreparedData(out)


@pytest.fixture()
def offline_datasets(monkeypatch, tmp_path):
    """The real `datasets` library, offline, with a cache of its own under tmp_path: local
    dataset folders load through it, and nothing is fetched."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return datasets


def tiny_finetune_config(tiny_prepared: PreparedData, tmp_path: Path, data_path: Path, *overrides: str):
    """A config fine-tuning a 2-layer, hidden-32 BERT classifier on `data_path`, runs under tmp_path/runs."""
    return load_config(None, [
        "task.name=classify", f"data.dataset={data_path}", f"data.tokenizer={tiny_prepared.folder / 'tokenizer.json'}",
        "data.seq_len=32", f"out_dir={tmp_path / 'runs'}", "model.hidden_size=32", "model.num_layers=2",
        "model.num_heads=2", "model.intermediate_size=64", "model.max_position_embeddings=64", "model.dropout=0",
        "train.batch_size=16", "train.max_steps=40", "train.eval_every=20", "train.checkpoint_every=20",
        "train.log_every=5", "train.progress=false", "optim.lr=3e-3", "optim.warmup_frac=0.1", *overrides])


def tiny_config(prepared: PreparedData, out_dir: Path, *overrides: str):
    """A config for a 2-layer, hidden-32 BERT on the tiny prepared corpus."""
    base = [
        f"data.corpus={prepared.folder}", "data.seq_len=32", f"out_dir={out_dir}",
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_position_embeddings=64", "model.vocab_size=null",
        "train.batch_size=8", "train.max_steps=12", "train.eval_every=6", "train.eval_batches=2",
        "train.log_every=1", "train.checkpoint_every=6", "train.progress=false", "optim.lr=1e-3",
        "optim.warmup_frac=0.1",
    ]
    return load_config(None, base + list(overrides))


def run_smoke(script: Path, *args: str, timeout: int = 900) -> dict:
    """Run a benchmark or experiment script in its tiny --smoke setting; its --json report."""
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--json", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def interrupt_during_step(monkeypatch, task_cls, at_step: int, sig: int = signal.SIGINT) -> None:
    """Make `task_cls.train_batch` send this process `sig` while drawing step `at_step`'s batch,
    as a user's Ctrl-C (SIGINT) or a scheduler's SIGTERM would: the loop finishes that step,
    checkpoints and stops."""
    original = task_cls.train_batch

    def train_batch(self, step, micro):
        if step == at_step:
            os.kill(os.getpid(), sig)
        return original(self, step, micro)

    monkeypatch.setattr(task_cls, "train_batch", train_batch)


class PicklePayload:
    """Unpickling this runs `touch PWNED_BY_PICKLE` in the current directory: the file a
    security test checks was never created."""

    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))
