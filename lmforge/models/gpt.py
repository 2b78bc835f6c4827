"""GPT-2 (Radford et al. 2019) as a plain PyTorch model, in the order the data flows through it.

    token + learned position embeddings -> dropout
    N x [ x + attn(LayerNorm(x)),  x + MLP(LayerNorm(x)) ]     (pre-LayerNorm blocks)
    final LayerNorm -> LM head tied to the token embeddings

Attention is causal `F.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA;
lmforge/ops/attention.py when training with attention dropout on the CPU), dropout lmforge's
cheaper CPU dropout (lmforge/ops/dropout.py); `naive_causal_attention` is the slow reference. Generation reuses the keys
and values of earlier positions (a KV cache), so each new token costs one position's work.

The vocabulary is padded up to a multiple of 64 (50,257 -> 50,304 for GPT-2) so the largest
matmul has friendly shapes; the padded slots are never real tokens, and `generate` masks them.
Residual projections (attention out, MLP out) start with std 0.02/sqrt(2*layers), GPT-2's
scaling that keeps the residual stream's variance from growing with depth.
Names follow GPT-2's parts; lmforge/models/hf.py maps them to transformers' GPT2LMHeadModel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import register_dataclass

from lmforge.config import ModelConfig
from lmforge.models.family import Family
from lmforge.models.hf import gpt2_from_hf, gpt2_to_hf
from lmforge.ops.attention import attention
from lmforge.ops.dropout import Dropout
from lmforge.ops.linear_cross_entropy import linear_cross_entropy

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (batch, heads, seq, head_dim)


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    return ((vocab_size + multiple - 1) // multiple) * multiple


def naive_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference causal softmax(q k^T / sqrt(d)) v for q, k, v (batch, heads, seq, head_dim),
    where the last q position lines up with the last k position (as with a KV cache)."""
    tq, tk = q.size(-2), k.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def causal_mask(t: int, device: torch.device) -> torch.Tensor:
    """(t, t) bool, True where query i may see key j <= i."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # one matmul for q, k, v (GPT-2's layout)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out.residual_projection = True
        self.attn_dropout = cfg.dropout

    def forward(self, x: torch.Tensor, past: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                documents: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """documents: (b, 1, t, t) bool, True where query i may see key j (packed documents), or None."""
        b, t, h = x.shape
        q, k, v = (z.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for z in self.qkv(x).split(h, dim=2))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        dropout = self.attn_dropout if self.training else 0.0
        if documents is not None:  # causal within each document: an explicit mask (no fused causal kernel)
            y = attention(q, k, v, attn_mask=documents & causal_mask(t, x.device), dropout_p=dropout)
        elif past is None or t == k.size(2):
            y = attention(q, k, v, is_causal=True, dropout_p=dropout)
        elif t == 1:  # one new token: it may look at everything cached
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # several new tokens after a cache: causal, offset by the cache length
            allowed = torch.ones(t, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=k.size(2) - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(b, t, h)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.down.residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))  # GPT-2's tanh-approximate GELU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, past=None, documents: Optional[torch.Tensor] = None):
        a, present = self.attn(self.attn_norm(x), past, documents)
        x = x + self.dropout(a)
        return x + self.dropout(self.mlp(self.mlp_norm(x))), present


@dataclasses.dataclass
class CausalLMOutput:
    """What `GPT.forward` returns: always this, each field None when the call did not compute it.

    logits: (batch, seq, padded_vocab); None with `targets`.
    loss_sum: () float, the summed next-token cross-entropy over every position; with `targets` only.
    correct: () int64, the positions whose most likely token is the target; with `targets` only.
    cache: the KVCache after these positions (per layer: keys, values (batch, heads, seq,
        head_dim)); with `return_cache` only.
    """

    logits: Optional[torch.Tensor] = None
    loss_sum: Optional[torch.Tensor] = None
    correct: Optional[torch.Tensor] = None
    cache: Optional[KVCache] = None


# A pytree node, so wrappers that walk forward's outputs find the tensors inside: FSDP2 and DDP
# hook backward on them, torch.compile returns them from its graph.
register_dataclass(CausalLMOutput)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size  # real tokens; the embedding has padded_vocab_size rows
        self.token = nn.Embedding(padded_vocab_size(cfg.vocab_size), cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = self.cfg.init_std
            if getattr(module, "residual_projection", False):
                std /= math.sqrt(2 * self.cfg.num_layers)
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, past: Optional[KVCache] = None,
                return_cache: bool = False, targets: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """input_ids: (batch, seq) int64, continuing `past` (a KVCache of earlier positions) if
        given; attention_mask: None, or (batch, seq, seq) bool, True where position i may see
        position j (besides causality): packed windows whose documents must not see each other
        (data.packing=documents; not with `past`). Returns a CausalLMOutput:

        - nothing else: `logits` (batch, seq, padded_vocab).
        - `targets` ((batch, seq) int64, the next tokens): `loss_sum` and `correct` instead of
          the logits, from the fused, chunked projection + loss of lmforge/ops, so the (batch,
          seq, vocab) logits never exist in memory at once.
        - `return_cache`: `cache` too, every layer's keys and values up to and including these
          positions, to pass as `past` with the next tokens (generation)."""
        start = past[0][0].size(2) if past else 0
        t = input_ids.size(1)
        if start + t > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {start + t} tokens exceeds {self.cfg.max_position_embeddings} positions")
        x = self.dropout(self.token(input_ids) + self.position.weight[start:start + t])
        documents = None if attention_mask is None else attention_mask.bool()[:, None]
        cache = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, past[i] if past else None, documents)
            cache.append(present)
        x = self.final_norm(x)
        cache = cache if return_cache else None
        if targets is not None:
            loss_sum, correct = linear_cross_entropy(x.reshape(-1, x.size(-1)), self.token.weight, None,
                                                     targets.reshape(-1))
            return CausalLMOutput(loss_sum=loss_sum, correct=correct, cache=cache)
        return CausalLMOutput(logits=F.linear(x, self.token.weight), cache=cache)  # LM head tied to the embeddings


FAMILY = Family("gpt", "decoder", GPT, ("gpt2",), to_hf=gpt2_to_hf, from_hf=gpt2_from_hf)
