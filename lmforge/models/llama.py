"""The modern decoder (Llama, Touvron et al. 2023; modded-nanogpt's variants) as a plain PyTorch model.

    token embedding -> dropout
    N x [ x + attn(RMSNorm(x)),  x + MLP(RMSNorm(x)) ]          (pre-norm blocks)
         attn: q, k, v projections -> (RMSNorm on each head's q and k) -> RoPE -> causal SDPA -> out
         MLP:  SwiGLU  down(silu(gate(x)) * up(x))      or ReLU²  down(relu(up(x))^2)
    final RMSNorm -> LM head (tied to the token embedding, or a matrix of its own)

What changed since GPT-2 (lmforge/models/gpt.py) and why:
- RoPE instead of learned positions: attention scores depend on relative position only, and no
  position table is spent on parameters (lmforge/ops/rope.py).
- RMSNorm instead of LayerNorm: no mean to subtract and no bias, the same quality for less work.
- No biases anywhere: they add parameters and memory traffic and no measurable quality.
- SwiGLU (Shazeer 2020), or ReLU² (So et al. 2021, modded-nanogpt): better per FLOP than GELU.
- QK-norm (`model.qk_norm`, modded-nanogpt, OLMo 2, Qwen3): bounded attention logits, so higher
  learning rates stay stable.
- Grouped-query attention (`model.num_kv_heads`): fewer key/value heads, a smaller KV cache.

The forward contract is GPT's (input_ids, past, return_cache, targets -> CausalLMOutput), so the
causal-LM objective, generation and the loop use either without knowing which. The vocabulary is
padded to a multiple of 64 as GPT's is. transformers interop is at the end of the file:
LlamaForCausalLM (SwiGLU), Qwen3ForCausalLM (SwiGLU + QK-norm), ArceeForCausalLM (ReLU²).
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.family import Family, SpecialIds, Tensors
from lmforge.models.gpt import CausalLMOutput, KVCache, causal_mask, naive_causal_attention, padded_vocab_size
from lmforge.models.hf import NameMap, require_keys
from lmforge.ops.attention import attention
from lmforge.ops.dropout import Dropout
from lmforge.ops.linear_cross_entropy import linear_cross_entropy
from lmforge.ops.rope import apply_rope, rope_tables

DEFAULT_THETA = 10_000.0  # Llama 1/2's RoPE base


def naive_llama_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference causal attention for q (batch, heads, tq, d) and k, v (batch, kv_heads, tk, d):
    each group of heads/kv_heads query heads shares one key/value head."""
    groups = q.size(1) // k.size(1)
    return naive_causal_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
        # Separate q, k, v matrices (transformers' layout): with grouped-query attention they differ in size.
        self.q = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.out.residual_projection = True
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # per head, over head_dim: bounds q.k whatever the learning rate does to the weights
            self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.layer_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.layer_norm_eps)
        self.attn_dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                past: Optional[tuple[torch.Tensor, torch.Tensor]] = None, documents: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (b, t, h); cos, sin (t, head_dim): the rotations of these t positions; documents:
        (b, 1, t, t) bool, True where query i may see key j (packed documents), or None. Returns
        the output (b, t, h) and this layer's keys and values so far (b, kv_heads, past + t, head_dim)."""
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # before RoPE, as Qwen3 and modded-nanogpt do; in float32 under bf16 autocast too
            q, k = self.q_norm(q.float()).type_as(q), self.k_norm(k.float()).type_as(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        if self.num_kv_heads != self.num_heads:  # each key/value head serves num_heads/num_kv_heads query heads
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        dropout = self.attn_dropout if self.training else 0.0
        if documents is not None:  # causal within each document: an explicit mask (no fused causal kernel)
            y = attention(q, k, v, attn_mask=documents & causal_mask(t, x.device), dropout_p=dropout)
        elif past is None or t == k.size(2):
            y = attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:  # new tokens after a cache: causal, offset by the cache length (one token sees everything)
            allowed = torch.ones(t, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=k.size(2) - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(b, t, -1)), present


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":  # a gate of its own: three matrices, so intermediate_size is usually 8/3 h
            self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.down.residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.relu(self.up(x)).square())  # ReLU²: sparse like ReLU, smooth at 0 like GELU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past=None,
                documents: Optional[torch.Tensor] = None):
        a, present = self.attn(self.attn_norm(x), cos, sin, past, documents)
        x = x + self.dropout(a)
        return x + self.dropout(self.mlp(self.mlp_norm(x))), present


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size  # real tokens; the embedding has padded_vocab_size rows
        self.token = nn.Embedding(padded_vocab_size(cfg.vocab_size), cfg.hidden_size)
        self.dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if not cfg.tie_embeddings:
            self.head = nn.Linear(cfg.hidden_size, padded_vocab_size(cfg.vocab_size), bias=False)
        cos, sin = rope_tables(cfg.hidden_size // cfg.num_heads, cfg.max_position_embeddings,
                               cfg.rope_theta or DEFAULT_THETA)
        # not in the state dict: a function of the config, rebuilt on load
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, init_std) for every matrix and embedding, the residual projections (attention out,
        MLP down) scaled by 1/sqrt(2 * layers) as GPT-2's; RMSNorm weights start at 1."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = self.cfg.init_std
            if getattr(module, "residual_projection", False):
                std /= math.sqrt(2 * self.cfg.num_layers)
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)

    @property
    def head_weight(self) -> torch.Tensor:
        """(padded_vocab, hidden): the LM head's matrix, the token embedding when tied."""
        return self.token.weight if self.cfg.tie_embeddings else self.head.weight

    def forward(self, input_ids: torch.Tensor, past: Optional[KVCache] = None,
                return_cache: bool = False, targets: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """input_ids: (batch, seq) int64, continuing `past` (a KVCache of earlier positions) if
        given; attention_mask: None or pairwise (batch, seq, seq), as GPT.forward takes it (packed
        documents). Returns a CausalLMOutput, exactly as GPT.forward documents: `logits` (batch, seq,
        padded_vocab); with `targets` ((batch, seq) next tokens) `loss_sum` and `correct` from the
        fused chunked projection + loss instead; with `return_cache` every layer's keys and values."""
        start = past[0][0].size(2) if past else 0
        t = input_ids.size(1)
        if start + t > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {start + t} tokens exceeds {self.cfg.max_position_embeddings} positions")
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        x = self.dropout(self.token(input_ids))
        documents = None if attention_mask is None else attention_mask.bool()[:, None]
        cache = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, cos, sin, past[i] if past else None, documents)
            cache.append(present)
        x = self.final_norm(x)
        cache = cache if return_cache else None
        if targets is not None:
            loss_sum, correct = linear_cross_entropy(x.reshape(-1, x.size(-1)), self.head_weight, None,
                                                     targets.reshape(-1))
            return CausalLMOutput(loss_sum=loss_sum, correct=correct, cache=cache)
        return CausalLMOutput(logits=F.linear(x, self.head_weight), cache=cache)


# ---------------------------------------------------------------------------------------------
# transformers interop: LlamaForCausalLM (SwiGLU), Qwen3ForCausalLM (SwiGLU with QK-norm: Llama's
# layout plus q_norm / k_norm) and ArceeForCausalLM (ReLU²: Llama's with an ungated MLP). All three
# name their tensors alike. The token embedding (and an untied head) is padded to lmforge's row
# count on the way in and cut back to the real vocabulary on the way out.

_NAMES = NameMap([
    ("blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blocks.{i}.attn.q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blocks.{i}.attn.k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blocks.{i}.attn.v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blocks.{i}.attn.out.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blocks.{i}.attn.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("blocks.{i}.attn.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("blocks.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blocks.{i}.mlp.gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blocks.{i}.mlp.up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blocks.{i}.mlp.down.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("final_norm.weight", "model.norm.weight"),
], ignored=re.compile(r"(rotary_emb\.inv_freq)$"), family="Llama", prefixes=("model.", "lm_head."))

_PADDED = {"token.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight"}
# (model.mlp, model.qk_norm) -> the transformers class that computes exactly that
_HF_CLASSES = {("swiglu", False): ("llama", "LlamaForCausalLM"), ("swiglu", True): ("qwen3", "Qwen3ForCausalLM"),
               ("relu2", False): ("arcee", "ArceeForCausalLM")}


def export_refusal(cfg: ModelConfig) -> Optional[str]:
    if (cfg.mlp, cfg.qk_norm) not in _HF_CLASSES:
        return (f"transformers has no causal LM with model.mlp={cfg.mlp} and model.qk_norm=true (Qwen3 has "
                f"QK-norm with SwiGLU, Arcee ReLU² without QK-norm)")
    return None


def to_hf(state: Tensors, cfg: ModelConfig, special: SpecialIds, encoder_only: bool) -> tuple[dict, Tensors]:
    model_type, architecture = _HF_CLASSES[(cfg.mlp, cfg.qk_norm)]
    tensors = _NAMES.to_hf({k: v for k, v in state.items() if k not in _PADDED})
    for ours, theirs in _PADDED.items():
        if ours in state:
            tensors[theirs] = state[ours][: cfg.vocab_size].contiguous()
    head_dim = cfg.hidden_size // cfg.num_heads
    theta = cfg.rope_theta or DEFAULT_THETA
    hf = {
        "architectures": [architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads, "head_dim": head_dim,
        "hidden_act": "silu" if cfg.mlp == "swiglu" else "relu2",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_std, "rms_norm_eps": cfg.layer_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": cfg.dropout, "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "bos_token_id": special.eot, "eos_token_id": special.eot, "pad_token_id": None,
    }
    if model_type == "qwen3":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return hf, tensors


def from_hf(hf: dict, state: Tensors) -> tuple[ModelConfig, Tensors, list[str]]:
    model_type = hf.get("model_type")
    mlp = {"silu": "swiglu", "relu2": "relu2"}.get(hf.get("hidden_act", "silu"))
    if (mlp, model_type == "qwen3") not in _HF_CLASSES or _HF_CLASSES[(mlp, model_type == "qwen3")][0] != model_type:
        raise LmforgeError(f"a {model_type} with hidden_act {hf.get('hidden_act')!r} is not supported here (Llama "
                           f"and Qwen3: silu; Arcee: relu2)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise LmforgeError("Llama-family models with attention_bias or mlp_bias are not supported here")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise LmforgeError(f"RoPE scaling {rope.get('rope_type') or rope.get('type')!r} is not supported here "
                           f"(plain RoPE only)")
    if model_type == "qwen3" and hf.get("use_sliding_window"):
        raise LmforgeError("Qwen3 with use_sliding_window is not supported here")
    require_keys(hf, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings")
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, h // heads):
        raise LmforgeError(f"head_dim {hf['head_dim']} other than hidden_size / num_attention_heads is not "
                           f"supported here")
    cfg = ModelConfig(
        arch="llama", vocab_size=hf["vocab_size"], hidden_size=h, num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        intermediate_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
        type_vocab_size=1, dropout=float(hf.get("attention_dropout", 0.0)), layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02), rope_theta=float(rope.get("rope_theta", hf.get("rope_theta",
                                                                                                  DEFAULT_THETA))),
        mlp=mlp, qk_norm=model_type == "qwen3", tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    tensors, ignored = _NAMES.from_hf({k: v for k, v in state.items() if k not in _PADDED.values()})
    padded = padded_vocab_size(cfg.vocab_size)
    for ours, theirs in _PADDED.items():
        if theirs in state and not (ours == "head.weight" and cfg.tie_embeddings):
            tensors[ours] = torch.zeros(padded, h, dtype=state[theirs].dtype)
            tensors[ours][: state[theirs].size(0)] = state[theirs]
        elif theirs in state:
            ignored.append(theirs)  # a tied head stored anyway
    return cfg, tensors, ignored


FAMILY = Family("llama", "decoder", Llama, ("llama", "qwen3", "arcee"), to_hf=to_hf, from_hf=from_hf,
                export_refusal=export_refusal)
