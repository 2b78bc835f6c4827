"""A sentence classifier with two heads on any encoder family (seed MLAB W2D2 part 2).

    encoder -> pooled state -> dropout -> polarity head  Linear(hidden, labels)
                                       -> rating head    Linear(hidden, 1)    (optional)

The pooled state (model.classifier_pooling) is the final hidden state at [CLS] (cls), the mean
of the real tokens' final states (mean), or BERT's pooler on the [CLS] state, tanh(Linear(hidden,
hidden)) (pooler): with it, a BERT classifier is exactly transformers' BertForSequenceClassification
(plus the rating head) and exports as one.

The rating head predicts a real-valued score (movie-reviews: the mean human rating on -4..+4).
Its raw output starts near 0 with a spread of about 1, so it is mapped to
`centre + half_width * output`: at initialisation the prediction sits in the middle of the
rating range and moves on the range's own scale, which speeds up early training.
The encoder is the one the family's masked LM pretrains (BertModel for model.arch=bert,
ModernBertModel, DebertaModel), under the same name (`bert.`, `model.`, `deberta.`), so weights
from a pretraining run or a Hugging Face encoder load into it directly.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
from torch.utils._pytree import register_dataclass

from lmforge.config import ModelConfig

from lmforge.models.registry import model_class
from lmforge.ops.dropout import Dropout


@dataclasses.dataclass
class ClassifierOutput:
    """What Classifier returns (forward always returns this).

    logits: (batch, labels) polarity logits.
    rating: (batch,) float, the rating head's prediction; None without a rating head.
    cls: (batch, hidden), the final [CLS] hidden state before dropout (and before a pooler):
        what distillation's cosine loss compares; always set (it is computed anyway).
    """

    logits: torch.Tensor
    rating: Optional[torch.Tensor] = None
    cls: Optional[torch.Tensor] = None


# A pytree node, so wrappers that walk forward's outputs find the tensors inside: FSDP2 and DDP
# hook backward on them, torch.compile returns them from its graph.
register_dataclass(ClassifierOutput)


class Classifier(nn.Module):
    def __init__(self, cfg: ModelConfig, num_labels: int = 2, rating_range: Optional[tuple[float, float]] = None):
        super().__init__()
        self.cfg = cfg
        lm = model_class(cfg.arch)  # the family's masked LM, which says what its encoder is and is called
        self.encoder_attr = lm.encoder_attr
        setattr(self, lm.encoder_attr, lm.encoder_class(cfg))
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if cfg.classifier_pooling == "pooler" else None
        self.dropout = Dropout(cfg.dropout)
        self.polarity = nn.Linear(cfg.hidden_size, num_labels)
        self.rating = nn.Linear(cfg.hidden_size, 1) if rating_range is not None else None
        lo, hi = rating_range if rating_range is not None else (0.0, 0.0)
        self.register_buffer("rating_centre", torch.tensor((lo + hi) / 2), persistent=False)
        self.register_buffer("rating_half_width", torch.tensor((hi - lo) / 2), persistent=False)
        # the family's init (BERT's: N(0, init_std), also for the heads); a loaded encoder
        # overwrites its part afterwards
        self.apply(lambda module: lm.init_weights(module, cfg))

    @property
    def encoder(self) -> nn.Module:
        return getattr(self, self.encoder_attr)

    def pool(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             token_type_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled, state): the pooled state the heads read (before dropout), and the final [CLS]
        state. Also what the linear probe of classify.probe_first is fitted on."""
        if self.cfg.classifier_pooling == "mean":  # the mean of the real tokens' final states
            hidden = self.encoder(input_ids, token_type_ids, attention_mask)
            state = hidden[:, 0]
            if attention_mask is None:
                pooled = hidden.mean(1)
            else:
                real = attention_mask.bool().unsqueeze(-1)  # where, not a product: a pad's state is never read
                pooled = hidden.where(real, 0).sum(1) / real.sum(1).clamp_min(1).to(hidden.dtype)
        else:  # the last encoder layer computes the [CLS] position alone (BertModel.forward says why)
            first = input_ids.new_zeros(input_ids.size(0), 1)
            state = pooled = self.encoder(input_ids, token_type_ids, attention_mask, positions=first)[:, 0]
            if self.pooler is not None:
                pooled = torch.tanh(self.pooler(state))
        return pooled, state

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> ClassifierOutput:
        """input_ids: (batch, seq) int64 starting with [CLS]; attention_mask: (batch, seq), or None
        when nothing is padded. Returns a ClassifierOutput: polarity logits, rating (None without
        a rating head) and the final [CLS] state."""
        pooled, state = self.pool(input_ids, attention_mask, token_type_ids)
        cls = self.dropout(pooled)
        rating = None
        if self.rating is not None:
            rating = self.rating_centre + self.rating_half_width * self.rating(cls).squeeze(-1)
        return ClassifierOutput(self.polarity(cls), rating, state)
