"""Data parallelism, the data side: a rank's batch is its rows of the global batch.

With world size W and train.batch_size b, rank r's `train_batch` must be rows r*b..(r+1)*b of
what one process with batch W*b makes at the same step — same windows, same masks — and every
rank must advance the sampler by the whole global batch, so that results and resume do not
depend on the number of processes (issue 7).
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from lmforge.data.mlm import random_mask
from lmforge.jobs import build_model
from lmforge.tasks import registry
from lmforge.data.prepared import fill_vocab_size


def _task(tiny_prepared, tmp_path, arch, batch_size, shard=(0, 1)):
    extra = ["task.name=clm", "model.arch=gpt"] if arch == "gpt" else []
    cfg = fill_vocab_size(tiny_config(tiny_prepared, tmp_path, *extra, f"train.batch_size={batch_size}"),
                          tiny_prepared.tokenizer)
    task = registry.objective(cfg.task.name)(cfg, tiny_prepared, build_model(cfg))
    task.shard = shard
    return task


@pytest.mark.parametrize("arch", ["bert", "gpt"])
@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_batches_are_the_rows_of_one_process_batch(tiny_prepared, tmp_path, arch, world):
    whole = _task(tiny_prepared, tmp_path, arch, 2 * world)
    ranks = [_task(tiny_prepared, tmp_path, arch, 2, shard=(r, world)) for r in range(world)]
    for step in range(25):  # past an epoch boundary of the tiny corpus
        for micro in range(2):
            expected = whole.train_batch(step, micro)
            parts = [t.train_batch(step, micro) for t in ranks]
            for key, value in expected.tensors.items():
                assert torch.equal(torch.cat([p.tensors[key] for p in parts]), value), (step, micro, key)
            assert sum(p.num_targets for p in parts) == expected.num_targets
            assert sum(p.num_tokens for p in parts) == expected.num_tokens
    assert all(t.data_state() == whole.data_state() for t in ranks)  # the same global position


def test_mask_rows_of_a_batch_equal_the_rows_of_the_whole_batch_mask():
    ids = torch.randint(5, 100, (6, 40))
    special = torch.zeros(100, dtype=torch.bool)
    special[:5] = True
    whole = random_mask(ids, mask_id=3, special_mask=special, generator=torch.Generator().manual_seed(7))
    parts = [random_mask(ids[lo:lo + 2], mask_id=3, special_mask=special, generator=torch.Generator().manual_seed(7),
                         rows=(lo, lo + 2, 6)) for lo in (0, 2, 4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    with pytest.raises(ValueError, match="do not match"):
        random_mask(ids[:2], mask_id=3, special_mask=special, rows=(0, 3, 6))
