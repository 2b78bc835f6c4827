"""Fixed-length token windows over prepared shards, and a seeded epoch-by-epoch sampler of them.

Shared by every task that reads the token stream: masked-LM (windows framed as [CLS] .. [SEP])
and causal-LM (windows of seq_len + 1: inputs and next-token targets).
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.rng import generator_for


def document_mask(ids: torch.Tensor, separator_id: int) -> torch.Tensor | None:
    """Packing with document boundaries (data.packing=documents): for rows of the token stream
    (batch, seq) int64, in which `separator_id` ends each document, (batch, seq, seq) bool, True
    where position i may attend position j: both in the same document (a separator belongs to
    the document it ends). None when no row holds more than one document: nothing to mask."""
    ends = ids == separator_id
    documents = torch.cumsum(ends, dim=1) - ends.long()  # the document of each position
    if not bool((documents[:, -1] > documents[:, 0]).any()):
        return None
    return documents[:, :, None] == documents[:, None, :]


class Windows:
    """Non-overlapping windows of `length` tokens over a split's memmapped shards (a window never
    spans two shards; the tail of each shard shorter than `length` is not used)."""

    def __init__(self, shards: list[np.ndarray], length: int):
        self.shards, self.length = shards, length
        counts = [len(s) // length for s in shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), length) int64 token ids."""
        out = np.empty((len(indices), self.length), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for row, (i, s) in enumerate(zip(indices, shard_of)):
            start = (int(i) - int(self.starts[s])) * self.length
            out[row] = self.shards[s][start:start + self.length]
        return out

    def spread(self, n: int) -> np.ndarray:
        """`n` window indices spread evenly over the split (a fixed evaluation set)."""
        n = min(n, len(self))
        return np.linspace(0, len(self) - 1, n).round().astype(np.int64)


class WindowSampler:
    """Hands out windows in a seeded random order, a fresh permutation each epoch. Its whole state
    is `consumed` (windows handed out so far), so resuming is exact."""

    def __init__(self, windows: Windows, seed: int):
        self.windows, self.seed = windows, seed
        self.consumed = 0
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._perm = torch.randperm(len(self.windows), generator=generator_for(self.seed, "epoch", epoch))
            self._epoch = epoch
        return self._perm

    def next(self, count: int, rows: tuple[int, int] | None = None) -> np.ndarray:
        """(count, length) int64: the next `count` windows. With `rows=(lo, hi)`, `count` windows
        are still consumed (a global batch) but only rows lo..hi of them are read: a data-parallel
        rank's share, identical to the same rows of a single process's batch of `count`."""
        n = len(self.windows)
        picks = []
        pos, end = self.consumed, self.consumed + count
        while pos < end:  # one slice per epoch touched (usually one)
            epoch, offset = divmod(pos, n)
            take = min(end - pos, n - offset)
            picks.append(self._order(epoch)[offset:offset + take].numpy())
            pos += take
        self.consumed = end
        order = np.concatenate(picks)
        return self.windows.get(order if rows is None else order[rows[0]:rows[1]])

    def state(self) -> dict:
        return {"consumed_windows": self.consumed, "epoch": self.consumed // len(self.windows),
                "windows_per_epoch": len(self.windows)}

    def load_state(self, state: dict) -> None:
        self.consumed = int(state["consumed_windows"])


def sampler_states(samplers: dict[int, WindowSampler], base_len: int) -> dict:
    """The data state of a task that samples windows of one length per phase of the sequence-length
    schedule (lmforge/train/schedule.py): the first length's state, as a run without the schedule
    has it, plus each other length's under "len_<n>"."""
    state = samplers[base_len].state()
    for length, sampler in samplers.items():
        if length != base_len:
            state[f"len_{length}"] = sampler.state()
    return state


def load_sampler_states(samplers: dict[int, WindowSampler], base_len: int, state: dict) -> None:
    samplers[base_len].load_state(state)
    for length, sampler in samplers.items():
        if length != base_len and f"len_{length}" in state:
            sampler.load_state(state[f"len_{length}"])
