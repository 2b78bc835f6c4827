"""Token-id rows of different lengths into one padded batch, and its attention mask only when
something is padded: BertModel skips masking when given None (the same result, less work).
Used by the classification task's collate, `lmforge classify` and fill-mask prediction."""

from __future__ import annotations

from typing import Optional

import torch


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (batch, longest) int64 padded with `pad_id`, attention mask (batch, longest)
    bool, True for real tokens)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(row) for row in rows])
    return ids, torch.arange(width)[None, :] < lengths[:, None]


def mask_if_padded(mask: torch.Tensor, num_tokens: int) -> Optional[torch.Tensor]:
    """`mask`, or None when every row is full. `num_tokens` (the real tokens, counted when the
    batch was made) decides it without reading the mask, so without a device sync."""
    return mask if num_tokens < mask.numel() else None
