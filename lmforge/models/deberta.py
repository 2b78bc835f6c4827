"""DeBERTa-v3 (He et al. 2021, 2023) as a plain PyTorch model, in the order the data flows through it.

    token (+ token-type) embeddings -> LayerNorm -> dropout          (no absolute positions)
    relative-position embeddings (2 x span rows) -> LayerNorm        (once per forward, shared by all layers)
    N x [ disentangled self-attention -> dropout -> add & LayerNorm -> GELU MLP -> dropout -> add & LayerNorm ]
    masked-LM head: dense -> GELU -> LayerNorm -> decoder tied to the token embeddings (+ bias)
    (optional) enhanced mask decoder: the last layer again, its queries given absolute positions

Disentangled attention scores a query i and a key j by content and by relative position:

    A[i, j] = ( q_i . k_j                 content -> content
              + q_i . Kr[d(i, j)]         content -> position  (c2p)
              + k_j . Qr[d(i, j)] )       position -> content  (p2c)
              / sqrt(head_dim * 3)        (1 + the number of position terms, so every term keeps its scale)

where Kr, Qr are the layer's own key and query projections of the relative-position embeddings
(share_att_key: no extra matrices) and d(i, j) the row of the embedding table for the distance
i - j: distances within +-buckets/2 keep a row each, longer ones share rows logarithmically
(`log_bucket`), up to max_relative_positions and clamped beyond. The two position terms are
computed for every (query, table row) pair with one matmul each and then gathered per (i, j);
the result is an additive bias for `F.scaled_dot_product_attention`. `naive_disentangled_scores`
is the slow, obviously-correct reference it is tested against.

This is exactly transformers' `DebertaV2Model` with DeBERTa-v3's settings (relative_attention,
pos_att_type p2c|c2p, position_buckets, share_att_key, norm_rel_ebd layer_norm,
position_biased_input false, no conv layer, gelu); other variants are refused on import. At the
real positions of a padded batch it computes the same numbers; at padded positions it does not
(transformers also masks padded *queries*, giving them uniform attention; here, as in lmforge's
BERT, only padded keys are masked, and padded outputs are never read).

Packed windows (as lmforge's BERT): `attention_mask` may also be pairwise, (batch, seq, seq) bool,
True where query i may attend key j, so that the documents packed into one window do not see each
other. Every layer masks with it. As the model has no absolute positions, only distances, a
document anywhere in a window gets exactly the hidden states it would get alone (the enhanced mask
decoder's absolute positions are the window's, so there only a document at the window's start does).

Token types: `cfg.type_vocab_size` is transformers' `type_vocab_size` one to one: 0 means no
token-type embedding at all (DeBERTa-v3's released models), n >= 1 an n-row table (lmforge's
default 2, as BERT, so segment ids from the data pipeline are used).

The enhanced mask decoder (EMD, DeBERTa paper section 3.3, cfg.enhanced_mask_decoder): without
absolute positions in the input, the MLM head gets them just before decoding. As the official
DeBERTa code does it: the input H of the last encoder layer (the output of the layer below) plus
an absolute position embedding P is the query, H the keys and values, and the last layer (its
own weights, shared) runs twice, the second time on the first's output; the result goes to the
MLM head. The encoder, what a classifier fine-tunes, is unchanged; only the MLM logits differ,
and transformers has no EMD, so such a model cannot be exported with parity (`hf_compatible`).

Module names follow the paper's parts like lmforge's BERT; `NAMES` at the bottom maps them to
transformers' `DebertaV2ForMaskedLM`. The model knows nothing about tasks, devices or parallelism.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.bert import (MaskedLMHead, MaskedLMOutput, init_bert_weights, masked_lm_output,
                                 selected_positions)
from lmforge.models.family import Family, SpecialIds, Tensors
from lmforge.models.hf import NameMap, require_keys
from lmforge.ops.dropout import Dropout, dropout

# c2p and p2c: the score is divided by sqrt(head_dim * (1 + 2)), as transformers' scale_factor
POSITION_TERMS = 2


def log_bucket(relative: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """(...) int64 query-minus-key distances -> (...) int64 log buckets (transformers'
    `make_log_bucket_position`): distances within +-buckets/2 stay themselves, longer ones grow
    logarithmically, reaching +-(buckets - 1) at max_distance - 1 (the caller clamps beyond). The
    arithmetic is float32, step for step as transformers': float64 gives another bucket for some
    long distances (e.g. 1292 with 256 buckets and max_distance 256)."""
    mid = buckets // 2
    distance = relative.abs()
    # distances below mid (which keep their own row) take mid - 1 only to keep the log finite
    far = torch.where(distance < mid, torch.full_like(distance, mid - 1), distance)
    ratio = torch.log(torch.tensor((max_distance - 1) / mid, dtype=torch.float32, device=relative.device))
    logs = torch.ceil(torch.log(far.to(torch.float32) / mid) / ratio * (mid - 1)) + mid
    return torch.where(far <= mid, relative.to(torch.float32), logs * torch.sign(relative)).to(torch.int64)


def reference_log_bucket(relative: int, buckets: int, max_distance: int) -> int:
    """`log_bucket` of one distance in plain float64 math. Equal to the float32 version except,
    rarely, by one bucket at long distances (`log_bucket` says where)."""
    mid = buckets // 2
    if abs(relative) <= mid:
        return relative
    bucket = math.ceil(math.log(abs(relative) / mid) / math.log((max_distance - 1) / mid) * (mid - 1)) + mid
    return bucket if relative > 0 else -bucket


def disentangled_bias(q: torch.Tensor, k: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor,
                      index: torch.Tensor) -> torch.Tensor:
    """The two position terms, unscaled: c2p[i, j] + p2c[i, j] = q_i . pos_k[index[i, j]] +
    k_j . pos_q[index[i, j]]. q: (b, heads, tq, d), k: (b, heads, t, d); pos_q, pos_k: (heads,
    rows, d), the layer's query / key projections of the relative-position table; index: (tq, t)
    or (b, tq, t) int64 table rows. Returns (b, heads, tq, t).

    Each term is one matmul against the whole table, (tq or t) x rows, then a gather of the
    (i, j) entries: cheaper than gathering (tq, t, d) position vectors first. transformers indexes
    p2c by -d(j, i), the key's distance to the query negated; the buckets are odd (d(-x) = -d(x)),
    so that is d(i, j), the c2p index, and one index serves both."""
    b, heads, tq, _ = q.shape
    t = k.size(2)
    index = (index if index.dim() == 3 else index[None]).unsqueeze(1).expand(b, heads, tq, t)
    c2p = torch.gather(q @ pos_k.transpose(-1, -2), -1, index)  # (b, heads, tq, rows) -> (b, heads, tq, t)
    # k @ pos_q^T is (b, heads, t, rows): row j is key j's; gather row j at index[i, j] for every i
    p2c = torch.gather(k @ pos_q.transpose(-1, -2), -1, index.transpose(-1, -2)).transpose(-1, -2)
    return c2p + p2c


def naive_disentangled_scores(q: torch.Tensor, k: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor,
                              query_positions: torch.Tensor, span: int, buckets: int,
                              max_distance: int) -> torch.Tensor:
    """Reference for the full score, with loops: A[b, h, i, j] = (q.k + c2p + p2c) / sqrt(3 d),
    written as transformers defines each term. q: (b, heads, tq, d) at absolute positions
    `query_positions` ((b, tq) int64); k: (b, heads, t, d) at positions 0..t-1; pos_q, pos_k:
    (heads, 2 span, d); buckets 0 = none. Returns (b, heads, tq, t)."""
    def bucket(distance: int) -> int:
        return reference_log_bucket(distance, buckets, max_distance) if buckets > 0 else distance

    def row(relative: int) -> int:  # table row, clamped to the table
        return min(max(relative + span, 0), 2 * span - 1)

    b, heads, tq, d = q.shape
    t = k.size(2)
    scores = torch.empty(b, heads, tq, t, dtype=q.dtype)
    for n in range(b):
        for i in range(tq):
            p = int(query_positions[n, i])
            for j in range(t):
                # the query's content against the key's position relative to the query
                c2p = (q[n, :, i] * pos_k[:, row(bucket(p - j))]).sum(-1)
                # the key's content against the query's position relative to the key, negated (transformers' -r_pos)
                p2c = (k[n, :, j] * pos_q[:, row(-bucket(j - p))]).sum(-1)
                c2c = (q[n, :, i] * k[n, :, j]).sum(-1)
                scores[n, :, i, j] = (c2c + c2p + p2c) / math.sqrt(d * (1 + POSITION_TERMS))
    return scores


class Embeddings(nn.Module):
    """Token (+ token-type) embeddings, LayerNorm, dropout: no absolute positions (position_biased_input false)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.token = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """(b, t) int64 -> (b, t, hidden). Without a token-type table, token_type_ids are ignored (as transformers)."""
        x = self.token(input_ids)
        if self.token_type is not None:
            # single-segment inputs (all type 0) are the common case: add row 0 without a gather
            x = x + (self.token_type.weight[0] if token_type_ids is None else self.token_type(token_type_ids))
        return self.dropout(self.norm(x))


@dataclasses.dataclass
class Shared:
    """What every layer of one forward shares (made by `DebertaModel.shared`).

    mask: None when nothing is masked; (b, 1, 1, t) bool, True for real keys (a padding mask); or
        (b, 1, tq, t) bool, True where query i may attend key j (a pairwise mask: packed documents),
        tq = t, or k where the last layer's queries are `positions` only (`Shared.rows`).
    relative: (2 span, hidden), the relative-position embeddings after their LayerNorm.
    index: (t, t) int64, the row of `relative` for query position i and key position j.
    """

    mask: Optional[torch.Tensor]
    relative: torch.Tensor
    index: torch.Tensor

    def rows(self, positions: torch.Tensor) -> "Shared":
        """For queries at `positions` ((b, k) int64) only: a pairwise mask's rows of those queries,
        (b, 1, k, t); a padding mask (or none) serves every query as it is."""
        if self.mask is None or self.mask.size(2) == 1:
            return self
        rows = self.mask.gather(2, positions[:, None, :, None].expand(-1, -1, -1, self.mask.size(3)))
        return dataclasses.replace(self, mask=rows)


class RelativePositions(nn.Module):
    """The relative-position table (2 span rows: distances -span..span-1, after bucketing) and its LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        max_rel = cfg.max_relative_positions
        self.max_distance = max_rel if max_rel >= 1 else cfg.max_position_embeddings  # transformers: < 1 means that
        self.buckets = cfg.position_buckets  # 0: no bucketing, a row per distance up to max_distance
        if self.buckets == 1:
            raise ValueError("model.position_buckets=1 leaves no distance a bucket of its own; use 0, or 2 and more")
        self.span = self.buckets if self.buckets > 0 else self.max_distance
        self.embeddings = nn.Embedding(2 * self.span, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def index(self, seq: int, device: torch.device) -> torch.Tensor:
        """(seq, seq) int64: the table row of query position i and key position j."""
        positions = torch.arange(seq, device=device)
        relative = positions[:, None] - positions[None, :]
        if self.buckets > 0:
            relative = log_bucket(relative, self.buckets, self.max_distance)
        return (relative + self.span).clamp(0, 2 * self.span - 1)

    def forward(self) -> torch.Tensor:
        return self.norm(self.embeddings.weight)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
            dropout_p: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v with attention dropout. q: (b, heads, tq, d), k, v: (b,
    heads, t, d), bias: (b, heads, tq, t) of q's dtype. Returns (b, heads, tq, d). SDPA except when
    training with dropout on the CPU, where its math path would draw the slow Bernoulli mask
    (lmforge/ops/attention.py, which takes boolean masks only, says why); there the same steps
    with lmforge's cheaper dropout."""
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    probs = torch.baddbmm(bias.flatten(0, 1), q.flatten(0, 1), k.flatten(0, 1).transpose(-1, -2), alpha=scale)
    return dropout(probs.softmax(-1), dropout_p, True).view(bias.shape) @ v


class DisentangledSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        # on the relative embeddings, in every layer (transformers' pos_dropout)
        self.position_dropout = Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout
        self.scale = 1.0 / math.sqrt(self.head_dim * (1 + POSITION_TERMS))

    def forward(self, x: torch.Tensor, shared: Shared, queries: Optional[torch.Tensor] = None,
                index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (b, t, h), the positions attended to; queries: (b, tq, h), the positions that attend
        (default: x itself), with `index` ((b, tq, t), default shared.index) their table rows;
        a pairwise shared.mask has tq rows (`Shared.rows`). Returns (b, tq, h)."""
        queries = x if queries is None else queries
        index = shared.index if index is None else index

        def heads(proj: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:  # (..., n, h) -> (..., heads, n, head_dim)
            return proj(inputs).unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

        q, k, v = heads(self.query, queries), heads(self.key, x), heads(self.value, x)
        # share_att_key: the position vectors go through this layer's own query and key projections
        relative = self.position_dropout(shared.relative)
        bias = disentangled_bias(q, k, heads(self.query, relative), heads(self.key, relative), index) * self.scale
        if shared.mask is not None:
            # the dtype's minimum rather than -inf (as transformers): a row with no real key stays finite
            bias = bias.masked_fill(~shared.mask, torch.finfo(bias.dtype).min)
        y = _attend(q, k, v, bias, self.scale, self.attn_dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(queries.shape))


class Layer(nn.Module):
    """One post-LayerNorm encoder block, as BERT's, with disentangled attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = DisentangledSelfAttention(cfg)
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, shared: Shared, queries: Optional[torch.Tensor] = None,
                index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (b, t, h). With `queries` ((b, tq, h)) and their table rows `index` ((b, tq, t)) only
        those are computed (attending to all of x): returns (b, tq, h); otherwise (b, t, h)."""
        q = x if queries is None else queries
        x = self.attention_norm(q + self.dropout(self.attention(x, shared, queries, index)))
        # exact (erf) GELU, transformers' "gelu"
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


class DebertaModel(nn.Module):
    """The encoder: ids -> contextual hidden states."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.relative = RelativePositions(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, token_type_ids: (batch, seq) int64; attention_mask: (batch, seq), 1/True for
        real tokens, 0/False for padding, or None when nothing is padded (the fast path); or
        (batch, seq, seq) bool, True where query i may attend key j: packed windows whose
        documents must not see each other (data.packing=documents; every layer uses it).
        Returns hidden states (batch, seq, hidden).

        With `positions` ((batch, k) int64): (batch, k, hidden), the outputs at those positions of
        each row only (e.g. the masked positions an MLM loss reads, or [CLS] for a classifier).
        The last layer then runs its queries, attention output, feed-forward and norms on those
        positions alone, with their own relative positions to every key (and, with a pairwise
        mask, its rows at those positions): equal to the full output there, for a fraction of
        the last layer's work."""
        x, shared = self.lower_layers(input_ids, token_type_ids, attention_mask)
        return self.last_layer(x, shared, positions=positions)

    def shared(self, seq: int, attention_mask: Optional[torch.Tensor], device: torch.device) -> Shared:
        """The mask, relative embeddings and table rows every layer of this batch uses.
        attention_mask: None, (batch, seq) key padding or (batch, seq, seq) pairwise (`forward`)."""
        mask = None
        if attention_mask is not None and attention_mask.dim() == 3:  # pairwise: (batch, 1, seq, seq)
            if attention_mask.shape[1:] != (seq, seq):
                raise ValueError(f"a pairwise attention_mask is (batch, seq, seq) = (batch, {seq}, {seq}), "
                                 f"not {tuple(attention_mask.shape)}")
            mask = attention_mask.bool()[:, None]
        elif attention_mask is not None:  # padding: (batch, 1, 1, seq), every query sees every real key
            mask = attention_mask.bool()[:, None, None, :]
        return Shared(mask, self.relative(), self.relative.index(seq, device))

    def lower_layers(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                     attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Shared]:
        """Embeddings and every layer but the last: (the last layer's input (batch, seq, hidden),
        what the layers share). The enhanced mask decoder starts from here."""
        shared = self.shared(input_ids.size(1), attention_mask, input_ids.device)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers[:-1]:
            x = layer(x, shared)
        return x, shared

    def last_layer(self, x: torch.Tensor, shared: Shared, queries: Optional[torch.Tensor] = None,
                   positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The last layer over x ((batch, seq, hidden), its input), computed for the queries at
        `positions` ((batch, k) int64; default every position) only; `queries` ((batch, k or seq,
        hidden)) default to x there; a pairwise mask is read at the rows of those queries.
        Returns (batch, k or seq, hidden)."""
        index = None
        if positions is not None:
            index = shared.index[positions]  # (batch, k, seq): each query's own relative positions
            shared = shared.rows(positions)  # a pairwise mask: (batch, 1, k, seq), those queries' rows
            if queries is None:
                queries = x.gather(1, positions[:, :, None].expand(-1, -1, x.size(-1)))
        return self.layers[-1](x, shared, queries, index)


class EnhancedMaskDecoder(nn.Module):
    """EMD: absolute positions for the MLM head, through the (shared) last encoder layer run twice."""

    steps = 2  # the official DeBERTa's two passes

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, encoder: DebertaModel, x: torch.Tensor, shared: Shared,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (batch, seq, hidden), the last encoder layer's input (`DebertaModel.lower_layers`).
        Returns what the MLM head reads: (batch, k, hidden) at `positions` ((batch, k) int64), else
        (batch, seq, hidden)."""
        if positions is None:
            queries = x + self.position.weight[: x.size(1)]
        else:
            queries = x.gather(1, positions[:, :, None].expand(-1, -1, x.size(-1))) + self.position(positions)
        for _ in range(self.steps):  # keys and values stay x; the queries are refined
            queries = encoder.last_layer(x, shared, queries, positions)
        return queries


class DebertaForMaskedLM(nn.Module):
    encoder_attr = "deberta"  # the attribute holding the encoder, and transformers' prefix for it
    encoder_class = DebertaModel

    @staticmethod
    def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
        """transformers' DeBERTa initialisation, which is BERT's (N(0, init_std), zero biases,
        identity LayerNorms), for `.apply`: also of a classifier's heads."""
        init_bert_weights(module, cfg.init_std)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.next_sentence_head:
            raise ValueError("DeBERTa has no next-sentence head (mlm.nsp is BERT's only)")
        self.cfg = cfg
        self.deberta = DebertaModel(cfg)
        self.emd = EnhancedMaskDecoder(cfg) if cfg.enhanced_mask_decoder else None
        self.mlm_head = MaskedLMHead(cfg)  # dense -> GELU -> LayerNorm, bias: transformers' MLM head
        self.apply(lambda module: self.init_weights(module, cfg))

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, selected: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None,
                head_loss: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]] = None
                ) -> MaskedLMOutput:
        """input_ids, token_type_ids: (batch, seq) int64; attention_mask: (batch, seq), 1/True for
        real tokens, or None when nothing is padded; or (batch, seq, seq) bool, True where query i
        may attend key j: packed windows whose documents must not see each other (as
        `DebertaModel.forward`; the last layer and the enhanced mask decoder read its rows at the
        queries they compute). Returns a MaskedLMOutput (next_sentence_logits always None):

        - nothing else: `logits` (batch, seq, vocab).
        - `selected` ((batch, seq) bool): `logits` at those positions only, (n_selected, vocab),
          row-major order; the vocabulary projection and the last layer's per-position work (or
          the enhanced mask decoder's) then run on ~15% of positions.
        - `targets` ((n_selected,) int64 with `selected`, else (batch, seq)): `loss_sum` and
          `correct` instead of the logits, from the fused, chunked projection + loss of
          lmforge/ops (the logits never exist in memory at once).
        - `head_loss` (with `selected`, no targets): the logits are not made: the head's input at
          the selected positions, the decoder matrix and the bias go to `head_loss(x, weight,
          bias)`, whose result is `head`; `hidden` is the encoder's final hidden states at every
          position, so the last layer runs on every position."""
        if head_loss is not None:
            if selected is None or targets is not None:
                raise ValueError("head_loss goes with `selected` and without `targets`")
            x, shared = self.deberta.lower_layers(input_ids, token_type_ids, attention_mask)
            hidden = self.deberta.last_layer(x, shared)
            if self.emd is None:
                mlm = hidden[selected]
            else:
                positions, valid = selected_positions(selected)
                mlm = self.emd(self.deberta, x, shared, positions)[valid]
            head = head_loss(self.mlm_head.transform(mlm), self.decoder, self.mlm_head.bias)
            return MaskedLMOutput(hidden=hidden, head=head)
        positions = valid = None
        if selected is not None:
            positions, valid = selected_positions(selected)
        x, shared = self.deberta.lower_layers(input_ids, token_type_ids, attention_mask)
        if self.emd is None:
            hidden = self.deberta.last_layer(x, shared, positions=positions)
        else:
            hidden = self.emd(self.deberta, x, shared, positions)
        if valid is not None:
            hidden = hidden[valid]
        return masked_lm_output(self.mlm_head, hidden, self.decoder, targets)

    @property
    def decoder(self) -> torch.Tensor:
        """(vocab, hidden): the vocabulary projection, tied to the token embeddings. Read it where it
        is used, after the encoder (ZeRO-3 partitions the embeddings again after their forward)."""
        return self.deberta.embeddings.token.weight


def hf_compatible(cfg: ModelConfig) -> bool:
    """Whether transformers' DebertaV2ForMaskedLM computes this model's MLM logits: not with the
    enhanced mask decoder, which transformers lacks (its encoder alone still exports)."""
    return not cfg.enhanced_mask_decoder


# ---------------------------------------------------------------------------------------------
# transformers' DebertaV2ForMaskedLM <-> lmforge's DebertaForMaskedLM. transformers 5.x builds the
# `legacy` MLM head by default (cls.predictions.*, decoder tied to the word embeddings); with
# legacy=false it is lm_predictions.lm_head.* (the official DeBERTa names). Both are the same
# dense -> GELU -> LayerNorm -> tied decoder + bias; export writes the legacy names (and
# legacy: true), import reads either.

_NAMES = [
    ("deberta.embeddings.token.weight", "deberta.embeddings.word_embeddings.weight"),
    ("deberta.embeddings.token_type.weight", "deberta.embeddings.token_type_embeddings.weight"),
    ("deberta.embeddings.norm.{p}", "deberta.embeddings.LayerNorm.{p}"),
    ("deberta.relative.embeddings.weight", "deberta.encoder.rel_embeddings.weight"),
    ("deberta.relative.norm.{p}", "deberta.encoder.LayerNorm.{p}"),
    ("deberta.layers.{i}.attention.query.{p}", "deberta.encoder.layer.{i}.attention.self.query_proj.{p}"),
    ("deberta.layers.{i}.attention.key.{p}", "deberta.encoder.layer.{i}.attention.self.key_proj.{p}"),
    ("deberta.layers.{i}.attention.value.{p}", "deberta.encoder.layer.{i}.attention.self.value_proj.{p}"),
    ("deberta.layers.{i}.attention.out.{p}", "deberta.encoder.layer.{i}.attention.output.dense.{p}"),
    ("deberta.layers.{i}.attention_norm.{p}", "deberta.encoder.layer.{i}.attention.output.LayerNorm.{p}"),
    ("deberta.layers.{i}.ffn_in.{p}", "deberta.encoder.layer.{i}.intermediate.dense.{p}"),
    ("deberta.layers.{i}.ffn_out.{p}", "deberta.encoder.layer.{i}.output.dense.{p}"),
    ("deberta.layers.{i}.ffn_norm.{p}", "deberta.encoder.layer.{i}.output.LayerNorm.{p}"),
    ("mlm_head.dense.{p}", "cls.predictions.transform.dense.{p}"),
    ("mlm_head.norm.{p}", "cls.predictions.transform.LayerNorm.{p}"),
    ("mlm_head.bias", "cls.predictions.bias"),
    # legacy=false's names for the same tensors: read only (the first match is the one written)
    ("mlm_head.dense.{p}", "lm_predictions.lm_head.dense.{p}"),
    ("mlm_head.norm.{p}", "lm_predictions.lm_head.LayerNorm.{p}"),
    ("mlm_head.bias", "lm_predictions.lm_head.bias"),
]
# transformers tensors with no lmforge counterpart: buffers, the tied decoder, the absolute
# position table released v3 files carry unused (transformers ignores it too), the official
# replaced-token-detection head.
_IGNORED = re.compile(r"(position_ids|embeddings\.position_embeddings\.weight|cls\.predictions\.decoder\.(weight|bias)|"
                      r"mask_predictions\..*)$")
NAMES = NameMap(_NAMES, _IGNORED, "DeBERTa-v2/v3", ("deberta.", "cls.", "lm_predictions."))


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmforge DebertaForMaskedLM tensors (or its encoder's alone, `deberta.*`) -> transformers
    DebertaV2ForMaskedLM names (the decoder stays tied: not written)."""
    emd = sorted(name for name in state if name.startswith("emd."))
    if emd:
        raise LmforgeError(f"an enhanced-mask-decoder DeBERTa ({', '.join(emd)}) has no transformers counterpart; "
                           f"export its encoder (the deberta.* tensors) alone")
    return NAMES.to_hf(state)


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers DebertaV2ForMaskedLM tensors (either MLM head), or a DebertaV2Model's (no
    "deberta." prefix, no head) -> lmforge names. Returns (tensors, names that were ignored)."""
    return NAMES.from_hf(state)


def _att_types(value: Any) -> set[str]:
    if isinstance(value, str):  # old config.json files write "p2c|c2p"
        value = value.lower().split("|")
    return {v.strip() for v in value or []}


def model_config_from_hf(hf: dict, dropout: Optional[float] = None) -> ModelConfig:
    """A transformers DebertaV2Config dict -> ModelConfig (arch "deberta"), refusing in one line
    the variants lmforge does not implement (a missing key means transformers' default). One
    `dropout` stands for transformers' hidden and attention dropout: hidden_dropout_prob unless given."""
    if hf.get("model_type") != "deberta-v2":
        raise LmforgeError(f"model_type {hf.get('model_type')!r} is not supported here; expected a DeBERTa-v2/v3 "
                           f"(model_type 'deberta-v2')")
    require_keys(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings")
    heads = hf["num_attention_heads"]
    unsupported = []
    if hf.get("conv_kernel_size", 0) > 0:
        unsupported.append(f"conv layers (conv_kernel_size {hf['conv_kernel_size']})")
    if hf.get("position_biased_input", True):
        unsupported.append("position_biased_input true")
    if not hf.get("relative_attention", False):
        unsupported.append("relative_attention false")
    if _att_types(hf.get("pos_att_type")) != {"p2c", "c2p"}:
        unsupported.append(f"pos_att_type {hf.get('pos_att_type')!r}")
    if not hf.get("share_att_key", False):
        unsupported.append("share_att_key false")
    if _att_types(hf.get("norm_rel_ebd", "none")) != {"layer_norm"}:
        unsupported.append(f"norm_rel_ebd {hf.get('norm_rel_ebd', 'none')!r}")
    if hf.get("hidden_act", "gelu") != "gelu":
        unsupported.append(f"hidden_act {hf['hidden_act']!r}")
    if hf.get("embedding_size", hf["hidden_size"]) != hf["hidden_size"]:
        unsupported.append(f"embedding_size {hf['embedding_size']} != hidden_size")
    if hf.get("attention_head_size", hf["hidden_size"] // heads) * heads != hf["hidden_size"]:
        unsupported.append(f"attention_head_size {hf['attention_head_size']}")
    if unsupported:
        raise LmforgeError(f"this DeBERTa variant is not implemented: {', '.join(unsupported)}; lmforge implements "
                           f"DeBERTa-v3's (relative_attention, pos_att_type p2c|c2p, share_att_key, norm_rel_ebd "
                           f"layer_norm, no absolute position input, no conv layer, gelu)")
    max_rel = hf.get("max_relative_positions", -1)
    return ModelConfig(
        arch="deberta", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 0),
        dropout=hf.get("hidden_dropout_prob", 0.1) if dropout is None else dropout,
        layer_norm_eps=hf.get("layer_norm_eps", 1e-7), init_std=hf.get("initializer_range", 0.02),
        position_buckets=max(0, hf.get("position_buckets", -1)), max_relative_positions=max_rel if max_rel >= 1 else -1,
        enhanced_mask_decoder=False)


def hf_config_from_model(cfg: ModelConfig, pad_token_id: Optional[int] = 0,
                         architecture: str = "DebertaV2ForMaskedLM") -> dict:
    """ModelConfig -> a transformers config.json from which transformers builds this very model
    (`architecture` "DebertaV2Model" for the encoder alone)."""
    if architecture != "DebertaV2Model" and not hf_compatible(cfg):
        raise LmforgeError("transformers' DebertaV2ForMaskedLM has no enhanced mask decoder; export the encoder "
                           "alone (DebertaV2Model) or train with model.enhanced_mask_decoder=false")
    return {
        "architectures": [architecture], "model_type": "deberta-v2", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout, "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size, "initializer_range": cfg.init_std, "layer_norm_eps": cfg.layer_norm_eps,
        "relative_attention": True, "max_relative_positions": cfg.max_relative_positions,
        "position_buckets": cfg.position_buckets if cfg.position_buckets > 0 else -1,
        "pos_att_type": ["p2c", "c2p"], "share_att_key": True, "norm_rel_ebd": "layer_norm",
        "position_biased_input": False, "conv_kernel_size": 0, "pooler_hidden_size": cfg.hidden_size,
        "pooler_dropout": 0, "pooler_hidden_act": "gelu", "pad_token_id": pad_token_id, "legacy": True,
        "tie_word_embeddings": True,
    }


# The Family interop (lmforge/models/family.py).

def to_hf(state: Tensors, cfg: ModelConfig, special: SpecialIds, encoder_only: bool) -> tuple[dict, Tensors]:
    """A DebertaV2ForMaskedLM, or with `encoder_only` (a classifier's encoder, under "deberta.") a
    DebertaV2Model: its names without "deberta.". An enhanced-mask-decoder model's MLM is refused
    here rather than in an export refusal, which cannot tell that its encoder alone is wanted."""
    if not encoder_only:
        return hf_config_from_model(cfg, special.pad), to_hf_state_dict(state)
    encoder = to_hf_state_dict({k: v for k, v in state.items() if k.startswith("deberta.")})
    encoder = {k[len("deberta."):]: v for k, v in encoder.items()}
    return hf_config_from_model(cfg, special.pad, "DebertaV2Model"), encoder


def from_hf(hf: dict, state: Tensors) -> tuple[ModelConfig, Tensors, list[str]]:
    tensors, ignored = from_hf_state_dict(state)
    return model_config_from_hf(hf), tensors, ignored


FAMILY = Family("deberta", "encoder", DebertaForMaskedLM, ("deberta-v2",), to_hf=to_hf, from_hf=from_hf)
