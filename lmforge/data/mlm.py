"""Masked-language-model data: BERT's masking recipe and the loss over the selected positions.

The recipe (Devlin et al. 2019, seed MLAB W2D2): select `mask_prob` (15%) of the tokens that may
be predicted (never [CLS]/[SEP]/[PAD] or other special tokens) — exactly round(15%) of each row's
maskable tokens, at least one, chosen uniformly, as the original BERT's data pipeline does
(create_pretraining_data.py), rather than an independent coin per token. Full rows then always
have the same number of targets: every step has the same shapes and cost, and oneDNN's bf16
kernels, which keep memory per distinct matrix shape, stop growing after the first steps
(measured: with a coin per token, resident memory crept up 7% over 2,000 bf16 steps); of the
selected, replace 80% by
[MASK], 10% by a random non-special token and leave 10% unchanged, so that the model cannot
learn that only [MASK] positions matter. The loss is computed on the selected positions only.
With mlm.whole_word_mask, whole words (all their WordPiece pieces) are selected instead
(`whole_words`), at the same overall rate.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F


def random_mask(input_ids: torch.Tensor, *, mask_id: int, special_mask: torch.Tensor, mask_prob: float = 0.15,
                mask_token_frac: float = 0.8, random_token_frac: float = 0.1,
                generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
                rows: Optional[tuple[int, int, int]] = None,
                word_continuation: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply BERT masking to a whole batch at once.

    input_ids:    (batch, seq) int64 token ids (padding included).
    special_mask: (vocab_size,) bool, True for ids that are never selected nor used as random
                  replacements (padding, [CLS], [SEP], [MASK], [UNK], reserved slots).
    generator:    one generator for the batch, or one per row: then each row's mask depends on its
                  own generator alone, so no way of cutting a batch into pieces changes it (the
                  training batches: a generator per row of the step's global batch).
    rows:         (first, end, total), with one generator: `input_ids` are rows first..end of a
                  batch of `total` rows. The random numbers are drawn for all `total` rows and
                  cut, so each row gets the mask it would get in the whole batch.
    word_continuation: (vocab_size,) bool, True for ids that continue a word (WordPiece '##'
                  pieces). Given, whole words are selected (Google's whole-word-masking BERT):
                  see `whole_words`.
    Returns (masked_ids, selected): masked_ids is (batch, seq) int64, the input with the selected
    positions replaced; selected is (batch, seq) bool, True where the loss is taken. The targets
    are `input_ids[selected]`.
    """
    first, end, total = rows if rows is not None else (0, input_ids.size(0), input_ids.size(0))
    if end - first != input_ids.size(0):
        raise ValueError(f"rows={rows} do not match {input_ids.size(0)} input rows")
    shape = (total, input_ids.size(1))
    per_row = isinstance(generator, (list, tuple))
    if per_row and len(generator) != input_ids.size(0):
        raise ValueError(f"{len(generator)} generators for {input_ids.size(0)} rows")

    def uniform() -> torch.Tensor:  # this rank's rows of a (total, seq) draw
        if per_row:
            return torch.stack([torch.rand(shape[1], generator=g) for g in generator]).to(input_ids.device)
        return torch.rand(shape, generator=generator, device=input_ids.device)[first:end]

    def integers(high: int) -> torch.Tensor:
        if per_row:
            return torch.stack([torch.randint(high, (shape[1],), generator=g) for g in generator]).to(input_ids.device)
        return torch.randint(high, shape, generator=generator, device=input_ids.device)[first:end]

    special_mask = special_mask.to(input_ids.device)
    maskable = ~special_mask[input_ids]
    draw = uniform()
    counts = maskable.sum(1)
    wanted = torch.round(counts * mask_prob).long()
    if mask_prob > 0:
        wanted = torch.minimum(wanted.clamp(min=1), counts)
    if word_continuation is None:
        # each row's `wanted` maskable positions with the smallest draws (non-maskable ones sort last)
        order = draw.masked_fill(~maskable, 2.0).argsort(dim=1)
        in_order = torch.arange(input_ids.size(1), device=input_ids.device)[None, :] < wanted[:, None]
        selected = torch.zeros_like(maskable).scatter_(1, order, in_order)
    else:
        selected = whole_words(input_ids, maskable, word_continuation.to(input_ids.device)[input_ids], draw, wanted)
    # One more uniform per position decides what a selected token becomes.
    how = uniform()
    to_mask = selected & (how < mask_token_frac)
    to_random = selected & (how >= mask_token_frac) & (how < mask_token_frac + random_token_frac)
    allowed = torch.nonzero(~special_mask).squeeze(1)  # ids a random replacement may take
    pick = integers(len(allowed))
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, allowed[pick], masked)
    return masked, selected


def whole_words(input_ids: torch.Tensor, maskable: torch.Tensor, continues: torch.Tensor, draw: torch.Tensor,
                wanted: torch.Tensor) -> torch.Tensor:
    """Whole-word selection, as Google's BERT data pipeline makes it (create_pretraining_data.py,
    do_whole_word_mask): a word is a maskable token and the '##' pieces after it; words are taken
    in random order (the draw at their first piece) and a word is added only while the row's
    total stays within `wanted` tokens — one too long is skipped for a shorter one after it. The
    pieces of a word are never split, and the rate stays at `mask_prob` of the maskable tokens
    (a little under when no remaining word fits). A loop per row over its words: measured here,
    masking a batch of 32 x 128 takes about 7 ms this way against 2 ms token by token."""
    selected = torch.zeros_like(maskable)
    start = maskable & ~(continues & torch.roll(maskable, 1, dims=1))  # a piece after a non-maskable starts a word
    start[:, 0] = maskable[:, 0]
    word = torch.cumsum(start, dim=1) - 1  # word index of each position (valid where maskable)
    for r in range(input_ids.size(0)):
        m = maskable[r]
        if not bool(m.any()):
            continue
        ids = word[r][m]
        n_words = int(ids.max()) + 1
        lengths = torch.bincount(ids, minlength=n_words)
        first = draw[r][start[r]]  # one draw per word, at its first piece
        total, chosen = 0, torch.zeros(n_words, dtype=torch.bool)
        budget = int(wanted[r])
        for w in first.argsort().tolist():
            if total + int(lengths[w]) <= budget:
                chosen[w] = True
                total += int(lengths[w])
            if total == budget:
                break
        if total == 0 and budget > 0:  # every word is longer than the budget: take the first in order
            chosen[int(first.argmin())] = True
        selected[r, m] = chosen[ids].to(selected.device)
    return selected


def cross_entropy_selected(logits: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor,
                           reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the selected positions only.

    logits:   (batch, seq, vocab) for every position, or (n_selected, vocab) already gathered at
              the selected positions in row-major order (what `BertForMaskedLM` returns when
              given `selected`, so the vocabulary projection never runs on the other 85%).
    targets:  (batch, seq) int64 original token ids.
    selected: (batch, seq) bool.
    Returns a scalar: the mean (or with reduction="sum", the sum) of the per-position losses;
    0.0 when nothing is selected, rather than NaN.
    """
    if logits.shape[:-1] == selected.shape:
        logits = logits[selected]
    chosen = targets[selected]
    if chosen.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), chosen, reduction=reduction)
