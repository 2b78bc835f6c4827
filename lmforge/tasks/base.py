"""What a task is to the training loop: a model, batches, a loss, metrics. Nothing more.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.config import Config
from lmforge.train.schedule import BatchSchedule, StepShape


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor]  # moved to the device by the loop
    num_targets: int  # loss terms in this batch (masked tokens, examples)
    num_tokens: int  # input tokens, for throughput
    # further counts that loss parts or metrics are means over, e.g. {"examples": 8} (NSP)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: sum of the per-target losses
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. {"correct": n}, summed over targets
    # count name (a key of Batch.counts) -> a loss part summed over that count: added to the
    # loss as its sum over the step / the step's total count (a mean over the global batch)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    # metric name -> the count its sum in `sums` is over, where that is not the targets
    per: dict[str, str] = field(default_factory=dict)


@dataclass
class Table:
    """Decoded examples (inputs, targets, predictions) as columns and rows of text: markdown for
    samples.md and TensorBoard, a table for loggers that have tables (W&B)."""
    columns: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        def cell(text: str) -> str:
            return str(text).replace("|", "\\|").replace("\n", " ")
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


@dataclass
class EvalResult:
    metrics: dict[str, float]  # logged under split "validation"
    table_markdown: str = ""  # decoded examples for samples.md / TensorBoard
    table: Table | None = None  # the same examples as a table, for loggers that have tables


class Task(ABC):
    """A model, its batches, its loss and its metrics: all the loop needs.

    Data parallelism: `shard` is (rank, world size), set by the loop. `train_batch` then returns
    this rank's rows of the step's global batch (world x train.batch_size rows), which are the
    same rows, with the same random masks, that one process with the whole batch would make,
    so results do not depend on the number of processes."""

    name: str
    cfg: Config
    model: nn.Module
    shard: tuple[int, int] = (0, 1)
    schedule: BatchSchedule | None = None  # set by the loop; made from self.cfg when a test calls directly

    def step_shape(self, step: int) -> StepShape:
        if self.schedule is None:
            self.schedule = BatchSchedule(self.cfg, self.shard[1])
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

