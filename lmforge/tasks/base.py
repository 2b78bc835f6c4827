"""What an objective is: to the training loop a model, batches, a loss, metrics; to the rest of
lmforge (the registry, lmforge/tasks/registry.py) also how a run of it starts, resumes, builds its
model, is loaded back and is summed up. One objective, one file, one `Task` subclass.

The loop (lmforge/train/loop.py) calls, per optimizer step:
    batches = [task.train_batch(step, micro) for micro in range(micro_batches)]
    for each: out = task.loss(model, batch); (out.loss_sum / total_targets).backward()
and every `eval_every` steps `task.evaluate(model)`. Dividing summed losses by the number of
targets in the whole step (known before any forward pass, because masking happens when the
batch is drawn) makes k accumulated micro-batches give exactly the gradient of one batch k times
larger, even when micro-batches hold different numbers of masked tokens. A loss part that is a
mean over something else (NSP: over examples; ELECTRA's detection: over real tokens) names that
count in `Batch.counts` and its sum in `LossOutput.terms`; the loop divides it by the step's
total of that count, so every part is a mean over the whole global batch.

The rule every task keeps: a step is a function of its global batch alone. However the step is
cut into micro-batches (train.batch_size x train.grad_accum_steps) and ranks, row g of the step
is the same example with the same random draws (`step_rows` gives a batch's global row indices;
draws are keyed by (seed, step, g), never by the micro-batch), and the loss is the same mean.

`train_batch(step, micro)` must be a pure function of (seed, step, micro) and the state returned
by `data_state()`, so that a resumed run draws exactly the batches the uninterrupted run drew.
Its shape (sequence length, rows) is `self.step_shape(step)`: the step's shape under the
sequence-length schedule and the batch-size ramp (lmforge/train/schedule.py), which the loop
reads too (for the number of micro-batches).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from lmforge import distributed
from lmforge.config import Config
from lmforge.runs.readers import (LoadedModel, check_tokenizer_fits, load_checkpoint_weights, load_run_tokenizer,
                                  run_weights)
from lmforge.train.interface import Batch, EvalResult, LossOutput, Table, TrainableTask
from lmforge.train.schedule import BatchSchedule, StepShape

__all__ = ["Batch", "EvalResult", "LossOutput", "Table", "Task", "TrainableTask"]


class Task(ABC):
    """A model, its batches, its loss and its metrics: all the loop needs.

    Data parallelism: `shard` is (rank, world size) of the process the task was built in (the
    process group is joined before any task is built). `train_batch` then returns this rank's rows
    of the step's global batch (world x train.batch_size rows), which are the same rows, with the
    same random masks, that one process with the whole batch would make, so results do not depend
    on the number of processes. (A test may set `shard` to play one rank of several.)"""

    name: str
    cfg: Config
    model: nn.Module
    _shard: tuple[int, int] | None = None
    _schedule: BatchSchedule | None = None

    @property
    def shard(self) -> tuple[int, int]:
        if self._shard is None:
            par = distributed.current()
            self._shard = (par.rank, par.world)
        return self._shard

    @shard.setter
    def shard(self, value: tuple[int, int]) -> None:
        self._shard, self._schedule = tuple(value), None

    @property
    def schedule(self) -> BatchSchedule:
        """The step's shape under the sequence-length schedule and the batch-size ramp."""
        if self._schedule is None:
            self._schedule = BatchSchedule(self.cfg, self.shard[1])
        return self._schedule

    def step_shape(self, step: int) -> StepShape:
        return self.schedule.at(step)

    def global_rows(self, per_rank: int) -> tuple[int, tuple[int, int]]:
        """(rows in the global micro-batch, (first, end) row of this rank's share)."""
        rank, world = self.shard
        return per_rank * world, (rank * per_rank, (rank + 1) * per_rank)

    def step_rows(self, micro: int, per_rank: int) -> range:
        """The indices, within the step's global batch, of this rank's rows of micro-batch
        `micro`: micro-batch m holds global rows m x (world x per_rank) onwards, rank r the r-th
        share of them. Samplers hand out a step's rows in this order, so index g names the same
        example at any split; random draws keyed by g are the same too."""
        total, (lo, hi) = self.global_rows(per_rank)
        return range(micro * total + lo, micro * total + hi)

    def eval_sizes(self) -> tuple[int, int]:
        """(examples in the validation set, examples per evaluation batch). The set is
        train.eval_batches global batches (train.batch_size x grad_accum_steps x processes: the
        same at any split of it); it is read train.eval_batch_size at a time (default: the
        micro-batch, train.batch_size x processes), which changes only speed and memory."""
        t = self.cfg.train
        return (t.eval_batches * self.global_rows(t.batch_size * t.grad_accum_steps)[0],
                t.eval_batch_size or self.global_rows(t.batch_size)[0])

    @abstractmethod
    def train_batch(self, step: int, micro: int) -> Batch: ...

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> LossOutput: ...

    @abstractmethod
    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult: ...

    @abstractmethod
    def data_state(self) -> dict: ...

    @abstractmethod
    def load_data_state(self, state: dict) -> None: ...

    def summary(self, last_eval: dict[str, float]) -> dict[str, float]:
        """Task-specific entries for summary.json, from the final evaluation's metrics."""
        return dict(last_eval)

    def finish(self, model: nn.Module, run_dir: Path, device: torch.device) -> dict[str, float]:
        """Once, after training: final reports (e.g. the test split). Entries go to summary.json."""
        return {}

    # -- the objective as a plug-in: what the registry, the jobs and the loaders call ------------
    verb: ClassVar[str] = "pretrain"  # the command that trains it: pretrain | finetune
    wrong_verb_hint: ClassVar[str] = ""  # said when the other command is asked to train it
    run_record: ClassVar[str] = "data.json"  # the run file holding the tokenizer's sha256, if any
    loads_as: ClassVar[str] = "language-model"  # what `load_run` gives: language-model | classifier
    rows_are: ClassVar[str] = "sequences"  # what a row of a batch is, in the start-of-run line

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse (LmforgeError) settings this objective cannot train with, before anything is
        read or built. Called for a new run and for a resume."""

    @classmethod
    def create(cls, cfg: Config) -> "Task":
        """A new run's task: read its data, build and initialise its model (seeded by
        train.seed), fill the config keys that follow from them (e.g. model.vocab_size). Nothing
        is written: the run directory is made after this returns (a task that cannot start leaves
        none)."""
        raise NotImplementedError(f"{cls.__name__} does not say how a run of it starts (create)")

    @classmethod
    def reopen(cls, cfg: Config, run_dir: Path) -> "Task":
        """The task of a run being resumed from `run_dir` (its weights are loaded by the loop).
        Default: `create(cfg)`, right for data that is re-made identically from the config."""
        return cls.create(cfg)

    @classmethod
    def build_model(cls, cfg: Config) -> nn.Module:
        """A freshly initialised model of the run's shape (for reports on sharded runs and for
        loading a run back)."""
        raise NotImplementedError(f"{cls.__name__} does not say how to build its model (build_model)")

    def fresh_model(self) -> nn.Module:
        """A new model like `self.model` (rank 0 loads a sharded run's final weights into it)."""
        return type(self).build_model(self.cfg)

    def write_run_files(self, run_dir: Path) -> None:
        """Rank 0, once, into the new run directory: what loading the run back needs beside
        config.yaml and the checkpoints (e.g. tokenizer.json and data.json)."""

    def describe(self) -> str:
        """The line printed when a run starts, after its run directory."""
        return f"{sum(p.numel() for p in self.model.parameters()):,} parameters"

    @classmethod
    def load_run(cls, run_dir: Path, cfg: Config, *, mlm_head_required: bool = True) -> LoadedModel:
        """A finished (or checkpointed) run of this objective, for predict, generate, classify,
        export and model.init_from: its model with the newest checkpoint's weights, in eval mode,
        and its tokenizer (checked against the sha256 recorded in `run_record`)."""
        weights = run_weights(run_dir)  # first: a run without a checkpoint may not have its shape filled in yet
        model = cls.build_model(cfg)
        load_checkpoint_weights(model, weights, run_dir)
        tokenizer = None
        if (run_dir / "tokenizer.json").is_file():
            tokenizer = load_run_tokenizer(run_dir, cls.run_record)
            check_tokenizer_fits(tokenizer, cfg.model, run_dir / "tokenizer.json")
        return LoadedModel(model.eval(), cfg.model, tokenizer, "lmforge")

    @classmethod
    def headline(cls, summary: dict) -> str:
        """What `lmforge pretrain|finetune` prints when the run ends, from summary.json."""
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
        return shown
