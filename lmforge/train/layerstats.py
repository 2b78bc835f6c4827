"""Layer statistics (`log.layer_stats=true`): per transformer block, at each logging step, the
three numbers that show where training goes wrong (Karpathy's "A Recipe for Training Neural
Networks"; the update-to-weight ratio of CS231n):

- grad_norm: the L2 norm of the block's gradient (before clipping), summed over micro-batches;
- update_ratio: ||weights after the update - before|| / ||weights before||; around 1e-3 is
  healthy for Adam, far above it a learning rate that is too high, far below one too low;
- act_rms: the root mean square of the block's output on the step's last micro-batch: a block
  whose activations grow step after step is where a divergence starts.

They are logged as records of split "layers" (metrics.jsonl, TensorBoard `layers/<block>/...`),
and report.png draws them. Off the logging steps nothing is done (no hooks, no copies), so the
cost is a forward hook per block, one gradient norm per block and one copy of the block weights
on one step in log_every (benchmarks/bench_layer_stats.py measures it).

When a step's loss is not finite, `first_nonfinite` names the first block (in forward order)
whose output or gradient left the finite range, from a replay of the step's first micro-batch:
where the NaN was born, not where it was noticed.

Whole parameters only (one process or DDP); FSDP2 and DeepSpeed shard them and are refused.
Under train.compile, hooks that come and go may make torch.compile trace the logging steps
again; that cost was not measured (the benchmark runs without compile).

May import: torch and lmforge.distributed.fsdp (which blocks there are).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from lmforge.distributed.fsdp import shard_units


def block_names(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of every transformer block, in forward order (the children of the
    model's nn.ModuleLists, as activation checkpointing and FSDP2 see them)."""
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(b)].replace("_orig_mod.", "").replace("module.", ""), b) for b in shard_units(model)]


class LayerStats:
    """What log.layer_stats measures on the logging steps; `record` gives the record to log."""

    def __init__(self, model: nn.Module):
        self.blocks = block_names(model)
        self._rms: dict[str, float] = {}
        self._before: Optional[list[list[torch.Tensor]]] = None

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Forward hooks on every block for the duration (a logging step's forward passes): each
        block's output RMS, of the last micro-batch through it."""
        self._rms = {}

        def hook(name: str) -> Callable:
            def record(module, args, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                if isinstance(out, torch.Tensor) and out.is_floating_point():
                    self._rms[name] = out.detach().float().pow(2).mean().sqrt()
            return record
        handles = [block.register_forward_hook(hook(name)) for name, block in self.blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def before_update(self) -> None:
        """Keep the blocks' weights as they are before the optimizer step."""
        self._before = [[p.detach().clone() for p in block.parameters()] for _, block in self.blocks]

    def grad_norms(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, block in self.blocks:
            grads = [p.grad.detach().float() for p in block.parameters() if p.grad is not None]
            device = next(block.parameters()).device
            out[name] = (torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads
                         else torch.zeros((), device=device))
        return out

    def update_ratios(self) -> dict[str, torch.Tensor]:
        out = {}
        for (name, block), before in zip(self.blocks, self._before or []):
            after = list(block.parameters())
            delta = torch.stack([(a.detach().float() - b.float()).norm() for a, b in zip(after, before)])
            weight = torch.stack([b.float().norm() for b in before])
            out[name] = torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(weight).clamp_min(1e-12)
        self._before = None
        return out

    def record(self, grads: dict[str, torch.Tensor], ratios: dict[str, torch.Tensor]) -> dict[str, float]:
        """{"<block>/grad_norm": ..., "<block>/update_ratio": ..., "<block>/act_rms": ...}: one sync."""
        names, values = [], []
        for name, _ in self.blocks:
            for key, source in (("grad_norm", grads), ("update_ratio", ratios), ("act_rms", self._rms)):
                if name in source:
                    names.append(f"{name}/{key}")
                    values.append(source[name].float().reshape(()))
        return dict(zip(names, torch.stack(values).tolist())) if values else {}


def first_nonfinite(stats: LayerStats, replay: Callable[[], torch.Tensor], backward: bool = True) -> Optional[str]:
    """The block where the non-finite numbers start. `replay()` runs the step's first micro-batch
    forward again and returns its loss. The first block, in forward order, whose output is not
    finite; else, if the loss is finite and `backward`, the replayed loss's backward (fresh
    gradients, before any clipping: a NaN norm would have scaled every gradient to NaN) and the
    first block, from the top down, whose gradient is not finite; None when every block's numbers
    are finite (the NaN came from outside the blocks: embeddings, head, loss or data). The
    caller zeroes the gradients first and after."""
    with stats.watching(), torch.set_grad_enabled(backward):
        loss = replay()
    for name, _ in stats.blocks:  # the forward runs first: a non-finite output is where it starts
        rms = stats._rms.get(name)
        if rms is not None and not math.isfinite(float(rms)):
            return f"{name} (its output)"
    if not backward or not bool(torch.isfinite(loss)):
        return None  # a finite forward through the blocks and a non-finite loss: the head or the loss
    loss.backward()
    grads = stats.grad_norms()
    for name, _ in reversed(stats.blocks):  # the backward runs from the top block down
        if not math.isfinite(float(grads[name])):
            return f"{name} (its gradient)"
    return None
