"""What the training loop needs from a task, and nothing else: the loop's side of the contract.

The loop (lmforge/train/loop.py) is written against `TrainableTask` and the four records below; it
imports no objective. Objectives implement it by subclassing `lmforge.tasks.base.Task`, which adds
the helpers every objective shares (rows of the global batch, validation sizes) and the plug-in
declarations (config section, model, load-back) that the registry reads (lmforge/tasks/registry.py).

May import: torch and lmforge.train.schedule. Nothing of lmforge.tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from lmforge.train.schedule import BatchSchedule


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
    # metric name -> its sum over the targets (e.g. {"accuracy": number correct}): logged as its mean
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
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


@runtime_checkable
class TrainableTask(Protocol):
    """A model, its batches, its loss and its metrics: all the loop calls (lmforge/tasks/base.py
    explains each; `Task` there implements the shared parts)."""

    name: str
    model: nn.Module

    @property
    def shard(self) -> tuple[int, int]: ...  # (rank, world size) of this process

    @property
    def schedule(self) -> BatchSchedule: ...  # the step's shape (sequence length, rows, micro-batches)

    def train_batch(self, step: int, micro: int) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput: ...

    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult: ...

    def data_state(self) -> dict: ...

    def load_data_state(self, state: dict) -> None: ...

    def summary(self, last_eval: dict[str, float]) -> dict[str, float]: ...

    def finish(self, model: nn.Module, run_dir: Path, device: torch.device) -> dict[str, float]: ...
