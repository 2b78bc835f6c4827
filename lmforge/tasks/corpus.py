"""What the pretraining objectives share: a run on prepared token shards (lmforge/data/prepared.py).

`CorpusTask` starts a run from cfg.data (the cached shards, tokenized once), resumes it on the very
shards it started on (recorded in data.json), writes tokenizer.json and data.json into the run,
and cuts the token stream into windows visited in a seeded order, one sampler per sequence length
of the schedule (data.long_seq_len). MLM, ELECTRA, distill-mlm and CLM differ only in the window
length they read (`window_extra`), their model and their loss.

With model.init_from a run continues pretraining a trained model (domain-adaptive pretraining,
Gururangan et al. 2020) instead of starting from random weights: the source's family, shape and
tokenizer are taken over, its weights loaded, and a head the source lacks (MiniLM is an encoder
only: no MLM head) starts from the family's seeded init, its decoder tied to the loaded embeddings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import ClassVar

import torch

from lmforge.config import Config, DataConfig
from lmforge.data.prepared import fill_vocab_size, prepared_data
from lmforge.data.shards import PreparedData
from lmforge.data.tokenizers import load_tokenizer
from lmforge.data.windows import Windows, WindowSampler, load_sampler_states, sampler_states
from lmforge.errors import LmforgeError
from lmforge.models.registry import build_model, check_family, family
from lmforge.runs.readers import LoadedModel
from lmforge.tasks.base import Task
from lmforge.tasks.loading import load_model, same_vocabulary, source_path, take_source_shape


class CorpusTask(Task):
    """A pretraining objective on prepared shards. Subclasses set `window_extra` (a window is
    data.seq_len + window_extra tokens: -2 leaves room for [CLS] and [SEP], +1 for the shifted
    targets) and implement build_model, batches, loss and evaluation."""

    window_extra: ClassVar[int] = 0
    kind: ClassVar[str] = ""  # the kind of model family it trains: encoder | decoder (lmforge/models/family.py)
    archs: ClassVar[tuple[str, ...]] = ()  # the families it is written for; () = every family of its kind
    loss_name: ClassVar[str] = ""  # how its loss is named in the headline: MLM, causal-LM
    data: PreparedData

    continues: ClassVar[bool] = True  # model.init_from is taken (False: refused, e.g. ELECTRA's two models)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.model.init_from is not None:
            if not cls.continues:
                raise LmforgeError(f"task.name={cls.name} starts from random weights; model.init_from is for "
                                   f"task.name=mlm and clm (set it to null)")
            if cfg.model.reinit_layers:
                raise LmforgeError("model.reinit_layers is for fine-tuning (task.name=classify); continued "
                                   "pretraining keeps every layer of model.init_from")
            if cfg.data.train_tokenizer_vocab is not None:
                raise LmforgeError(f"model.init_from={cfg.model.init_from} continues with its own tokenizer; "
                                   f"data.train_tokenizer_vocab would train another (set it to null)")
            return  # the family is the source's, read when the run starts
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
        source = cls.continued_source(cfg) if cfg.model.init_from is not None else None
        data = prepared_data(cfg, progress=cfg.train.progress, trained_kind=cls.trained_tokenizer())
        fill_vocab_size(cfg, data.tokenizer)
        torch.manual_seed(cfg.train.seed)  # model initialisation (with init_from: the heads the source lacks)
        model = cls.build_model(cfg)
        if source is not None:
            load_source_weights(model, source, cfg.model.init_from)
        return cls(cfg, data, model)

    @classmethod
    def continued_source(cls, cfg: Config) -> LoadedModel:
        """model.init_from's model, of this objective's kind; cfg.model takes its family and shape
        (but KEPT_FROM_CONFIG), data.tokenizer its tokenizer."""
        spec = cfg.model.init_from
        path = source_path(spec, cfg.data.cache_dir)
        loaded = load_model(path, mlm_head_required=False)
        arch = loaded.config.arch
        check_family(cls.name, arch, cls.kind, cls.archs)
        cfg.data.tokenizer = source_tokenizer(cfg, spec, path, loaded)
        take_source_shape(cfg, loaded.config)
        longest = cfg.data.long_seq_len or cfg.data.seq_len
        if longest > loaded.config.max_position_embeddings:
            raise LmforgeError(f"data.seq_len={longest} exceeds the {loaded.config.max_position_embeddings} positions "
                               f"of {spec}; set data.seq_len={loaded.config.max_position_embeddings} or lower")
        return loaded

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


def source_tokenizer(cfg: Config, spec: str, path: Path, loaded: LoadedModel) -> str:
    """The data.tokenizer a run continuing `spec` prepares its corpus with: the configured one
    when it is the source's vocabulary (the default bert-base-uncased is MiniLM's), the source's
    own file when data.tokenizer was left at its default, else a one-line error."""
    given = load_tokenizer(cfg.data.tokenizer, cfg.data.cache_dir)
    if same_vocabulary(given, loaded.tokenizer):
        return cfg.data.tokenizer
    if cfg.data.tokenizer == DataConfig().tokenizer:
        return str(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else str(path)
    raise LmforgeError(f"data.tokenizer={cfg.data.tokenizer} ({given.vocab_size} tokens) does not match the tokenizer "
                       f"of model.init_from={spec} ({loaded.tokenizer.vocab_size} tokens); drop data.tokenizer: a "
                       f"model continues with the tokenizer it was trained with")


def load_source_weights(model: torch.nn.Module, source: LoadedModel, spec: str) -> None:
    """The source's weights into the run's freshly initialised `model`: all of them, but a head the
    source lacks (its fresh MLM head, an NSP head), which keeps its seeded init. A tied decoder
    stays tied, so it starts as the loaded embeddings. Anything else that does not fit is an error."""
    state = source.model.state_dict()
    if source.fresh_mlm_head:  # initialised by the reader, not trained: the run's own seeded head instead
        state = {k: v for k, v in state.items() if not k.startswith("mlm_head.")}
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k not in expected or expected[k].shape != v.shape]
    encoder = getattr(family(source.config.arch).lm, "encoder_attr", None)  # None: a decoder has no heads to add
    missing = [k for k in expected if k not in state]
    if wrong or any(encoder is None or k.startswith(encoder + ".") for k in missing):
        raise LmforgeError(f"model.init_from={spec} does not fit this {source.config.arch} model "
                           f"({', '.join((wrong + missing)[:4])}); start from a pretraining run or a transformers "
                           f"model of the same family")
    model.load_state_dict(state, strict=False)
    fresh = sorted({k.split(".")[0] for k in missing})
    if fresh:
        print(f"note: model.init_from={spec} has no trained {', '.join(fresh)}: "
              f"{'they start' if len(fresh) > 1 else 'it starts'} from the family's init", file=sys.stderr)
