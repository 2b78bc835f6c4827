"""Activation checkpointing (`train.activation_checkpointing`): each transformer block keeps only
its input for the backward and recomputes its activations there, trading about one more forward
pass for activation memory that no longer grows with the number of blocks.

It is applied from outside the model, to the blocks FSDP2 shards one at a time (every child of
an nn.ModuleList: lmforge/distributed/fsdp.py), by wrapping each block's forward in
torch.utils.checkpoint's non-reentrant checkpoint (the variant that works with torch.compile,
DDP and FSDP2). Module names, and so checkpoints, are unchanged. The recomputation replays the
block's dropout masks (the RNG state is saved and restored), so a step's losses and gradients
are those of a run without it; evaluation (no gradients) runs the plain forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from lmforge.distributed.fsdp import shard_units


def checkpoint_blocks(model: nn.Module) -> int:
    """Wrap every transformer block's forward of `model` in a checkpoint; returns how many."""
    blocks = shard_units(model)
    for block in blocks:
        if getattr(block, "_lmforge_recomputes", False):
            continue
        plain = block.forward

        def forward(*args, _plain=plain, **kwargs):
            if not torch.is_grad_enabled():  # evaluation: nothing to save for a backward
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._lmforge_recomputes = True
    return len(blocks)
