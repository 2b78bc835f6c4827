"""Rotary position embeddings (Su et al. 2021, RoFormer), as Llama, ModernBERT and transformers apply them.

Each head's query and key vectors are rotated, pair of dimensions by pair, by an angle that grows
with the position: the dot product of a query at i and a key at j then depends on i - j alone,
so attention sees relative positions without a position table (and nothing to learn for them).
The pairs are (d, d + head_dim/2), transformers' "rotate half" layout, so its checkpoints load
as they are. `rope_reference` below is the same rotation written with complex numbers.
"""

from __future__ import annotations

from typing import Optional

import torch


def rope_tables(head_dim: int, positions: int, theta: float, device: Optional[torch.device] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (positions, head_dim) float32: the rotation of every position, in the
    layout `apply_rope` takes. Pair p turns at the frequency theta^(-2p/head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(positions, device=device).float(), inv_freq)  # (positions, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, seq, head_dim) rotated by cos, sin ((seq, head_dim), or (batch, seq,
    head_dim) for positions of each row, e.g. restarting at every packed document). Same shape
    and dtype as x."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (x1, x2) -> (-x2, x1)
    return x * cos + rotated * sin


def rope_reference(x: torch.Tensor, theta: float, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The slow reference: x (batch, heads, seq, head_dim) as complex numbers x_p + i x_{p+d/2},
    each multiplied by e^{i * position * theta^(-2p/d)}. positions: (seq,) int, default 0..seq-1."""
    d = x.size(-1)
    pos = torch.arange(x.size(-2)) if positions is None else positions
    freq = theta ** (-torch.arange(0, d, 2).double() / d)
    turn = torch.polar(torch.ones(len(pos), d // 2, dtype=torch.float64), pos.double()[:, None] * freq)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * turn
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)
