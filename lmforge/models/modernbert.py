"""ModernBERT (Warner et al. 2024) as a plain PyTorch model, in the order the data flows through it.

    token embedding -> LayerNorm -> dropout                     (no position embeddings)
    N x [ x + attn(LayerNorm(x)),  x + GeGLU-MLP(LayerNorm(x)) ]  (pre-norm; layer 0's attention norm
                                                                   is the identity: the embedding
                                                                   norm just ran)
    final LayerNorm
    masked-LM head: dense -> GELU -> LayerNorm -> decoder tied to the token embeddings (+ bias)

Attention rotates queries and keys by their position (RoPE) and alternates between global layers
(0, n, 2n, ... for n = cfg.global_every; RoPE base cfg.rope_theta, default 160,000) and local ones,
where a token sees only the tokens within cfg.local_window/2 positions on either side (RoPE base
cfg.local_rope_theta). No LayerNorm and no matmul has a bias. All of it is what transformers'
`ModernBertForMaskedLM` computes, so its checkpoints load here and ours there (the bottom of the
file maps the names and the config.json).

Padding is removed, as in the paper: with an attention_mask that pads, the batch is gathered to its
real tokens, (n_real, hidden), and every per-token step — embedding, norms, projections, MLP — runs
on those alone; only attention sees the (batch, seq) layout, scattered there and back (`Tokens`).

Packed windows: an attention_mask of shape (batch, seq, seq), True where query i may attend key j,
lets several documents share a row without seeing each other (block-diagonal). Nothing is padded
then, so nothing is removed: every layer attends under that pairwise mask, a local layer under it
AND its window, and RoPE places each token at its position in the row (the window's position, not
restarting at each document).

Attention goes through lmforge/ops/attention.py (`F.scaled_dot_product_attention`, with lmforge's
cheaper mask when training with attention dropout on the CPU); `naive_attention` is the slow,
obviously-correct reference it is tested against. The model knows nothing about tasks, devices or
parallelism.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.bert import MaskedLMOutput, masked_lm_output, selected_positions
from lmforge.models.family import Family, SpecialIds, Tensors
from lmforge.models.hf import NameMap, require_keys
from lmforge.ops.attention import attention
from lmforge.ops.dropout import Dropout
from lmforge.ops.rope import apply_rope, rope_tables

GLOBAL_ROPE_THETA = 160_000.0  # ModernBERT's RoPE base for its global layers (cfg.rope_theta None)
INIT_CUTOFF = 2.0  # transformers' initializer_cutoff_factor: weights are drawn from N(0, std) cut at +-2 std


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                    half_window: Optional[int] = None) -> torch.Tensor:
    """Reference softmax(q k^T / sqrt(d)) v over a (batch, seq) padded layout, the mask built here
    from scratch. q, k, v: (batch, heads, seq, head_dim); key_mask: (batch, seq) bool, True for
    real tokens, or (batch, seq, seq) bool, True where query i may attend key j (a packed row's
    documents); half_window: a local layer's reach (query i sees key j when |i - j| <= it), None
    for a global layer. Returns (batch, heads, seq, head_dim); rows of padded queries may be NaN."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    seq = q.size(-2)
    if half_window is not None:
        i = torch.arange(seq, device=q.device)
        far = (i[:, None] - i[None, :]).abs() > half_window
        scores = scores.masked_fill(far, float("-inf"))
    if key_mask is not None:
        pairs = key_mask[:, None] if key_mask.dim() == 3 else key_mask[:, None, None, :]
        scores = scores.masked_fill(~pairs, float("-inf"))
    return scores.softmax(-1) @ v


class Tokens:
    """Where a batch's real tokens sit in its (batch, seq) layout, and the moves between the two.

    With padding, token tensors are (n_real, ...) and every per-token step skips the padding. On
    the CPU that is work saved outright: the projections and the MLP, nearly all of the FLOPs at
    BERT-like sizes, and the norms, GELU and dropout masks shrink by the padded fraction, for one
    scatter and one gather per layer around attention.
    Measured here: a training step on 16 x 256 rows 66% real (hidden 256, 4 layers, 2 threads)
    took 2.2 s against 3.0 s for the padded computation. Without padding (attention_mask None,
    or all ones) the tensors stay (batch, seq, ...) and `pad` / `unpad` do nothing: the fast path.
    A pairwise (batch, seq, seq) attention_mask (packed documents) pads nothing either: the tensors
    stay (batch, seq, ...) and only `allowed` changes."""

    def __init__(self, attention_mask: Optional[torch.Tensor], batch: int, seq: int, device: torch.device,
                 unpad: bool = True):
        """unpad=False (model.unpad): the same masks, but every per-token step runs on every
        position, padding included: the padded computation, to measure what unpadding saves."""
        self.batch, self.seq = batch, seq
        self.real: Optional[torch.Tensor] = None  # (batch, seq) bool; None: nothing is padded
        self.keys: Optional[torch.Tensor] = None  # (batch, seq) bool: the keys every query may see
        self.index: Optional[torch.Tensor] = None  # (n_real,) int64 flat positions in batch * seq
        self.pairs: Optional[torch.Tensor] = None  # (batch, seq, seq) bool: query i may see key j
        self.device = device
        if attention_mask is not None and attention_mask.dim() == 3:
            if attention_mask.shape != (batch, seq, seq):
                raise ValueError(f"a pairwise attention_mask is (batch, seq, seq) = {(batch, seq, seq)}; "
                                 f"got {tuple(attention_mask.shape)}")
            self.pairs = attention_mask.bool()
        elif attention_mask is not None:
            if attention_mask.shape != (batch, seq):
                raise ValueError(f"attention_mask is (batch, seq) = {(batch, seq)} or (batch, seq, seq); "
                                 f"got {tuple(attention_mask.shape)}")
            real = attention_mask.bool()
            index = real.flatten().nonzero().squeeze(1)
            if index.numel() < batch * seq and not unpad:  # padded: "unpad" to every position
                index = torch.arange(batch * seq, device=device)
            if not bool(real.all()):
                self.real, self.index = real, index
                # a row of padding alone attends to its padding: finite numbers that nobody reads.
                # Its fully masked rows would be NaN, and a NaN activation, even one whose output is
                # dropped, makes its weight gradients NaN (0 * NaN in the matmul's backward).
                self.keys = real | ~real.any(1, keepdim=True)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> the token layout: (n_real, ...), or unchanged without padding."""
        return x if self.index is None else x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """The token layout -> (batch, seq, ...), zeros at padded positions."""
        if self.index is None:
            return x
        out = x.new_zeros(self.batch * self.seq, *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(self.batch, self.seq, *x.shape[1:])

    def pad_all(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`pad` of several same-shaped tensors in one scatter."""
        if self.index is None:
            return xs
        return self.pad(torch.stack(xs, 1)).unbind(2)

    def allowed(self, half_window: Optional[int], queries: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The attention mask, bool, True = may attend, broadcastable to (batch, heads, q, seq);
        None when every query may see every key. half_window: a local layer's reach (None:
        global); queries: (batch, k) positions of the queries (default: every position)."""
        if half_window is not None and self.seq - 1 <= half_window:
            half_window = None  # the window covers the whole sequence: a local layer is global here
        pairs = self.pairs  # (batch, seq, seq) or None; its rows at the queries: (batch, k, seq)
        if pairs is not None and queries is not None:
            pairs = pairs.gather(1, queries[:, :, None].expand(-1, -1, self.seq))
        if half_window is None:  # global: every real key, never padding; or the pairwise mask
            if pairs is not None:
                return pairs[:, None]
            return None if self.keys is None else self.keys[:, None, None, :]
        keys = torch.arange(self.seq, device=self.device)
        q = keys if queries is None else queries  # (seq,) or (batch, k)
        # exactly transformers' rule for sdpa / eager: |i - j| <= local_attention // 2
        allowed = (q[..., :, None] - keys).abs() <= half_window  # (seq, seq) or (batch, k, seq)
        if self.keys is not None:
            # never padding; but each query may see itself, so that a padded query (its output is
            # thrown away) whose window holds no real token is not fully masked either
            allowed = (allowed & self.keys[:, None, :]) | (q[..., :, None] == keys)
        if pairs is not None:  # the window AND the pairwise mask (which lets each query see itself)
            allowed = allowed & pairs
        return allowed[None, None] if allowed.dim() == 2 else allowed[:, None]  # (batch or 1, 1, q, seq)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (lmforge/ops/rope.py) on x (batch, heads, seq, head_dim), computed in fp32 and cast
    back, as transformers' ModernBERT does: under bf16 autocast the same numbers as there.
    Positions are those of the padded layout, 0..seq-1 in every row (transformers' position_ids),
    so a left-padded row is placed there and here alike."""
    return apply_rope(x.float(), cos, sin).to(x.dtype)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.token = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=False)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (*T) -> (*T, hidden): no position embeddings, RoPE places tokens instead."""
        return self.dropout(self.norm(self.token(input_ids)))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, local: bool):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.half_window = cfg.local_window // 2 if local else None  # a local layer's reach
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)  # one matmul: q, k, v stacked
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.out.scaled_init = True
        self.attn_dropout = cfg.dropout
        self.dropout = Dropout(cfg.dropout)  # on the output projection, as transformers' out_drop

    def forward(self, x: torch.Tensor, tokens: Tokens, rope: tuple[torch.Tensor, torch.Tensor],
                allowed: Optional[torch.Tensor], queries: Optional[tuple] = None) -> torch.Tensor:
        """x: the normed tokens, (*T, hidden) in `tokens`' layout; rope: (cos, sin) (seq,
        head_dim); allowed: `tokens.allowed(...)`. Returns (*T, hidden). With `queries` = (x_q
        (batch, k, hidden), their positions (batch, k), their mask): only those queries are
        computed, keys and values still from every token; returns (batch, k, hidden)."""
        cos, sin = rope
        heads = (self.num_heads, self.head_dim)
        if queries is None:
            q, k, v = self.qkv(x).unflatten(-1, (3, *heads)).unbind(-3)  # (*T, heads, head_dim) each
            q, k, v = (t.transpose(1, 2) for t in tokens.pad_all(q, k, v))  # (batch, heads, seq, head_dim)
            q = rotate(q, cos, sin)
        else:  # the q rows of the fused matrix on the queries alone, the k and v rows on every token
            x_q, positions, allowed = queries
            w_q, w_kv = self.qkv.weight.split((x.size(-1), 2 * x.size(-1)))
            k, v = F.linear(x, w_kv).unflatten(-1, (2, *heads)).unbind(-3)
            k, v = (t.transpose(1, 2) for t in tokens.pad_all(k, v))
            q = rotate(F.linear(x_q, w_q).unflatten(-1, heads).transpose(1, 2), cos[positions], sin[positions])
        k = rotate(k, cos, sin)
        y = attention(q, k, v, attn_mask=allowed, dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).flatten(2)  # (batch, q, hidden)
        return self.dropout(self.out(y if queries is not None else tokens.unpad(y)))


class GeGLU(nn.Module):
    """up -> (input, gate) halves -> gelu(input) * gate -> dropout -> down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.down.scaled_init = True
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.up(x).chunk(2, dim=-1)
        # exact (erf) GELU: transformers' "gelu", which ModernBERT's checkpoints use
        return self.down(self.dropout(F.gelu(value) * gate))


class Layer(nn.Module):
    """One pre-norm encoder block, global or local."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.is_global = index % cfg.global_every == 0
        # layer 0 reads the embedding norm's output, already normalised: transformers has nn.Identity here
        self.attn_norm = (nn.Identity() if index == 0 else
                          nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=False))
        self.attn = SelfAttention(cfg, local=not self.is_global)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=False)
        self.mlp = GeGLU(cfg)

    def forward(self, x: torch.Tensor, tokens: Tokens, rope: tuple[torch.Tensor, torch.Tensor],
                allowed: Optional[torch.Tensor], queries: Optional[tuple] = None) -> torch.Tensor:
        """x: (*T, hidden) in `tokens`' layout -> (*T, hidden). With `queries` = (positions
        (batch, k), their mask): only those positions, (batch, k, hidden)."""
        normed = self.attn_norm(x)
        if queries is None:
            x = x + self.attn(normed, tokens, rope, allowed)
        else:
            positions, allowed_q = queries

            def at(t: torch.Tensor) -> torch.Tensor:  # token layout -> (batch, k, hidden) at `positions`
                return tokens.pad(t).gather(1, positions[:, :, None].expand(-1, -1, t.size(-1)))

            x = at(x) + self.attn(normed, tokens, rope, None, (at(normed), positions, allowed_q))
        return x + self.mlp(self.mlp_norm(x))


class ModernBertModel(nn.Module):
    """The encoder: ids -> contextual hidden states."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=False)
        self.apply(lambda module: init_modernbert_weights(module, cfg))

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids: (batch, seq) int64; token_type_ids: accepted for BertModel's signature and
        ignored (ModernBERT has no segment embeddings); attention_mask, one of
        - (batch, seq): 1/True for real tokens, 0/False for padding (removed, see `Tokens`);
        - (batch, seq, seq) bool: pairwise, True where query i may attend key j, for packed windows
          whose documents must not see each other (block-diagonal). Every row must hold at least
          its own position; nothing is padded or removed. Every layer attends under this mask, a
          local layer under it AND its window; RoPE positions stay the row's 0..seq-1;
        - None when nothing is padded or packed (the fast path).
        Returns hidden states (batch, seq, hidden), zeros at padded positions.

        With `positions` ((batch, k) int64): (batch, k, hidden), the outputs at those positions of
        each row only (finite filler at padded ones). The last layer then runs its queries,
        attention output, MLP and norms on those positions alone (its keys and values still see
        every token; with a pairwise mask its queries use the mask's rows at `positions`): equal
        to the full output there, for a fraction of the last layer's work."""
        batch, seq = input_ids.shape
        tokens = Tokens(attention_mask, batch, seq, input_ids.device, unpad=self.cfg.unpad)
        x = self.embeddings(tokens.unpad(input_ids))  # (*T, hidden): (batch, seq, hidden) or (n_real, hidden)
        # made once a forward per kind of layer (global, local): RoPE tables and masks
        kinds = {layer.is_global: layer.attn.half_window for layer in self.layers}
        rope = {g: rope_tables(self.cfg.hidden_size // self.cfg.num_heads, seq, self.theta(g), input_ids.device)
                for g in kinds}
        allowed = {g: tokens.allowed(half_window) for g, half_window in kinds.items()}
        for i, layer in enumerate(self.layers):
            queries = None
            if positions is not None and i == len(self.layers) - 1:
                queries = (positions, tokens.allowed(layer.attn.half_window, positions))
            x = layer(x, tokens, rope[layer.is_global], allowed[layer.is_global], queries)
        x = self.final_norm(x)
        return x if positions is not None else tokens.pad(x)

    def theta(self, is_global: bool) -> float:
        """The RoPE base of a global or a local layer."""
        return (self.cfg.rope_theta or GLOBAL_ROPE_THETA) if is_global else self.cfg.local_rope_theta


def init_modernbert_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """transformers ModernBERT's `_init_weights`, for `module.apply`: every matrix and embedding
    from N(0, init_std) cut at +-2 std; the residual-stream outputs (attention out, MLP down) and
    the head's dense layer (marked `scaled_init`) with std init_std / sqrt(2 * layers), GPT-2's
    depth scaling that keeps the residual stream's variance from growing with depth; biases zero
    (ModernBERT has none; a classifier's heads do); LayerNorms as the identity."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        std = cfg.init_std / (math.sqrt(2.0 * cfg.num_layers) if getattr(module, "scaled_init", False) else 1.0)
        if std > 0:
            nn.init.trunc_normal_(module.weight, 0.0, std, -INIT_CUTOFF * std, INIT_CUTOFF * std)
        else:
            nn.init.zeros_(module.weight)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MaskedLMHead(nn.Module):
    """transformers' ModernBertPredictionHead (dense -> GELU -> LayerNorm) and the decoder's bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.dense.scaled_init = True
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., hidden): what goes into the vocabulary projection."""
        return self.norm(F.gelu(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., vocab) logits; the decoder matrix is the token embedding, passed in
        (BERT's MaskedLMHead says why)."""
        return F.linear(self.transform(hidden), decoder_weight, self.bias)


class ModernBertForMaskedLM(nn.Module):
    encoder_attr = "model"  # the attribute holding the encoder; also transformers' prefix
    encoder_class = ModernBertModel

    @staticmethod
    def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
        """ModernBERT's initialisation of `module` (for `.apply`), also of a classifier's heads."""
        init_modernbert_weights(module, cfg)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.next_sentence_head:
            raise ValueError("the next-sentence head (mlm.nsp) is BERT's only; ModernBERT has none")
        self.cfg = cfg
        self.model = ModernBertModel(cfg)  # initialises itself
        self.mlm_head = MaskedLMHead(cfg)
        self.mlm_head.apply(lambda module: init_modernbert_weights(module, cfg))

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, selected: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None,
                head_loss: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]] = None
                ) -> MaskedLMOutput:
        """Exactly BertForMaskedLM.forward's contract (its docstring has the details), without NSP:
        input_ids (batch, seq) int64; token_type_ids ignored; attention_mask (batch, seq) padding,
        (batch, seq, seq) pairwise (packed documents that must not see each other; see
        ModernBertModel.forward) or None.

        - nothing else: `logits` (batch, seq, vocab).
        - `selected` ((batch, seq) bool): `logits` (n_selected, vocab) at those positions,
          row-major; the last layer and the vocabulary projection run on those positions alone.
        - `targets` ((n_selected,) with `selected`, else (batch, seq)): `loss_sum` and `correct`
          from the fused, chunked projection + loss (lmforge/ops/linear_cross_entropy.py).
        - `head_loss` (with `selected`, no targets): `head = head_loss(head input at the selected
          positions, decoder, bias)`, and `hidden`, the final states (batch, seq, hidden).
        `next_sentence_logits` is always None."""
        if head_loss is not None:
            if selected is None or targets is not None:
                raise ValueError("head_loss goes with `selected` and without `targets`")
            hidden = self.model(input_ids, token_type_ids, attention_mask)
            head = head_loss(self.mlm_head.transform(hidden[selected]), self.decoder, self.mlm_head.bias)
            return MaskedLMOutput(hidden=hidden, head=head)
        if selected is None:
            hidden = self.model(input_ids, token_type_ids, attention_mask)
        else:  # the last layer too computes only the selected positions (ModernBertModel.forward says how)
            positions, valid = selected_positions(selected)
            hidden = self.model(input_ids, token_type_ids, attention_mask, positions=positions)[valid]
        return masked_lm_output(self.mlm_head, hidden, self.decoder, targets)

    @property
    def decoder(self) -> torch.Tensor:
        """(vocab, hidden): the vocabulary projection, tied to the token embeddings; read where it
        is used, after the encoder (BertForMaskedLM.decoder says why)."""
        return self.model.embeddings.token.weight


# ---------------------------------------------------------------------------------------------
# transformers' ModernBertForMaskedLM <-> lmforge's. Its decoder is tied to the token embedding
# (only its bias is ours); an encoder-only `ModernBertModel` file has the names without "model.".

_NAMES = [
    ("model.embeddings.token.weight", "model.embeddings.tok_embeddings.weight"),
    ("model.embeddings.norm.weight", "model.embeddings.norm.weight"),
    ("model.layers.{i}.attn_norm.weight", "model.layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.attn.qkv.weight", "model.layers.{i}.attn.Wqkv.weight"),
    ("model.layers.{i}.attn.out.weight", "model.layers.{i}.attn.Wo.weight"),
    ("model.layers.{i}.mlp_norm.weight", "model.layers.{i}.mlp_norm.weight"),
    ("model.layers.{i}.mlp.up.weight", "model.layers.{i}.mlp.Wi.weight"),
    ("model.layers.{i}.mlp.down.weight", "model.layers.{i}.mlp.Wo.weight"),
    ("model.final_norm.weight", "model.final_norm.weight"),
    ("mlm_head.dense.weight", "head.dense.weight"),
    ("mlm_head.norm.weight", "head.norm.weight"),
    ("mlm_head.bias", "decoder.bias"),
]
# transformers tensors with no lmforge counterpart: the tied decoder, RoPE buffers (older versions)
_IGNORED = re.compile(r"(^decoder\.weight|rotary_emb\..*inv_freq)$")
NAMES = NameMap(_NAMES, _IGNORED, "ModernBERT", ("model.", "head.", "decoder."))


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmforge ModernBertForMaskedLM tensors -> transformers ModernBertForMaskedLM names (the
    decoder stays tied: transformers makes decoder.weight from the embedding)."""
    return NAMES.to_hf(state)


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers ModernBERT tensors (ModernBertForMaskedLM, or ModernBertModel without the
    "model." prefix) -> lmforge names. Returns (tensors, names that were ignored)."""
    return NAMES.from_hf(state)


def _theta(hf: dict, layer_type: str, old_key: str, default: float) -> float:
    """A layer type's RoPE base: transformers 5.x's rope_parameters, else 4.x's global_/local_rope_theta."""
    params = (hf.get("rope_parameters") or {}).get(layer_type) or {}
    if params.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise LmforgeError(f"ModernBERT RoPE scaling ({params.get('rope_type') or hf.get('rope_scaling')}) is not "
                           f"supported; only plain RoPE")
    return float(params.get("rope_theta", hf.get(old_key, default)))


def _global_every(hf: dict, layers: int) -> int:
    """Layer i is global when i % n == 0: n from layer_types (5.x) or global_attn_every_n_layers."""
    types = hf.get("layer_types")
    if not types:
        return int(hf.get("global_attn_every_n_layers", 3))
    for n in range(1, layers + 1):
        if list(types) == ["full_attention" if i % n == 0 else "sliding_attention" for i in range(layers)]:
            return n
    raise LmforgeError(f"ModernBERT layer_types {types} are not global every n-th layer from layer 0; lmforge "
                       f"implements only that pattern")


def model_config_from_hf(hf: dict, dropout: Optional[float] = None) -> ModelConfig:
    """A transformers ModernBertConfig dict -> ModelConfig (arch "modernbert"), refusing variants
    lmforge does not implement. One `dropout` stands for transformers' three (embedding,
    attention, MLP): the largest of them unless given."""
    if hf.get("model_type") != "modernbert":
        raise LmforgeError(f"model_type {hf.get('model_type')!r} is not supported here; expected a ModernBERT "
                           f"(model_type 'modernbert')")
    for key, want in (("hidden_activation", "gelu"), ("classifier_activation", "gelu"), ("norm_bias", False),
                      ("attention_bias", False), ("mlp_bias", False), ("classifier_bias", False),
                      ("decoder_bias", True), ("tie_word_embeddings", True)):
        if hf.get(key, want) != want:
            raise LmforgeError(f"ModernBERT with {key}={hf[key]!r} is not supported; lmforge implements {key}={want!r}")
    require_keys(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    layers = hf["num_hidden_layers"]
    if dropout is None:
        dropout = max(float(hf.get(k, 0.0)) for k in ("embedding_dropout", "attention_dropout", "mlp_dropout"))
    return ModelConfig(
        arch="modernbert", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=layers,
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 8192), type_vocab_size=1, dropout=dropout,
        layer_norm_eps=hf.get("norm_eps", 1e-5), init_std=hf.get("initializer_range", 0.02),
        rope_theta=_theta(hf, "full_attention", "global_rope_theta", GLOBAL_ROPE_THETA),
        local_rope_theta=_theta(hf, "sliding_attention", "local_rope_theta", 10000.0),
        # transformers halves local_attention (rounding down), so an odd window is the even one below it
        local_window=hf.get("local_attention", 128) // 2 * 2, global_every=_global_every(hf, layers))


def hf_config_from_model(cfg: ModelConfig, pad_token_id: Optional[int], cls_token_id: Optional[int],
                         sep_token_id: Optional[int], mask_token_id: Optional[int] = None) -> dict:
    """A config.json from which transformers builds the model this cfg describes. Both spellings
    of the layer pattern and RoPE bases: layer_types / rope_parameters (transformers 5.x) and
    global_attn_every_n_layers / global_rope_theta / local_rope_theta (4.x)."""
    global_theta = float(cfg.rope_theta or GLOBAL_ROPE_THETA)
    local_theta = float(cfg.local_rope_theta)
    out = {
        "architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads, "hidden_activation": "gelu",
        "max_position_embeddings": cfg.max_position_embeddings, "initializer_range": cfg.init_std,
        "initializer_cutoff_factor": INIT_CUTOFF, "norm_eps": cfg.layer_norm_eps, "norm_bias": False,
        "attention_bias": False, "mlp_bias": False, "decoder_bias": True, "classifier_bias": False,
        "classifier_activation": "gelu", "embedding_dropout": cfg.dropout, "attention_dropout": cfg.dropout,
        "mlp_dropout": cfg.dropout, "local_attention": cfg.local_window,
        "layer_types": ["full_attention" if i % cfg.global_every == 0 else "sliding_attention"
                        for i in range(cfg.num_layers)],
        "global_attn_every_n_layers": cfg.global_every,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": global_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        "global_rope_theta": global_theta, "local_rope_theta": local_theta,
        "pad_token_id": pad_token_id, "cls_token_id": cls_token_id, "sep_token_id": sep_token_id,
        "bos_token_id": cls_token_id, "eos_token_id": sep_token_id, "sparse_prediction": False,
        "tie_word_embeddings": True,
    }
    if mask_token_id is not None:
        out["mask_token_id"] = mask_token_id
    return out


# The Family interop (lmforge/models/family.py).

def to_hf(state: Tensors, cfg: ModelConfig, special: SpecialIds, encoder_only: bool) -> tuple[dict, Tensors]:
    """A ModernBertForMaskedLM, or with `encoder_only` (a classifier's encoder, under "model.") a
    ModernBertModel: its names without "model."."""
    hf = hf_config_from_model(cfg, special.pad, special.cls, special.sep, special.mask)
    if not encoder_only:
        return hf, to_hf_state_dict(state)
    hf["architectures"] = ["ModernBertModel"]
    encoder = to_hf_state_dict({k: v for k, v in state.items() if k.startswith("model.")})
    return hf, {k[len("model."):]: v for k, v in encoder.items()}


def from_hf(hf: dict, state: Tensors) -> tuple[ModelConfig, Tensors, list[str]]:
    tensors, ignored = from_hf_state_dict(state)
    return model_config_from_hf(hf), tensors, ignored


FAMILY = Family("modernbert", "encoder", ModernBertForMaskedLM, ("modernbert",), to_hf=to_hf, from_hf=from_hf)
