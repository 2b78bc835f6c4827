"""Every documented strategy and ZeRO stage trains, with and without gradient clipping, as one
process with the whole batch does (gloo, 2 processes on this CPU, fp32, 12 steps).

With clipping at a norm the gradients exceed, every step is clipped: a strategy that clipped
each rank's (or shard's) gradients by its own partial norm, or clipped before the gradients were
reduced, would give other losses. Without clipping, each engine must still report the gradient
norm and count no step non-finite (DeepSpeed's stage 0 reports none: lmforge measures it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from lmforge.config import dump_yaml
from lmforge.train.log import read_metrics

CLIP = 0.05  # below the tiny model's gradient norms (about 1-4 here): every step is clipped
STRATEGIES = {
    "ddp": ["distributed.strategy=ddp"],
    "fsdp": ["distributed.strategy=fsdp"],
    **{f"zero{s}": ["distributed.strategy=deepspeed", f"distributed.zero_stage={s}"] for s in range(4)},
}
# the default suite runs the cases no other test covers; `make test-slow` the whole matrix
FAST = {("zero0", None), ("zero0", CLIP), ("ddp", CLIP), ("fsdp", CLIP), ("zero3", CLIP)}
CASES = [pytest.param(name, clip, id=f"{name}-{'clip' if clip else 'noclip'}",
                      marks=() if (name, clip) in FAST else pytest.mark.slow)
         for name in STRATEGIES for clip in (None, CLIP)]


def _run(argv, cwd):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=cwd,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def one_process(tiny_prepared, tmp_path_factory):
    """The reference runs, one process with the whole batch: {clip: (config file, run dir)}."""
    out = {}
    for clip in (None, CLIP):
        folder = tmp_path_factory.mktemp(f"one-{clip}")
        cfg = tiny_config(tiny_prepared, folder, "model.dropout=0", "train.precision=fp32", "train.num_threads=1",
                          "train.max_steps=12", "train.eval_every=6", "train.checkpoint_every=6",
                          "train.grad_accum_steps=2", f"optim.max_grad_norm={'null' if clip is None else clip}")
        config = folder / "run.yaml"
        config.write_text(dump_yaml(cfg))
        _run([sys.executable, "-m", "lmforge", "pretrain", "--config", str(config), "train.batch_size=8",
              f"out_dir={folder / 'one'}"], folder)
        (run_dir,) = (folder / "one").iterdir()
        out[clip] = config, run_dir
    return out


@pytest.mark.parametrize("name,clip", CASES)
def test_every_strategy_and_stage_trains_like_one_process_with_and_without_clipping(one_process, tmp_path, name,
                                                                                     clip):
    config, one = one_process[clip]
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge",
          "pretrain", "--config", str(config), "train.batch_size=4", *STRATEGIES[name],
          f"out_dir={tmp_path / 'two'}"], tmp_path)
    (two,) = (tmp_path / "two").iterdir()
    a = [r for r in read_metrics(one) if r["split"] == "train"]
    b = [r for r in read_metrics(two) if r["split"] == "train"]
    assert [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b):
        assert rb["skipped_steps"] == 0 and rb["grad_norm"] is not None and rb["grad_norm"] > 0, rb
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra, rb)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3), (ra, rb)
        if clip is not None:
            assert ra["grad_norm"] > clip  # the clipping bound is active at every step
    wa = load_file(one / "checkpoints" / "step_00000012" / "model.safetensors")
    wb = load_file(two / "checkpoints" / "step_00000012" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero1", "zero2"])
def test_gradients_are_reduced_once_per_step_not_once_per_micro_batch(tiny_prepared, tmp_path, name):
    """The same 3 steps with 1 and with 4 micro-batches per step issue the same number of
    reductions (tests/count_collectives.py counts them on each rank): gradients are reduced on a
    step's last micro-batch only. Reducing on every micro-batch would add 3 x (buckets) per step.
    ZeRO-2 is the exception by design: a rank keeps only its partition of the gradients, so
    DeepSpeed reduce-scatters them at every micro-batch (the README says so)."""
    cfg = tiny_config(tiny_prepared, tmp_path, "model.dropout=0", "train.precision=fp32", "train.num_threads=1",
                      "train.max_steps=3", "train.eval_every=100", "train.checkpoint_every=100")
    config = tmp_path / "run.yaml"
    config.write_text(dump_yaml(cfg))
    driver = os.path.join(os.path.dirname(__file__), "count_collectives.py")
    reductions = {}
    for batch, accum in (("4", "1"), ("1", "4")):
        counts = tmp_path / f"counts-{accum}"
        counts.mkdir()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               driver, "pretrain", "--config", str(config), f"train.batch_size={batch}",
                               f"train.grad_accum_steps={accum}", *STRATEGIES[name],
                               f"out_dir={tmp_path / accum}"], capture_output=True, text=True, timeout=900,
                              cwd=tmp_path, env={**os.environ, "DS_ACCELERATOR": "cpu", "COUNT_DIR": str(counts)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        reductions[accum] = [json.loads((counts / f"rank{r}.json").read_text())["reductions"] for r in (0, 1)]
    assert min(reductions["1"]) > 3  # the counting reached the gradients: more than the loop's own per step
    if name == "zero2":
        assert reductions["4"] > reductions["1"], reductions
    else:
        assert reductions["4"] == reductions["1"], reductions
