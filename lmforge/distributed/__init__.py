"""Data parallelism on existing engines, applied outside the model code (torchtitan's habit).

`torchrun --nproc_per_node=N -m lmforge pretrain ...` starts N processes; `setup` (parallel.py)
joins them into one process group — NCCL on CUDA GPUs, gloo on CPUs — and `make_engine` applies
the strategy of `distributed.strategy` to the model and builds its optimizer:

  ddp        DistributedDataParallel: whole model, gradients and AdamW state on every rank
             (engine.py)
  fsdp       FSDP2 (`fully_shard` per transformer block, then the whole model): parameters,
             gradients and AdamW state sharded across ranks, gathered block by block (fsdp.py)
  deepspeed  DeepSpeed ZeRO stage 0-3, optionally offloading optimizer state and parameters to
             CPU memory, with torch's AdamW (zero.py)

The model files never know about any of this. What the rest of lmforge does with it
(train/loop.py, jobs.py):
- each rank trains on its rows of every global batch (tasks/base.py `Task.shard`), so a global
  batch is train.batch_size x grad_accum_steps x world size, and the data and masks are those one
  process with the whole batch would use (a function of seed, step and example index);
- gradients are reduced once per optimizer step, on the step's last micro-batch, and each rank
  scales its loss so that the engine's average is the mean over the targets of the whole global
  batch (token-weighted, not a mean of per-rank means);
- rank 0 alone creates the run directory and logs; every checkpoint is consolidated into the
  single-process format (whole tensors, plain parameter names, optimizer state keyed by parameter
  index), so any run loads on a laptop and resumes under any strategy and world size.

May import: lmforge.runs (state-dict helpers), models, config, errors. Never lmforge.train: the
optimizer is passed in by the loop.
"""

from __future__ import annotations

from typing import Callable

import torch

from lmforge.distributed.engine import DDPEngine, Engine
from lmforge.distributed.parallel import Parallel, current, setup
from lmforge.errors import LmforgeError

STRATEGIES = ("ddp", "fsdp", "deepspeed")

__all__ = ["Engine", "Parallel", "STRATEGIES", "current", "make_engine", "setup"]


def make_engine(model: torch.nn.Module, cfg, par: Parallel, device: torch.device, precision: str,
                make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> Engine:
    """The model wrapped by `cfg.distributed.strategy`, with the optimizer `make_optimizer(model)`
    makes over its (possibly sharded) parameters: the loop passes it in (train/optim.py), so that
    parallelism is applied from outside and imports nothing of the training loop. A single
    process always gets the plain Engine, whatever the strategy."""
    strategy = cfg.distributed.strategy
    if par.world == 1:
        return Engine(model, make_optimizer(model))
    if strategy == "ddp":
        return DDPEngine(model, make_optimizer(model), par, device)
    if cfg.optim.name == "muon":  # Newton-Schulz orthogonalises a whole matrix; a shard is not one
        raise LmforgeError(f"optim.name=muon needs every rank to hold whole matrices, and distributed.strategy="
                           f"{strategy} shards them; use distributed.strategy=ddp, or optim.name=adamw")
    if cfg.optim.ema_decay is not None:  # the average is kept beside whole parameters (train/ema.py)
        raise LmforgeError(f"optim.ema_decay averages whole parameters on each rank, and distributed.strategy="
                           f"{strategy} shards them; use distributed.strategy=ddp, or optim.ema_decay=null")
    if strategy == "fsdp":
        from lmforge.distributed.fsdp import FSDPEngine
        return FSDPEngine(model, cfg, par, device, precision, make_optimizer)
    if strategy == "deepspeed":
        from lmforge.distributed.zero import DeepSpeedEngine
        return DeepSpeedEngine(model, cfg, par, device, precision, make_optimizer)
    raise LmforgeError(f"distributed.strategy={strategy!r} is not available; use one of {', '.join(STRATEGIES)}")
