"""ELECTRA (Clark et al. 2020): a small masked-LM generator and a discriminator that learns from
every token, not only the 15% that are masked.

    masked ids --shared embeddings--> generator (narrower BERT) --> MLM logits at the masked positions
                                                                      | sample (no gradient)
    ids with the masked positions replaced by the samples --shared embeddings--> discriminator
        (a full-width BERT encoder) --> per token: was it replaced?   (replaced-token detection)
    loss = generator MLM loss + rtd_weight (50) x discriminator binary cross-entropy

Generator and discriminator share the embedding layer (token, position, token type and its
LayerNorm), as the paper does (electra.share_embeddings=false gives the generator its own); the generator projects it down to its own width and its MLM head
projects back up to the embedding width, where the decoder is the tied token embedding. A
generator a quarter of the discriminator's width (`generator_frac`) is the paper's sweet spot:
too strong a generator makes the discriminator's task too hard.

Sampling is a discrete draw, so no gradient flows from the discriminator loss into the generator
(only into the shared embeddings, through the discriminator's own use of them). The draw of each
row is seeded by the caller (a function of seed, step and row), so resume and data parallelism
give the same samples as one uninterrupted process.

The discriminator (`bert` + `rtd_head`) is what fine-tuning and export use: its `bert.*` tensors
have exactly the names and shapes of a BertForMaskedLM's encoder.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import register_dataclass

from lmforge.config import ModelConfig
from lmforge.models.bert import BertModel, Embeddings, Layer, init_bert_weights, selected_positions
from lmforge.ops.linear_cross_entropy import linear_cross_entropy, reference_sample


def generator_config(cfg: ModelConfig, frac: float) -> ModelConfig:
    """The generator's shape: hidden size, heads and feed-forward width scaled by `frac` (heads at
    least 1 and dividing the hidden size); as many layers as the discriminator."""
    hidden = max(1, round(cfg.hidden_size * frac))
    heads = max(1, round(cfg.num_heads * frac))
    while hidden % heads:
        heads -= 1
    return dataclasses.replace(cfg, hidden_size=hidden, num_heads=heads,
                               intermediate_size=max(1, round(cfg.intermediate_size * frac)))


class Generator(nn.Module):
    """A narrow BERT encoder over the shared embeddings, with an MLM head back at embedding width."""

    def __init__(self, cfg: ModelConfig, embedding_size: int):
        super().__init__()
        self.project = nn.Linear(embedding_size, cfg.hidden_size)  # shared embeddings -> generator width
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        # MLM head: dense (generator width -> embedding width), GELU, LayerNorm, then the decoder,
        # which is the shared token embedding (+ this bias)
        self.head_dense = nn.Linear(cfg.hidden_size, embedding_size)
        self.head_norm = nn.LayerNorm(embedding_size, eps=cfg.layer_norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, embedded: torch.Tensor, attn_mask, positions: torch.Tensor) -> torch.Tensor:
        """embedded: (b, t, embedding) -> (b, k, embedding) head inputs at `positions` (b, k)."""
        x = self.project(embedded)
        for i, layer in enumerate(self.layers):
            queries = None
            if i == len(self.layers) - 1:  # the last layer computes the selected positions only
                queries = x.gather(1, positions[:, :, None].expand(-1, -1, x.size(-1)))
            x = layer(x, attn_mask, queries)
        return self.head_norm(F.gelu(self.head_dense(x)))


@dataclasses.dataclass
class ElectraOutput:
    """What `Electra.forward` returns (every field is always set). n = masked (selected) positions.

    mlm_loss_sum: () float, the generator's summed MLM cross-entropy at the masked positions.
    correct: () int64, the masked positions where the generator's most likely token is the original.
    sampled: (n,) int64, the generator's samples at the masked positions, row-major order.
    discriminator_logits: (batch, seq) float, the discriminator's logits of "this token was replaced".
    replaced: (batch, seq) float, its labels: 1.0 where the token differs from the original (a
        sample equal to the original counts as not replaced, as in the paper), else 0.0.
    """

    mlm_loss_sum: torch.Tensor
    correct: torch.Tensor
    sampled: torch.Tensor
    discriminator_logits: torch.Tensor
    replaced: torch.Tensor


# A pytree node, so wrappers that walk forward's outputs find the tensors inside: FSDP2 and DDP
# hook backward on them, torch.compile returns them from its graph.
register_dataclass(ElectraOutput)


class Electra(nn.Module):
    def __init__(self, cfg: ModelConfig, generator_frac: float = 0.25, share_embeddings: bool = True):
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(cfg)  # the discriminator's encoder; its embeddings are shared
        # replaced-token detection head, as transformers' ElectraDiscriminatorPredictions: dense, GELU, dense -> 1
        self.rtd_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.rtd_out = nn.Linear(cfg.hidden_size, 1)
        self.generator = Generator(generator_config(cfg, generator_frac), cfg.hidden_size)
        # electra.share_embeddings=false: the generator reads and decodes with an embedding layer of its own
        self.generator_embeddings = None if share_embeddings else Embeddings(cfg)
        self.apply(lambda module: init_bert_weights(module, cfg.init_std))

    @property
    def gen_embeddings(self) -> Embeddings:
        return self.bert.embeddings if self.generator_embeddings is None else self.generator_embeddings

    def generator_hidden(self, masked_ids: torch.Tensor, selected: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """(n_selected, embedding) inputs of the generator's decoder at the selected positions,
        row-major order."""
        attn_mask = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None
        positions, valid = selected_positions(selected)
        return self.generator(self.gen_embeddings(masked_ids, None), attn_mask, positions)[valid]

    def generator_logits(self, masked_ids: torch.Tensor, selected: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """(n_selected, vocab) generator logits at the selected positions (the plain path)."""
        return F.linear(self.generator_hidden(masked_ids, selected, attention_mask), self.gen_embeddings.token.weight,
                        self.generator.head_bias)

    def discriminator_logits(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """(batch, seq) logits of "this token was replaced"."""
        hidden = self.bert(input_ids, None, attention_mask)
        return self.rtd_out(F.gelu(self.rtd_dense(hidden))).squeeze(-1)

    def forward(self, masked_ids: torch.Tensor, input_ids: torch.Tensor, selected: torch.Tensor,
                sample_seeds: torch.Tensor, attention_mask=None, fused: bool = True) -> ElectraOutput:
        """One ELECTRA pass. masked_ids: the generator's input (the MLM-masked ids); input_ids: the
        original ids; selected: (batch, seq) bool, the masked positions; sample_seeds: (batch,)
        int64, the seed of each row's draw. Returns an ElectraOutput: the generator's summed MLM
        loss and correct count at the selected positions, the ids it sampled there, the
        discriminator's (batch, seq) logits and its labels.

        The generator's vocabulary projection, loss and sampling run fused and chunked
        (lmforge/ops/linear_cross_entropy.py: the logits never exist whole); `fused=False` is
        the plain path (logits, cross-entropy, softmax sampling) the tests compare it with."""
        targets = input_ids[selected]
        u = row_uniforms(selected.sum(1), sample_seeds).to(input_ids.device)
        hidden = self.generator_hidden(masked_ids, selected, attention_mask)
        decoder, bias = self.gen_embeddings.token.weight, self.generator.head_bias
        if fused:
            mlm_sum, correct, sampled = linear_cross_entropy(hidden, decoder, bias, targets, sample_u=u)
        else:
            logits = F.linear(hidden, decoder, bias).float()
            mlm_sum, correct = F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()
            sampled = reference_sample(logits.detach(), u)
        corrupted = input_ids.masked_scatter(selected, sampled)
        disc_logits = self.discriminator_logits(corrupted, attention_mask)
        return ElectraOutput(mlm_loss_sum=mlm_sum, correct=correct, sampled=sampled, discriminator_logits=disc_logits,
                             replaced=(corrupted != input_ids).float())


def row_uniforms(counts: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """`counts[r]` uniform numbers for each batch row r from a CPU generator seeded by `seeds[r]`,
    concatenated: a row gets the same draw whatever else is in the batch (and on any device)."""
    gen = torch.Generator()
    parts = [torch.rand(count, generator=gen.manual_seed(seed)) for count, seed in zip(counts.tolist(), seeds.tolist())]
    return torch.cat(parts) if parts else torch.zeros(0)
