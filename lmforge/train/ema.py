"""An exponential moving average of the weights (`optim.ema_decay`): the model a run evaluates,
reports on and hands out, while the optimizer keeps training the raw weights.

After each optimizer update that was taken (a skipped non-finite step is not), every parameter's
average moves towards it: avg <- avg + (1 - d) * (param - avg), with d = min(ema_decay,
(1 + n) / (10 + n)) after n updates. The warm-up term (as in TensorFlow's and timm's averages)
keeps the first steps' random initialisation from dominating a short fine-tuning run: at step 1
the average is mostly the trained weights, and d reaches ema_decay after ~10 / (1 - d) steps.

The average is kept in fp32 on the parameters' device, one tensor per parameter (tied weights
are one parameter, so they stay tied). The loop swaps it into the model to evaluate
(`swapped_in`), writes it into each checkpoint as `ema.safetensors` (a whole state dict: the
averaged parameters and the model's buffers), and leaves it in the model when training ends, so
`finish` and every reader of the run (predict, classify, evaluate, export) use the average.
Resume restores it and its update count, so a resumed run's average is the uninterrupted one's.

It needs every parameter whole on each process (one process or DDP); sharded strategies are
refused in one line where the engine is made (lmforge/distributed/__init__.py make_engine).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError
from lmforge.runs.checkpoint import unwrap


def decay_at(ema_decay: float, updates: int) -> float:
    """The decay used for the update after `updates` earlier ones (see the module docstring)."""
    return min(ema_decay, (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    """The average of `model`'s parameters; `updates` counts the updates folded in so far."""

    def __init__(self, model: nn.Module, ema_decay: float):
        self.model = unwrap(model)
        self.ema_decay = ema_decay
        self.updates = 0
        self.params = [p for p in self.model.parameters() if p.dtype.is_floating_point]
        self.average = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current parameters into the average (after an optimizer update)."""
        weight = 1.0 - decay_at(self.ema_decay, self.updates)
        torch._foreach_lerp_(self.average, [p.detach().float() for p in self.params], weight)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block, its own weights again after it."""
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    p.copy_(k)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the model's parameters with the average (the end of training)."""
        for p, a in zip(self.params, self.average):
            p.copy_(a.to(p.dtype))

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged model as a state dict named like model.safetensors (for ema.safetensors):
        the average in place of each parameter (under each of a tied parameter's names), the
        model's own buffers, all copied to the CPU."""
        average_of = {id(p): a for p, a in zip(self.params, self.average)}
        out = {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            value = average_of.get(id(t))
            out[name] = (value.to(t.dtype) if value is not None else t.detach()).to("cpu", copy=True).contiguous()
        return out

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        """Restore the average from a checkpoint's ema.safetensors (resume)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p, a in zip(self.params, self.average):
            name = names[id(p)]
            if name not in tensors or tensors[name].shape != a.shape:
                raise LmforgeError(f"the checkpoint's ema.safetensors does not match the model ({name}); it was "
                                   f"written by another model")
            a.copy_(tensors[name].float())
        self.updates = updates
