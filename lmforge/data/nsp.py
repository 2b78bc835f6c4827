"""Next-sentence prediction pairs (Devlin et al. 2019; Google's create_pretraining_data.py).

An example is `[CLS] A [SEP] B [SEP]`: A is one or more consecutive sentences of a document, and B
is, half the time, the sentences that follow A in the same document (label 0, "is next") and
otherwise sentences from another document (label 1, "random"), as transformers'
`next_sentence_label` counts them. Token-type ids are 0 for [CLS] A [SEP] and 1 for B [SEP].

Where the pieces come from: the prepared shards hold documents back to back, each followed by
one [SEP] (data/shards.py); sentences end at '.', '?' or '!' tokens. A pair is drawn by
  1. a document, with probability proportional to its length, and a sentence in it;
  2. sentences from there on until they fill the target length (max_len - 3) or the document ends;
  3. A = the first 1..k-1 of those sentences (at random); B = the rest ("is next"), or, with
     probability 1/2 or when only one sentence was taken, sentences of another document from a
     random sentence on, enough to fill the target ("random");
  4. the paper's truncation rule: while A + B is too long, drop one token from the longer of the
     two, from its front or its back at random.
Shorter pairs are padded with [PAD] (an attention mask then hides the padding).

Every draw is a function of (seed, step, micro-batch, row of the global batch): no sampler state,
so resume and any number of data-parallel ranks see the same pairs.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.rng import derive_seed


class Documents:
    """The documents and sentence starts of one split's shards."""

    def __init__(self, shards: list[np.ndarray], sep_id: int, sentence_end_ids: list[int]):
        self.tokens = np.concatenate([np.asarray(s) for s in shards]) if shards else np.zeros(0, np.int64)
        ends = np.flatnonzero(self.tokens == sep_id)
        starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, np.int64)
        docs = [(int(a), int(b)) for a, b in zip(starts, ends) if b - a >= 2]
        is_end = np.isin(self.tokens, np.asarray(sentence_end_ids, dtype=self.tokens.dtype))
        self.docs, self.sentences = [], []
        for a, b in docs:
            cut = np.flatnonzero(is_end[a:b]) + a + 1  # a sentence starts after each end token
            bounds = np.unique(np.concatenate([[a], cut[cut < b], [b]]))
            self.docs.append((a, b))
            self.sentences.append(bounds)  # sentence i is tokens[bounds[i]:bounds[i + 1]]
        if len(self.docs) < 2:
            raise LmforgeError("next-sentence prediction needs at least 2 documents in each split; this corpus "
                               "has fewer (documents are separated by blank lines)")
        lengths = np.array([b - a for a, b in self.docs], dtype=np.float64)
        self.weights = lengths / lengths.sum()

    def span(self, rng: np.random.Generator, doc: int, first_sentence: int, at_least: int) -> list[np.ndarray]:
        """Sentences of `doc` from `first_sentence` on until they hold `at_least` tokens or the
        document ends."""
        bounds, out, n = self.sentences[doc], [], 0
        for i in range(first_sentence, len(bounds) - 1):
            out.append(self.tokens[bounds[i]:bounds[i + 1]])
            n += len(out[-1])
            if n >= at_least:
                break
        return out


def truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: np.random.Generator) -> None:
    """In place: the paper's rule — drop a token from the longer of A and B, from the front or
    the back at random, until they fit in `max_tokens`."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def make_pair(docs: Documents, rng: np.random.Generator, max_len: int) -> tuple[list[int], list[int], int]:
    """(A, B, label): label 0 when B follows A in its document, 1 when B is from another one."""
    target = max_len - 3
    d = int(rng.choice(len(docs.docs), p=docs.weights))
    n_sent = len(docs.sentences[d]) - 1
    chunk = docs.span(rng, d, int(rng.integers(0, max(1, n_sent - 1))), target)
    a_sentences = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
    a = [int(t) for s in chunk[:a_sentences] for t in s]
    if len(chunk) >= 2 and rng.random() < 0.5:
        b, label = [int(t) for s in chunk[a_sentences:] for t in s], 0
    else:
        other = d
        while other == d:
            other = int(rng.choice(len(docs.docs), p=docs.weights))
        start = int(rng.integers(0, len(docs.sentences[other]) - 1))
        b, label = [int(t) for s in docs.span(rng, other, start, max(1, target - len(a))) for t in s], 1
    truncate_pair(a, b, target, rng)
    return a, b, label


class PairBatches:
    """NSP examples for `mlm.nsp`: the rows of a global batch, as tensors."""

    def __init__(self, docs: Documents, max_len: int, seed: int, cls_id: int, sep_id: int, pad_id: int):
        self.docs, self.max_len, self.seed = docs, max_len, seed
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id

    def rows(self, keys: list[tuple]) -> dict[str, torch.Tensor]:
        """One example per key (a tuple naming the draw, e.g. ("train", step, micro, row)):
        input_ids, token_type_ids, attention_mask (batch, max_len) and next_sentence_label (batch,)."""
        n = len(keys)
        ids = torch.full((n, self.max_len), self.pad_id, dtype=torch.int64)
        types = torch.zeros((n, self.max_len), dtype=torch.int64)
        attention = torch.zeros((n, self.max_len), dtype=torch.int64)
        labels = torch.zeros(n, dtype=torch.int64)
        for r, key in enumerate(keys):
            rng = np.random.default_rng(derive_seed(self.seed, "nsp", *key))
            a, b, labels[r] = make_pair(self.docs, rng, self.max_len)
            row = [self.cls_id, *a, self.sep_id, *b, self.sep_id]
            ids[r, :len(row)] = torch.tensor(row)
            types[r, len(a) + 2:len(row)] = 1
            attention[r, :len(row)] = 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": attention, "next_sentence_label": labels}
