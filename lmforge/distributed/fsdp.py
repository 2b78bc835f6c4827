"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and AdamW state sharded.

Each rank keeps 1/N of every parameter (a DTensor sharded on dim 0), 1/N of its gradient and 1/N
of AdamW's moments. A forward all-gathers one transformer block's parameters at a time and frees
them after (reshard_after_forward); a backward reduce-scatters each block's gradients. The
transformer blocks (every child of an nn.ModuleList in the model) are one unit each, and the
root — embeddings, final norms and the tied head — another, as torchtitan applies it.

Mixed precision: on a CUDA GPU in bf16, parameters are gathered and computed in bf16 and
gradients reduced in fp32 (MixedPrecisionPolicy), while the fp32 shards are what AdamW updates.
On a CPU, gathers stay fp32 and the loop's bf16 autocast does the casting, as in one process.

Checkpoints: `full_state` gathers the whole model and optimizer state to rank 0 on the CPU
(torch.distributed.checkpoint.state_dict, full_state_dict=True), so an FSDP run writes the same
files as a single process and resumes under any strategy or world size.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lmforge.distributed.engine import Engine, by_index, by_name, param_names
from lmforge.distributed.parallel import Parallel
from lmforge.runs.checkpoint import WRAPPER_PREFIXES, indexed_state_dict, optimizer_tensors


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 gathers one at a time: every child of every nn.ModuleList (the
    transformer blocks), in order."""
    return [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]


class FSDPEngine(Engine):
    evaluate_on_all_ranks = True  # a forward gathers each block's shards from every rank

    def __init__(self, model: nn.Module, cfg, par: Parallel, device: torch.device, precision: str,
                 make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]):
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" and device.type == "cuda" else MixedPrecisionPolicy())
        # the model arrives on the CPU (train/loop.py): each rank keeps its shards, on its device
        mesh = init_device_mesh(device.type, (par.world,))
        for unit in shard_units(model):
            fully_shard(unit, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)  # in place: names and module tree unchanged
        # the optimizer is made over the sharded parameters (DTensors): each rank steps its shards
        super().__init__(model, make_optimizer(model), par)
        self.options = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def micro_batch(self, last: bool):
        # reduce-scatter gradients only on the step's last micro-batch; before it, each rank
        # accumulates unsharded gradients locally (FSDP2's equivalent of DDP's no_sync)
        self.model.set_requires_gradient_sync(last)
        return super().micro_batch(last)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        norm = super().clip_grad_norm(max_norm)  # a DTensor: the norm over every rank's shards
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def full_state(self):
        weights = get_model_state_dict(self.model, options=self.options)  # whole on rank 0, {} elsewhere
        if not self.optimizer.state:
            # before the first step (checkpoint 0): torch would initialise the state by a step at lr 0,
            # which counts as a step in AdamW's bias correction; an empty state is the exact answer
            optim = by_name(self.optimizer.state_dict(), param_names(self.model, self.optimizer))
        else:
            optim = get_optimizer_state_dict(self.model, self.optimizer, options=self.options)
        if not self.par.main:
            return {}, {}, {}
        for prefix in WRAPPER_PREFIXES:
            weights = {k.replace(prefix, ""): v for k, v in weights.items()}
        weights = {k: v.contiguous() for k, v in weights.items()}
        return weights, *optimizer_tensors(by_index(optim, param_names(self.model, self.optimizer)))

    def load_full_state(self, weights, opt_tensors, opt_meta):
        # the weights were in the module before fully_shard cut it: only AdamW's state is left to set
        named = by_name(indexed_state_dict(opt_tensors, opt_meta), param_names(self.model, self.optimizer))
        if not named["state"]:  # saved before the first step: nothing to load (see full_state)
            return
        set_optimizer_state_dict(self.model, self.optimizer, named, options=StateDictOptions(full_state_dict=True))
