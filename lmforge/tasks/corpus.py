"""What the pretraining objectives share: a run on prepared token shards (lmforge/data/prepared.py).

`CorpusTask` starts a run from cfg.data (the cached shards, tokenized once), resumes it on the very
shards it started on (recorded in data.json), writes tokenizer.json and data.json into the run,
and cuts the token stream into windows visited in a seeded order, one sampler per sequence length
of the schedule (data.long_seq_len). MLM, ELECTRA, distill-mlm and CLM differ only in the window
length they read (`window_extra`), their model and their loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch

from lmforge.config import Config
from lmforge.data.prepared import fill_vocab_size, prepared_data
from lmforge.data.shards import PreparedData
from lmforge.data.tokenizers import load_tokenizer
from lmforge.data.windows import Windows, WindowSampler, load_sampler_states, sampler_states
from lmforge.errors import LmforgeError
from lmforge.models.registry import build_model, check_family
from lmforge.tasks.base import Task


class CorpusTask(Task):
    """A pretraining objective on prepared shards. Subclasses set `window_extra` (a window is
    data.seq_len + window_extra tokens: -2 leaves room for [CLS] and [SEP], +1 for the shifted
    targets) and implement build_model, batches, loss and evaluation."""

    window_extra: ClassVar[int] = 0
    kind: ClassVar[str] = ""  # the kind of model family it trains: encoder | decoder (lmforge/models/family.py)
    archs: ClassVar[tuple[str, ...]] = ()  # the families it is written for; () = every family of its kind
    loss_name: ClassVar[str] = ""  # how its loss is named in the headline: MLM, causal-LM
    data: PreparedData

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        check_family(cls.name, cfg.model.arch, cls.kind, cls.archs)

    @classmethod
    def build_model(cls, cfg: Config) -> torch.nn.Module:
        return build_model(cfg.model)

    @classmethod
    def headline(cls, summary: dict) -> str:
        perplexity = f", perplexity {summary['val_perplexity']:.1f}" if "val_perplexity" in summary else ""
        return (f"held-out {cls.loss_name} loss {summary['val_loss']:.4f} vs unigram baseline "
                f"{summary['unigram_val_loss']:.4f} (accuracy {summary['val_accuracy']:.1%}{perplexity})")

    def __init__(self, cfg: Config, data: PreparedData, model: torch.nn.Module):
        self.cfg, self.data, self.model = cfg, data, model
        self.tokenizer = data.tokenizer

    # -- a run of it ------------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: Config) -> "CorpusTask":
        # Every rank, no collective: the first to take the cache's file lock tokenizes the corpus
        # (and shows the progress bar), the others wait on the lock, then read it (a collective
        # here would time out on a large corpus).
        data = prepared_data(cfg, progress=cfg.train.progress, trained_kind=cls.trained_tokenizer())
        fill_vocab_size(cfg, data.tokenizer)
        torch.manual_seed(cfg.train.seed)  # model initialisation
        return cls(cfg, data, cls.build_model(cfg))

    @classmethod
    def reopen(cls, cfg: Config, run_dir: Path) -> "CorpusTask":
        return cls(cfg, cls.reopen_data(cfg, run_dir), cls.build_model(cfg))

    @classmethod
    def reopen_data(cls, cfg: Config, run_dir: Path) -> PreparedData:
        """The shards `run_dir` started on (data.json), else made again (deterministically), with
        the run's own tokenizer."""
        info = run_dir / "data.json"
        recorded = json.loads(info.read_text())["prepared"] if info.is_file() else None
        if recorded and (Path(recorded) / "manifest.json").is_file():
            data = PreparedData(recorded)  # the very shards the run started on
        else:
            data = prepared_data(cfg, progress=cfg.train.progress,  # deterministic: re-made identically
                                 trained_kind=cls.trained_tokenizer())
        if data.tokenizer.sha256 != load_tokenizer(str(run_dir / "tokenizer.json")).sha256:
            raise LmforgeError(f"the prepared data {data.folder} uses another tokenizer than {run_dir}; cannot resume")
        return data

    @classmethod
    def trained_tokenizer(cls) -> str:
        """The kind of vocabulary data.train_tokenizer_vocab trains: byte-level BPE for a decoder
        (it can write any text back), WordPiece for an encoder (BERT's [CLS]/[SEP]/[MASK])."""
        return "bpe" if cls.kind == "decoder" else "wordpiece"

    def write_run_files(self, run_dir: Path) -> None:
        self.data.tokenizer.save(run_dir / "tokenizer.json")
        info = {"prepared": str(self.data.folder), "tokenizer_sha256": self.data.tokenizer.sha256,
                **self.data.manifest["splits"]}
        (run_dir / "data.json").write_text(json.dumps(info, indent=2) + "\n")

    def describe(self) -> str:
        return f"{super().describe()}, data {self.data.folder}"

    # -- windows of the token stream ----------------------------------------------------------------
    def setup_windows(self, long_windows: bool = True) -> None:
        """Train and validation windows of data.seq_len + window_extra tokens, a seeded sampler of
        the train windows, and (`long_windows`, with data.long_seq_len) a sampler of its own for
        the long steps of the sequence-length schedule. Refuses a split too short for a window."""
        cfg, data, extra = self.cfg, self.data, self.window_extra
        length = cfg.data.seq_len + extra
        self.train_windows = Windows(data.shards("train"), length)
        self.val_windows = Windows(data.shards("validation"), length)
        for split, w in (("train", self.train_windows), ("validation", self.val_windows)):
            if len(w) == 0:
                raise LmforgeError(f"the {split} split of {data.folder} has fewer than {self._tokens('data.seq_len')} "
                                   f"tokens; use a bigger corpus or a shorter data.seq_len")
        self.sampler = WindowSampler(self.train_windows, cfg.train.seed)
        self.samplers = {cfg.data.seq_len: self.sampler}
        long = cfg.data.long_seq_len
        if long is not None and long_windows:
            self.samplers[long] = WindowSampler(Windows(data.shards("train"), long + extra), cfg.train.seed)
            if len(self.samplers[long].windows) == 0:
                raise LmforgeError(f"the train split of {data.folder} has fewer than "
                                   f"{self._tokens('data.long_seq_len')} tokens; use a bigger corpus or a shorter "
                                   f"data.long_seq_len")

    def _tokens(self, key: str) -> str:
        """How the window length reads in an error: 'data.seq_len=128' or 'data.seq_len + 1 = 129'."""
        value = getattr(self.cfg.data, key.split(".")[1])
        if self.window_extra > 0:
            return f"{key} + {self.window_extra} = {value + self.window_extra}"
        return f"{key}={value}"

    def data_state(self) -> dict:
        return sampler_states(self.samplers, self.cfg.data.seq_len)

    def load_data_state(self, state: dict) -> None:
        load_sampler_states(self.samplers, self.cfg.data.seq_len, state)
