"""The overfit test (`train.overfit_batches=N`): can this model, objective and optimizer learn at all?

A pipeline that cannot drive its loss towards zero on one batch it sees again and again has a bug
(a learning rate far off, a frozen or detached model, targets that do not match the inputs) that
no amount of data will fix. With N > 0 the loop trains on the run's first N global batches over and
over — the same rows, with the same masks and samples, drawn once and kept (`OverfitBatches`) —
and `OverfitWatch` follows the loss: at the end it says whether it fell to train.overfit_threshold
x the first step's loss (default 5%) and at which step, or why it probably did not, and the task
decodes the last step's batch (input | target | prediction) for a reader to look at.

May import: torch and lmforge.train.interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from lmforge.train.interface import Batch, Table


class OverfitBatches:
    """The N global batches an overfit run repeats: step s trains on the batches of step s mod N.

    They are drawn once, in step order 0..N-1, the first time any is needed (a resumed run draws
    them again from the data position its run started at: the checkpoint keeps that position, see
    `data_state`), and handed out again each time; the loop moves their tensors to the device once."""

    def __init__(self, count: int, start_state: dict):
        self.count = count
        self.start_state = start_state  # the task's data position before the first batch was drawn
        self._batches: Optional[list[list[Batch]]] = None

    def at(self, step: int, draw: Callable[[int], list[Batch]]) -> list[Batch]:
        """The batches step `step` trains on; `draw(k)` makes the micro-batches of step k."""
        if self._batches is None:
            self._batches = [draw(k) for k in range(self.count)]
        return self._batches[step % self.count]

    def data_state(self) -> dict:
        """What the checkpoint keeps as the data position: the start's, since an overfit run never
        moves on (a resume then draws the very same N batches)."""
        return self.start_state


@dataclass
class OverfitWatch:
    """The loss of every step of an overfit run, and the verdict drawn from it."""
    batches: int
    threshold: float  # share of the first step's loss to reach
    trainable: int  # parameters that require a gradient
    total: int  # parameters in all
    losses: list[float] = field(default_factory=list)  # per step, from step 1
    grad_norms: list[float] = field(default_factory=list)
    first_step: int = 1  # the step of losses[0] (a resumed run starts later)
    reached_step: Optional[int] = None
    nonfinite_step: Optional[int] = None

    @classmethod
    def for_model(cls, model: nn.Module, batches: int, threshold: float) -> "OverfitWatch":
        params = list(model.parameters())
        return cls(batches, threshold, trainable=sum(p.numel() for p in params if p.requires_grad),
                   total=sum(p.numel() for p in params))

    def observe(self, step: int, loss: float, grad_norm: float) -> None:
        """Step `step` (1-based) ended with this loss (before its update) and gradient norm."""
        if not self.losses:
            self.first_step = step
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        if not math.isfinite(loss):
            self.nonfinite_step = self.nonfinite_step or step
        elif self.reached_step is None and self.losses[0] > 0 and loss <= self.threshold * self.losses[0]:
            self.reached_step = step

    def state_dict(self) -> dict:
        """What a checkpoint keeps (state.json), so that a resumed test judges the whole run."""
        return {"losses": self.losses, "grad_norms": self.grad_norms, "first_step": self.first_step,
                "reached_step": self.reached_step, "nonfinite_step": self.nonfinite_step}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.grad_norms = list(state["losses"]), list(state["grad_norms"])
        self.first_step, self.reached_step = state["first_step"], state["reached_step"]
        self.nonfinite_step = state["nonfinite_step"]

    @property
    def ok(self) -> bool:
        return self.reached_step is not None

    def result(self, state: Optional[dict] = None) -> dict:
        """The summary.json entries: overfit (ok | did not overfit), the first and last loss, their
        ratio, the step the threshold was reached at (or null) and, if not, what to look at."""
        first, last = (self.losses[0], self.losses[-1]) if self.losses else (math.nan, math.nan)
        out = {"overfit": "ok" if self.ok else "did not overfit", "overfit_batches": self.batches,
               "overfit_threshold": self.threshold, "overfit_first_loss": first, "overfit_last_loss": last,
               "overfit_loss_ratio": last / first if first and math.isfinite(first) else math.nan,
               "overfit_reached_step": self.reached_step}
        if not self.ok:
            out["overfit_hint"] = self.hint(state or {})
        return out

    def hint(self, state: dict) -> str:
        """What most probably stopped the loss from falling, in the order the causes are checked."""
        lr = state.get("lr")
        lr_text = f"optim.lr={lr:g}" if lr is not None else "optim.lr"
        if not self.losses:
            return "no step was trained: raise train.max_steps"
        finite_norms = [g for g in self.grad_norms if math.isfinite(g)]
        if self.trainable == 0 or (finite_norms and all(g == 0 for g in finite_norms)):
            return (f"the gradients are all zero ({self.trainable:,} of {self.total:,} parameters are trainable): "
                    f"the model is frozen (requires_grad=False) or its output is detached from the loss")
        if self.trainable < self.total / 2:
            return (f"only {self.trainable:,} of {self.total:,} parameters are trainable: a frozen encoder or "
                    f"embedding cannot fit the batch; unfreeze it")
        if self.nonfinite_step is not None:
            return (f"the loss went non-finite at step {self.nonfinite_step}: {lr_text} is far too high (try "
                    f"`lmforge lr-find`), or the data holds a bad value")
        if not finite_norms:
            return (f"every step's gradient was not finite (the loss was): the updates were skipped; look for an "
                    f"overflow ({lr_text}, train.precision) or a bad value in the data")
        finite = [x for x in self.losses if math.isfinite(x)]
        peak = max(range(len(self.losses)), key=lambda i: self.losses[i] if math.isfinite(self.losses[i]) else -1)
        if self.losses[peak] > 1.5 * finite[0]:  # Adam at too high a rate throws the weights about first
            return (f"the loss rose to {self.losses[peak]:.4g} ({self.losses[peak] / finite[0]:.1f}x its first "
                    f"value) at step {self.first_step + peak} before it fell: {lr_text} is probably too high "
                    f"(try `lmforge lr-find`)")
        if min(finite) > 0.9 * finite[0] or finite[-1] > finite[0]:
            return (f"the loss did not fall (first {finite[0]:.4g}, lowest {min(finite):.4g}, last {finite[-1]:.4g}): "
                    f"{lr_text} is probably far too high or far too low (try `lmforge lr-find`); check that "
                    f"the targets belong to the inputs")
        return (f"the loss fell to {finite[-1] / finite[0]:.1%} of its first value, not {self.threshold:.0%}: "
                f"train longer (train.max_steps), raise {lr_text}, or turn dropout off (model.dropout=0); if "
                f"it stalls at a floor, look at the targets in the table")

    def verdict(self) -> str:
        """The one line printed at the end of an overfit run."""
        r = self.result()
        head = (f"overfit {self.batches} batch{'es' if self.batches > 1 else ''}: "
                f"loss {r['overfit_first_loss']:.4g} -> {r['overfit_last_loss']:.4g} "
                f"({r['overfit_loss_ratio']:.1%} of the first) in {len(self.losses)} steps")
        if self.ok:
            return f"{head}: ok, under {self.threshold:.0%} at step {self.reached_step}"
        return f"{head}: did not overfit"


def decode_last(task, model: nn.Module, batch: Batch) -> Optional[Table]:
    """The task's input | target | prediction table of `batch` (its `decode_batch`), or None for
    an objective that does not decode its batches."""
    decode = getattr(task, "decode_batch", None)
    if decode is None:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return decode(model, batch)
    finally:
        model.train(was_training)
