"""What a task is to the training loop: a model, batches, a loss, metrics. Nothing more.

The loop (lmforge/train/loop.py) calls, per optimizer step:
    batches = [task.train_batch(step, micro) for micro in range(micro_batches)]
    for each: out = task.loss(model, batch); (out.loss_sum / total_targets).backward()
and every `eval_every` steps `task.evaluate(model)`. Dividing summed losses by the number of
targets in the whole step (known before any forward pass, because masking happens when the
batch is drawn) makes k accumulated micro-batches give exactly the gradient of one batch k times
larger, even when micro-batches hold different numbers of masked tokens.

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


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: sum of the per-target losses
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. {"correct": n}, summed over targets


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

