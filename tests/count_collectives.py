"""Run `lmforge ARGS...` under torchrun with every gradient reduction counted (a test driver, not
a test): DDP's bucket all-reduces through a counting comm hook, and the reductions FSDP2 and
DeepSpeed issue from Python (torch.distributed / deepspeed.comm all_reduce, reduce_scatter).
Each rank writes {"reductions": n} to $COUNT_DIR/rank<RANK>.json when the run ends."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from lmforge.distributed import engine as engine_module

counts = {"reductions": 0}


def counted(fn):
    def wrapper(*args, **kwargs):
        counts["reductions"] += 1
        return fn(*args, **kwargs)
    return wrapper


_ddp_init = engine_module.DDPEngine.__init__


def ddp_init(self, *args, **kwargs):
    _ddp_init(self, *args, **kwargs)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):  # DDP checks the hook's parameter names
        counts["reductions"] += 1
        return allreduce_hook(state, bucket)

    self.forward_model.register_comm_hook(None, hook)


engine_module.DDPEngine.__init__ = ddp_init
# FSDP2's gradient reduce-scatter (the loop's own all-reduces of counts and losses, one set per
# step at any accumulation, are not counted: they go through lmforge's Parallel.sum_, patched back)
for name in ("reduce_scatter_tensor", "all_reduce"):
    setattr(dist, name, counted(getattr(dist, name)))
try:
    from deepspeed import comm as ds_comm

    for name in ("all_reduce", "reduce_scatter_fn", "reduce_scatter_tensor", "reduce_scatter", "reduce"):
        if hasattr(ds_comm, name):
            setattr(ds_comm, name, counted(getattr(ds_comm, name)))
except ImportError:
    pass

if __name__ == "__main__":
    from lmforge.cli import main

    try:
        code = main(sys.argv[1:])
    finally:
        Path(os.environ["COUNT_DIR"], f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(counts))
    sys.exit(code)
