"""BERT (Devlin et al. 2019) as a plain PyTorch model, in the order the data flows through it.

    token + position + token-type embeddings -> LayerNorm -> dropout
    N x [ self-attention -> dropout -> add & LayerNorm -> GELU MLP -> dropout -> add & LayerNorm ]
    masked-LM head: dense -> GELU -> LayerNorm -> decoder tied to the token embeddings (+ bias)

Post-LayerNorm as in the paper (GPT-2 later moved it before each block). Attention goes through
`F.scaled_dot_product_attention`, which picks a fused kernel (flash / memory-efficient on CUDA),
except when training with attention dropout on the CPU (lmforge/ops/attention.py says why);
dropout is lmforge's cheaper CPU dropout (lmforge/ops/dropout.py), plain `F.dropout` elsewhere.
`naive_attention` below is the slow, obviously-correct reference they are tested against. Module
names follow the paper's parts, and `lmforge/models/hf.py` maps them to transformers' names.
The model knows nothing about tasks, devices or parallelism.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import register_dataclass

from lmforge.config import ModelConfig
from lmforge.models.family import Family
from lmforge.models.hf import bert_from_hf, bert_to_hf
from lmforge.ops.attention import attention
from lmforge.ops.dropout import Dropout
from lmforge.ops.linear_cross_entropy import linear_cross_entropy


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference softmax(q k^T / sqrt(d)) v. q, k, v: (batch, heads, seq, head_dim); key_mask:
    (batch, seq) bool, True for real tokens. Returns (batch, heads, seq, head_dim)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation, for `module.apply`: N(0, std) for every matrix and embedding, zero
    biases, LayerNorm as the identity."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.token = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor]) -> torch.Tensor:
        seq = input_ids.size(1)
        x = self.token(input_ids) + self.position.weight[:seq]
        # Single-segment inputs (all type 0) are the common case: add row 0 without a gather.
        x = x + (self.token_type.weight[0] if token_type_ids is None else self.token_type(token_type_ids))
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        # Separate q/k/v projections (not one fused matrix) keep the names and shapes of the
        # paper and of every released checkpoint; the three matmuls cost the same as one.
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_dropout = cfg.dropout

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor],
                queries: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (b, t, h), the positions attended to; queries: (b, tq, h), the positions that attend
        (default: x itself). Returns (b, tq, h)."""
        queries = x if queries is None else queries

        def heads(proj: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:  # (b, t, h) -> (b, heads, t, head_dim)
            return proj(inputs).view(inputs.size(0), inputs.size(1), self.num_heads, self.head_dim).transpose(1, 2)

        y = attention(heads(self.query, queries), heads(self.key, x), heads(self.value, x), attn_mask=attn_mask,
                      dropout_p=self.attn_dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(queries.shape))


class Layer(nn.Module):
    """One post-LayerNorm encoder block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor],
                queries: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (b, t, h). With `queries` ((b, tq, h), e.g. x[:, :1]) only those positions are computed
        (attending to all of x): returns (b, tq, h); otherwise (b, t, h)."""
        q = x if queries is None else queries
        x = self.attention_norm(q + self.dropout(self.attention(x, attn_mask, queries)))
        # Exact (erf) GELU, as BERT and its released checkpoints use, not the tanh approximation.
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


class BertModel(nn.Module):
    """The encoder: ids -> contextual hidden states."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, token_type_ids: (batch, seq) int64; attention_mask: (batch, seq), 1/True for
        real tokens, 0/False for padding, or None when nothing is padded (the fast path); or
        (batch, seq, seq) bool, True where query i may attend key j: packed windows whose
        documents must not see each other (data.packing=documents). Returns hidden states
        (batch, seq, hidden).

        With `positions` ((batch, k) int64): (batch, k, hidden), the outputs at those positions of
        each row only, e.g. the masked positions an MLM loss reads or the [CLS] position a
        sentence classifier reads. The last layer then runs its queries, attention output,
        feed-forward and norms on those positions alone (its keys and values still see every
        position): equal to the full output there, for a fraction of the last layer's work."""
        attn_mask = None
        if attention_mask is not None and attention_mask.dim() == 3:  # pairwise: (batch, 1, seq, seq)
            attn_mask = attention_mask.bool()[:, None]
        elif attention_mask is not None:
            # (batch, 1, 1, seq) bool: every query may look at every real key, never at padding.
            attn_mask = attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        for i, layer in enumerate(self.layers):
            queries, mask = None, attn_mask
            if positions is not None and i == len(self.layers) - 1:
                queries = x.gather(1, positions[:, :, None].expand(-1, -1, x.size(-1)))
                if mask is not None and mask.size(2) > 1:  # pairwise: the rows of those queries
                    mask = mask.gather(2, positions[:, None, :, None].expand(-1, -1, -1, mask.size(3)))
            x = layer(x, mask, queries)
        return x


def selected_positions(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq) bool -> (positions (batch, k) int64, valid (batch, k) bool), k = the most
    selected positions in any row: each row's selected positions in ascending order, then filler
    positions (valid False). `out[valid]` of a (batch, k, ...) result computed at `positions` is
    in the row-major order of `full[selected]`."""
    counts = selected.sum(1)
    k = int(counts.max()) if selected.numel() else 0
    # a stable sort of "not selected" puts each row's selected positions first, in order
    order = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)
    valid = torch.arange(k, device=selected.device)[None, :] < counts[:, None]
    return order[:, :k], valid


class MaskedLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., hidden): what goes into the vocabulary projection."""
        return self.norm(F.gelu(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., vocab) logits. The decoder matrix is passed in rather than
        owned: it is the token embedding (weight tying: fewer parameters, better sample
        efficiency), and not owning it keeps each tensor once in the state dict."""
        return F.linear(self.transform(hidden), decoder_weight, self.bias)


def masked_lm_output(head: nn.Module, hidden: torch.Tensor, decoder: torch.Tensor,
                     targets: Optional[torch.Tensor]) -> "MaskedLMOutput":
    """What every masked LM's forward ends with (BERT, ModernBERT, DeBERTa): `head`'s logits at
    `hidden` ((n, hidden) or (batch, seq, hidden)) without targets, else the fused chunked
    projection + loss (`loss_sum`, `correct`) against `targets` (n,) or (batch, seq)."""
    if targets is None:
        return MaskedLMOutput(logits=head(hidden, decoder))
    x = head.transform(hidden)
    loss_sum, correct = linear_cross_entropy(x.reshape(-1, x.size(-1)), decoder, head.bias, targets.reshape(-1))
    return MaskedLMOutput(loss_sum=loss_sum, correct=correct)


@dataclasses.dataclass
class MaskedLMOutput:
    """What `BertForMaskedLM.forward` returns: always this, each field None when the call did
    not compute it (its docstring says which arguments compute what).

    logits: (n_selected, vocab) at the selected positions in row-major order (`full[selected]`), or
        (batch, seq, vocab) without `selected`; None with `targets` or `head_loss`.
    loss_sum: () float, the summed cross-entropy of the targets; with `targets` only.
    correct: () int64, the targets that are the most likely token; with `targets` only.
    next_sentence_logits: (batch, 2), 0 = B follows A, 1 = B is random; whenever the model has
        the NSP head (cfg.next_sentence_head, mlm.nsp), else None.
    hidden: (batch, seq, hidden) final hidden states at every position; with `head_loss` only.
    head: what `head_loss` returned (e.g. distillation's tuple of sums); with `head_loss` only.
    """

    logits: Optional[torch.Tensor] = None
    loss_sum: Optional[torch.Tensor] = None
    correct: Optional[torch.Tensor] = None
    next_sentence_logits: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    head: Any = None


# A pytree node, so wrappers that walk forward's outputs find the tensors inside: FSDP2 and DDP
# hook backward on them, torch.compile returns them from its graph.
register_dataclass(MaskedLMOutput)


class BertForMaskedLM(nn.Module):
    encoder_attr, encoder_class = "bert", BertModel  # the encoder a classifier fine-tunes, and its name

    @staticmethod
    def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
        """BERT's initialisation of `module` (for `.apply`), also of a classifier's heads."""
        init_bert_weights(module, cfg.init_std)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(cfg)
        self.mlm_head = MaskedLMHead(cfg)
        if cfg.next_sentence_head:  # mlm.nsp: [CLS] -> pooler (dense, tanh) -> is B A's continuation?
            self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
            self.nsp_head = nn.Linear(cfg.hidden_size, 2)
        self.apply(lambda module: init_bert_weights(module, cfg.init_std))

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, selected: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None,
                head_loss: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]] = None
                ) -> MaskedLMOutput:
        """input_ids, token_type_ids: (batch, seq) int64; attention_mask: (batch, seq), 1/True for
        real tokens, or None when nothing is padded, or pairwise (batch, seq, seq) as
        BertModel.forward takes it. Returns a MaskedLMOutput:

        - nothing else: `logits` (batch, seq, vocab).
        - `selected` ((batch, seq) bool): `logits` at those positions only, (n_selected, vocab),
          row-major order; the vocabulary projection, the largest matmul of the model, and the
          last encoder layer's per-position work then run on ~15% of positions.
        - `targets` ((n_selected,) int64 with `selected`, else (batch, seq)): `loss_sum` and
          `correct` instead of the logits, from the fused, chunked projection + loss of
          lmforge/ops (the logits never exist in memory at once).
        - `head_loss` (with `selected`, no targets): the logits are not made: the head's input at
          the selected positions, the decoder matrix and the bias go to `head_loss(x, weight,
          bias)` (a fused loss such as distillation's lmforge/ops/linear_distill.py), whose result
          is `head`; `hidden` is the final hidden states at every position (what distillation's
          hidden-state loss compares), so the last layer runs on every position. It is called
          here, inside forward, so that wrappers that gather parameters for forward (FSDP) see it.

        A model with the NSP head (mlm.nsp) always sets `next_sentence_logits` too: the [CLS]
        position joins the positions the last layer computes."""
        nsp_head = self.cfg.next_sentence_head
        if head_loss is not None:
            if selected is None or targets is not None:
                raise ValueError("head_loss goes with `selected` and without `targets`")
            hidden = self.bert(input_ids, token_type_ids, attention_mask)
            head = head_loss(self.mlm_head.transform(hidden[selected]), self.decoder, self.mlm_head.bias)
            nsp = self.next_sentence_logits(hidden[:, 0]) if nsp_head else None
            return MaskedLMOutput(next_sentence_logits=nsp, hidden=hidden, head=head)
        nsp = None
        if selected is None:
            hidden = self.bert(input_ids, token_type_ids, attention_mask)
            if nsp_head:
                nsp = self.next_sentence_logits(hidden[:, 0])
        elif not nsp_head:  # the last layer too computes only the selected positions (BertModel.forward says how)
            positions, valid = selected_positions(selected)
            hidden = self.bert(input_ids, token_type_ids, attention_mask, positions=positions)[valid]
        else:
            # [CLS] (position 0, never masked for MLM) joins the selected positions the last layer
            # computes; each row's positions are ascending, so it comes first in every row
            with_cls = selected.clone()
            with_cls[:, 0] = True
            positions, valid = selected_positions(with_cls)
            out = self.bert(input_ids, token_type_ids, attention_mask, positions=positions)
            nsp = self.next_sentence_logits(out[:, 0])
            valid[:, 0] = selected[:, 0]  # the MLM outputs: [CLS] only where it was selected itself
            hidden = out[valid]
        out = masked_lm_output(self.mlm_head, hidden, self.decoder, targets)
        out.next_sentence_logits = nsp
        return out

    @property
    def decoder(self) -> torch.Tensor:
        """(vocab, hidden): the vocabulary projection, tied to the token embeddings. Read it where it
        is used, after the encoder: ZeRO-3 gathers a parameter when it is read and partitions the
        embeddings' again after their forward, so one read before the encoder is an empty tensor."""
        return self.bert.embeddings.token.weight

    def next_sentence_logits(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """(batch, hidden) final [CLS] states -> (batch, 2): 0 = B follows A, 1 = B is random."""
        return self.nsp_head(torch.tanh(self.pooler(cls_hidden)))


FAMILY = Family("bert", "encoder", BertForMaskedLM, ("bert",), to_hf=bert_to_hf, from_hf=bert_from_hf)
