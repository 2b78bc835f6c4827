"""Masking statistics (tolerances from the binomial standard deviation) and the selected loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.mlm import cross_entropy_selected, random_mask

VOCAB, PAD, CLS, SEP, MASK = 1000, 0, 1, 2, 3


def _batch(n=512, seq=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (n, seq), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[: n // 4, seq // 2:] = PAD  # a quarter of the rows half padded
    special = torch.zeros(VOCAB, dtype=torch.bool)
    special[:10] = True
    return ids, special


def _within(observed: int, trials: int, p: float, sigmas: float = 5.0) -> bool:
    sd = math.sqrt(trials * p * (1 - p))
    return abs(observed - trials * p) <= sigmas * sd


def test_masking_fractions_match_the_recipe():
    ids, special = _batch()
    masked, selected = random_mask(ids, mask_id=MASK, special_mask=special, generator=torch.Generator().manual_seed(1))
    maskable = ~special[ids]
    n_maskable, n_sel = int(maskable.sum()), int(selected.sum())
    assert n_maskable > 100_000
    assert _within(n_sel, n_maskable, 0.15)
    to_mask = selected & (masked == MASK)
    unchanged = selected & (masked == ids)
    to_random = selected & (masked != MASK) & (masked != ids)
    # A random replacement can draw the original token (1 in 990): count it with "unchanged".
    p_same = 1 / (VOCAB - 10)
    assert _within(int(to_mask.sum()), n_sel, 0.8)
    assert _within(int(to_random.sum()), n_sel, 0.1 * (1 - p_same))
    assert _within(int(unchanged.sum()), n_sel, 0.1 + 0.1 * p_same)
    assert torch.equal(masked[~selected], ids[~selected])  # nothing outside the selection changes


def test_special_and_padding_tokens_are_never_selected_nor_used_as_replacements():
    ids, special = _batch(seed=3)
    masked, selected = random_mask(ids, mask_id=MASK, special_mask=special, mask_prob=0.5,
                                   mask_token_frac=0.0, random_token_frac=1.0,
                                   generator=torch.Generator().manual_seed(2))
    assert not selected[special[ids]].any()
    assert not special[masked[selected]].any()  # random replacements are ordinary tokens
    assert (masked[ids == PAD] == PAD).all()


def test_configurable_fractions_and_seeded_reproducibility():
    ids, special = _batch(n=128)
    a = random_mask(ids, mask_id=MASK, special_mask=special, mask_prob=0.3, generator=torch.Generator().manual_seed(5))
    b = random_mask(ids, mask_id=MASK, special_mask=special, mask_prob=0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    n_maskable = int((~special[ids]).sum())
    assert _within(int(a[1].sum()), n_maskable, 0.3)


def test_cross_entropy_selected_is_the_mean_over_selected_positions_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 50, generator=g)
    targets = torch.randint(0, 50, (4, 9), generator=g)
    selected = torch.rand(4, 9, generator=g) < 0.3
    expected = torch.stack([F.cross_entropy(logits[b, t][None], targets[b, t][None])
                            for b in range(4) for t in range(9) if selected[b, t]]).mean()
    assert torch.allclose(cross_entropy_selected(logits, targets, selected), expected, atol=1e-6)
    gathered = logits[selected]  # what the model returns when it runs its head on selected positions only
    assert torch.allclose(cross_entropy_selected(gathered, targets, selected), expected, atol=1e-6)
    total = cross_entropy_selected(gathered, targets, selected, reduction="sum")
    assert torch.allclose(total, expected * selected.sum(), atol=1e-5)
    nothing = torch.zeros_like(selected)
    assert cross_entropy_selected(logits, targets, nothing).item() == 0.0


def test_whole_word_masking_never_splits_a_word_and_keeps_the_rate():
    """mlm.whole_word_mask: every '##' piece of a word is selected with its word or not at all;
    over many rows the selected share of maskable tokens stays at mask_prob; rows cut for a
    data-parallel rank get the masks they get in the whole batch."""
    from lmforge.data.mlm import random_mask

    g = torch.Generator().manual_seed(0)
    vocab = 200
    special = torch.zeros(vocab, dtype=torch.bool)
    special[:5] = True  # 0 pad, 1 cls, 2 sep, 3 mask, 4 unk
    continues = torch.zeros(vocab, dtype=torch.bool)
    continues[100:] = True  # ids 100+ are '##' pieces
    rows = []
    for _ in range(64):  # words of 1-4 pieces
        row = [1]
        while len(row) < 63:
            row += [int(torch.randint(5, 100, (1,), generator=g))] + \
                   [int(x) for x in torch.randint(100, 200, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)]
        rows.append(row[:63] + [2])
    ids = torch.tensor(rows)
    kw = dict(mask_id=3, special_mask=special, word_continuation=continues)
    masked, selected = random_mask(ids, generator=torch.Generator().manual_seed(1), **kw)
    maskable = ~special[ids]
    assert not (selected & ~maskable).any()
    for r in range(ids.size(0)):  # a piece is selected exactly when the word's first piece is
        for c in range(1, ids.size(1)):
            if continues[ids[r, c]] and maskable[r, c - 1]:
                assert selected[r, c] == selected[r, c - 1], (r, c)
    rate = selected.sum().item() / maskable.sum().item()
    assert 0.13 < rate <= 0.15 + 1e-9
    assert (masked[selected] == 3).float().mean().item() == pytest.approx(0.8, abs=0.06)
    # a rank's rows of the batch get the same selection as in the whole batch
    part, part_sel = random_mask(ids[16:32], generator=torch.Generator().manual_seed(1), rows=(16, 32, 64), **kw)
    assert torch.equal(part_sel, selected[16:32]) and torch.equal(part, masked[16:32])
