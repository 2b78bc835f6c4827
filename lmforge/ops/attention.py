"""Scaled dot-product attention for training with attention dropout on the CPU.

`F.scaled_dot_product_attention` has fused kernels (flash attention on the CPU and on CUDA), but
on the CPU none of them takes dropout: with `dropout_p > 0` it falls back to its math path,
which draws its dropout mask with torch's slow per-element Bernoulli. `attention` keeps SDPA
wherever it is fused (no dropout, or not the CPU) and otherwise does what the math path does —
scores, softmax, dropout, weighted sum — with lmforge's cheaper dropout mask (ops/dropout.py).
The model files' `naive_attention` / `naive_causal_attention` remain the references.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from lmforge.ops.dropout import dropout


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """Same arguments and result as `F.scaled_dot_product_attention` (q, k, v: (batch, heads, seq,
    head_dim); attn_mask bool, True = may attend, broadcastable to (batch, heads, seq_q, seq_k)).
    Returns (batch, heads, seq_q, head_dim)."""
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)  # (batch, heads, seq_q, seq_k)
    if is_causal:
        tq, tk = q.size(-2), k.size(-2)
        causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        attn_mask = causal if attn_mask is None else attn_mask & causal
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return dropout(scores.softmax(-1), dropout_p, True) @ v
