"""Fill-mask prediction: the top tokens and probabilities for each [MASK] in a text."""

from __future__ import annotations

import torch

from lmforge.data.padding import mask_if_padded, pad_rows
from lmforge.data.tokenizers import TextTokenizer
from lmforge.errors import LmforgeError


@torch.inference_mode()
def fill_mask(model: torch.nn.Module, tokenizer: TextTokenizer, texts: list[str], top_k: int = 5,
              max_len: int = 512, batch_size: int = 64) -> list[list[list[dict]]]:
    """For each text, for each [MASK] in it (left to right), the `top_k` most likely tokens as
    {"token": str, "id": int, "prob": float}. Texts are sorted by length and padded into batches
    of `batch_size` (little padding); padding is masked out of attention, so each text's answer
    does not depend on the others or on the batching (tests/test_classify_fast_paths.py checks)."""
    tokenizer.require_bert("fill-mask prediction")
    if top_k < 1:
        raise LmforgeError(f"--top-k must be at least 1, got {top_k}")
    encoded = [[tokenizer.cls_id, *ids[: max_len - 2], tokenizer.sep_id] for ids in tokenizer.encode_batch(texts)]
    for text, ids in zip(texts, encoded):
        if tokenizer.mask_id not in ids:
            raise LmforgeError(f"no [MASK] in {text!r}; write [MASK] where a word should be predicted")
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    results: list[list[list[dict]]] = [[] for _ in texts]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, masks in zip(chunk, _fill_mask_batch(model, tokenizer, [encoded[i] for i in chunk], top_k)):
            results[i] = masks
    return results


def _fill_mask_batch(model: torch.nn.Module, tokenizer: TextTokenizer, encoded: list[list[int]],
                     top_k: int) -> list[list[list[dict]]]:
    """`fill_mask` for one batch of token-id lists (with [CLS]/[SEP]), padded to the longest."""
    input_ids, attention = pad_rows(encoded, tokenizer.pad_id)
    attention = mask_if_padded(attention, sum(map(len, encoded)))
    selected = input_ids == tokenizer.mask_id
    device = next(model.parameters()).device
    logits = model(input_ids.to(device), attention_mask=None if attention is None else attention.to(device),
                   selected=selected.to(device)).logits
    probs = logits.float().softmax(-1)[:, : tokenizer.vocab_size]  # never a padded-vocab slot
    top = probs.topk(min(top_k, probs.size(-1)), dim=-1)
    results: list[list[list[dict]]] = [[] for _ in encoded]
    rows = selected.nonzero()[:, 0].tolist()  # which text each selected position belongs to
    for row, values, ids in zip(rows, top.values.tolist(), top.indices.tolist()):
        results[row].append([{"token": tokenizer.id_to_token(i), "id": i, "prob": p} for i, p in zip(ids, values)])
    return results
