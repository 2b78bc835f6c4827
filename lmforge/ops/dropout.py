"""Dropout whose random numbers cost a quarter of torch's on the CPU.

`F.dropout` on the CPU draws one Bernoulli sample per element from the Mersenne Twister: for a
BERT step that is ~17M draws and ~10% of the step's time. Here the mask comes from 16-bit
uniforms cut out of 64-bit random words (four per draw): an element is dropped when its 16-bit
number falls below round(p * 65536). The drop rate is therefore p rounded to a multiple of
1/65536 (0.1 -> 0.100006), and kept values are scaled by 1 / (1 - that rate), so the output's
expectation is the input exactly, as with `F.dropout`. The mask is kept as one byte per element
for backward, like torch's.

The random numbers come from torch's default generator, so `torch.manual_seed` (which the loop
calls at every step) makes the masks reproducible and resume exact. On other devices (CUDA has
fused, cheap dropout kernels) `dropout` is plain `F.dropout`.

`reference_dropout` is the same computation written plainly; tests/test_ops.py checks the two
against each other and the drop rate against the binomial spread.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def drop_threshold(p: float) -> int:
    """The 16-bit cut: an element is dropped when its number in [0, 65536) is below this."""
    return min(65536, max(0, round(p * 65536)))


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """(shape) bool, True where an element is kept: 16-bit uniforms from torch's default
    generator compared with `drop_threshold(p)`."""
    numel = 1
    for s in shape:
        numel *= s
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    uniforms = words.view(torch.int16)[:numel].view(shape)  # signed: [-32768, 32767]
    return uniforms >= drop_threshold(p) - 32768


def reference_dropout(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Plain dropout given the keep mask: x * keep / (1 - effective drop rate)."""
    return x * keep.to(x.dtype) / (1.0 - drop_threshold(p) / 65536)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        # x * keep gives masked_fill(~keep, 0)'s numbers for finite x without materialising ~keep
        # (measured 2.4x faster on a (32, 12, 40, 40) tensor on the CPU); the bool mask read as
        # uint8 (the same bytes) skips the bool -> float copy that `x * keep` makes first:
        # 0.43 against 1.02 ms on a (32, 4, 128, 128) fp32 tensor here
        return (x * keep.view(torch.uint8)).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return (grad * keep.view(torch.uint8)).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Like `F.dropout(x, p, training)`; on the CPU with the cheaper mask described above."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    threshold = drop_threshold(p)
    return _MaskedScale.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - threshold / 65536))


class Dropout(nn.Module):
    """`nn.Dropout` with lmforge's `dropout` (same argument, same state dict: none)."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
