"""torchrun with DDP on this CPU (gloo, 2 processes) against one process with the whole batch.

2 ranks x batch b with gradient accumulation must give the same per-step losses and final
weights as 1 process x batch 2b (dropout off; to float rounding, since the gradients are summed
in another order), and the run directory must be the single-process one: rank 0 alone writes,
checkpoints carry no `module.` prefix.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from lmforge.config import dump_yaml
from lmforge.train.log import read_metrics


def _run(argv, tmp_path):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_two_ddp_ranks_equal_one_process_with_the_whole_batch(tiny_prepared, tmp_path, arch):
    extra = ["task.name=clm", "model.arch=gpt"] if arch == "gpt" else []
    cfg = tiny_config(tiny_prepared, tmp_path, *extra, "model.dropout=0", "train.precision=fp32",
                      "train.num_threads=1", "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3",
                      "train.grad_accum_steps=2")
    config = tmp_path / "run.yaml"
    config.write_text(dump_yaml(cfg))
    _run([sys.executable, "-m", "lmforge", "pretrain", "--config", str(config), "train.batch_size=8",
          f"out_dir={tmp_path / 'one'}"], tmp_path)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "-m", "lmforge", "pretrain", "--config", str(config), "train.batch_size=4",
                 f"out_dir={tmp_path / 'two'}"], tmp_path)
    assert "2 processes (ddp); global batch 4 x 2 x 2 = 16 sequences" in proc.stdout
    (one,) = (tmp_path / "one").iterdir()
    (two,) = (tmp_path / "two").iterdir()  # one run directory, made by rank 0
    a, b = read_metrics(one), read_metrics(two)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6), (ra, rb)
    wa = load_file(one / "checkpoints" / "step_00000006" / "model.safetensors")
    wb = load_file(two / "checkpoints" / "step_00000006" / "model.safetensors")
    assert wa.keys() == wb.keys() and not any(k.startswith("module.") for k in wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5)
