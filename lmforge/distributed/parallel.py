"""This process's place in a torchrun job (rank, world size, local rank) and joining the job.

`setup` reads what torchrun puts in the environment (RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address) and joins the process group: NCCL on CUDA GPUs (one GPU per process, by
LOCAL_RANK), gloo on CPUs. Without torchrun it is a single process and nothing happens.

Every collective waits at most `distributed.timeout_s` for the slowest rank (the group's
timeout). Nothing long runs while the other ranks wait in one, except rank 0's evaluations,
checkpoints and reports, which that timeout must cover: data preparation is done by whichever
rank first takes the cache's file lock, with the others waiting on the lock (data/packages.py).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError


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


def setup(device: torch.device, timeout_s: float = 1800.0) -> tuple[Parallel, torch.device]:
    """Join the process group torchrun describes in the environment, if any, with collectives
    that wait up to `timeout_s` seconds (`distributed.timeout_s`). Returns this process's
    Parallel and its device (on CUDA, the GPU of its LOCAL_RANK)."""
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
        # Leave the group while the interpreter is still whole: a gloo group left to interpreter
        # shutdown can abort the process ("terminate called without an active exception",
        # SIGABRT) after a finished run; it happened here once in a ZeRO-3 test (pytorch#190489).
        atexit.register(_leave_group)
    _current = Parallel(rank, world, local_rank)
    return _current, device


def _leave_group() -> None:
    """Every rank leaves together: a gloo group torn down while a peer still talks to it can
    abort the process at exit (seen here under load: a finished FSDP2 rank got SIGABRT). A rank
    whose peer is gone (it failed; torchrun stops the job) waits at most a minute."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        with contextlib.suppress(Exception):
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    dist.destroy_process_group()


def exit_job(code: int) -> int:
    """The end of a CLI process: in a torchrun job, leave the group and end the process at once
    with `code`, without the interpreter's finalization. Leaving the group is not enough on gloo:
    FSDP2's device mesh and DeepSpeed keep references to the group, so its C++ worker threads
    outlive destroy_process_group and abort the process ("terminate called without an active
    exception", SIGABRT) when finalization tears down what they still hold (pytorch#179291; seen
    in CI after a finished FSDP2 run, and once under ZeRO-3). Everything a run writes is closed by
    then; stdout, stderr and logging are flushed here. A single process returns `code` unchanged."""
    if not dist.is_initialized():
        return code
    _leave_group()
    import logging
    import sys
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
