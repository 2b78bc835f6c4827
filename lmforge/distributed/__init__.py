"""Data parallelism on torch.distributed, applied outside the model code (torchtitan's habit).

`torchrun --nproc_per_node=N -m lmforge pretrain ...` starts N processes and sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address; `setup` joins them into one process group —
NCCL on CUDA GPUs (one GPU per process, by LOCAL_RANK), gloo on CPUs — and `wrap` applies the
strategy of `distributed.strategy` to the model (today: ddp, DistributedDataParallel). The
model files never know about any of this.

What the rest of lmforge does with it (train/loop.py, pretrain.py):
- each rank trains on its rows of every global batch (tasks/base.py `Task.shard`), so a global
  batch is train.batch_size x grad_accum_steps x world size, and the data and masks are those one
  process with the whole batch would use;
- gradients are all-reduced once per optimizer step (DDP's no_sync on every micro-batch but the
  last), and each rank scales its loss so that DDP's average is the mean over the targets of
  the whole global batch (token-weighted, not a mean of per-rank means);
- rank 0 alone creates the run directory, logs, evaluates and writes checkpoints — in the
  single-process format, free of the `module.` prefix — so any run loads on a laptop.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError

STRATEGIES = ("ddp",)


@dataclass(frozen=True)
class Parallel:
    """This process's place in the job: rank, world size, rank on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In place: the sum of `t` over all ranks."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable value made by lmforge itself)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


_current = Parallel()


def current() -> Parallel:
    """The job as `setup` found it (a single process until then)."""
    return _current


def setup(device: torch.device) -> tuple[Parallel, torch.device]:
    """Join the process group torchrun describes in the environment, if any. Returns this
    process's Parallel and its device (on CUDA, the GPU of its LOCAL_RANK)."""
    global _current
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _current, device
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise LmforgeError("WORLD_SIZE is set but RANK is not: launch with torchrun --nproc_per_node=N") from None
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _current = Parallel(rank, world, local_rank)
    return _current, device


def wrap(model: torch.nn.Module, strategy: str, par: Parallel, device: torch.device) -> torch.nn.Module:
    """The model as the strategy runs it; the model itself as a single process."""
    if par.world == 1:
        return model
    if strategy == "ddp":
        # no buffer sync inside forward (lmforge's models keep no buffers that training changes),
        # so there is no collective in forward and rank 0 may evaluate alone
        ddp = torch.nn.parallel.DistributedDataParallel
        no_sync_kw = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else "broadcast_buffers")  # the newer name, where torch has it
        return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync_kw: False})
    raise LmforgeError(f"distributed.strategy={strategy!r} is not available; use one of {', '.join(STRATEGIES)}")
