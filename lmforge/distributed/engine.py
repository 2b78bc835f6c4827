"""What the training loop asks of a parallelism strategy, and the plain-torch answer to it.

The loop (train/loop.py) never touches DDP, FSDP or DeepSpeed directly. It holds an Engine and
asks it to: run a micro-batch's backward (deferring the gradient all-reduce until the last
micro-batch of a step), clip and step, and hand over the model and optimizer state in the
single-process checkpoint format — or take them back on resume. This file is that interface,
implemented for one process and for DDP (both keep whole parameters and a whole optimizer on
every rank, so the state is simply read off rank 0). fsdp.py and zero.py implement it for
sharded parameters and optimizer states, where producing the whole state is a collective that
every rank joins.

The single-process optimizer format (runs/checkpoint.py) keys AdamW's tensors by the parameter's
index in the optimizer (decayed group first, in module order). Sharded engines convert to and from
parameter names (`param_names`), so a checkpoint does not depend on the strategy or world size.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn as nn

from lmforge.distributed.parallel import Parallel
from lmforge.runs.checkpoint import clean_state_dict, optimizer_tensors, restore_optimizer


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter the optimizer holds, in its index order (group by group)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


class Engine:
    """One process: the model and its optimizer, as they are."""

    # Evaluation on every rank (needed when parameters are sharded: a forward gathers them), or
    # on rank 0 alone, on the unwrapped model, while the others wait at the next collective.
    evaluate_on_all_ranks = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, par: Parallel = Parallel()):
        self.model = model  # the plain model: its names are the checkpoint's names
        self.optimizer = optimizer
        self.par = par
        self.forward_model: nn.Module = model  # what the task's loss is computed with

    # -- one step -------------------------------------------------------------------------------
    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward; with several ranks, gradients are
        reduced only on the step's last micro-batch."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients to `max_norm` (inf: no clipping); the norm before clipping."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, max_norm: float, loss_sum: torch.Tensor, scaler=None) -> tuple[torch.Tensor, bool]:
        """Clip and update, unless the loss or the gradient norm is not finite (then the update
        is skipped: one bad batch or overflow must not poison the weights). Returns (gradient
        norm before clipping, whether the weights were updated)."""
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # true gradients, for clipping and the norm we log
        norm = self.clip_grad_norm(max_norm)
        if not bool(torch.isfinite(loss_sum + norm)):  # one check (one device sync) for both
            return norm, False
        if scaler is not None:
            scaler.step(self.optimizer)
        else:
            self.optimizer.step()
        return norm, True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- fp16 loss scaling ----------------------------------------------------------------------
    def make_grad_scaler(self, precision: str, device: torch.device) -> "torch.amp.GradScaler | None":
        """The loss scaler the loop multiplies the loss with: torch's GradScaler in fp16 (fp16
        overflows above 65,504: it scales the loss up, skips a step whose gradients overflowed and
        halves the factor, and grows it again after 2,000 good steps), else None. An engine with
        loss scaling of its own (DeepSpeed) returns None and keeps its scaler itself."""
        return torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def loss_scale_state(self, scaler) -> "dict | None":
        """The state of whichever loss scaler this engine really uses, for the checkpoint; None
        without one."""
        return scaler.state_dict() if scaler is not None else None

    def load_loss_scale_state(self, scaler, state: "dict | None") -> None:
        """Inverse of loss_scale_state: on resume, the scale and its counters continue."""
        if scaler is None or not state:
            return
        if "cur_scale" in state:  # DeepSpeed's scaler (a run started under ZeRO): carry its scale over
            state = {**scaler.state_dict(), "scale": float(state["cur_scale"]), "_growth_tracker": 0}
        scaler.load_state_dict(state)

    def loss_scale(self, scaler) -> "float | None":
        """The current loss scale, for the log; None without loss scaling."""
        return scaler.get_scale() if scaler is not None else None

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:  # lr_scale: a group's own peak lr / optim.lr (Muon's)
            group["lr"] = lr * group.get("lr_scale", 1.0)

    # -- checkpoints ----------------------------------------------------------------------------
    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
        """(model tensors, optimizer tensors, optimizer meta) of the whole model in the
        single-process format. Every rank calls it; only rank 0's result is complete."""
        if not self.par.main:
            return {}, {}, {}
        return clean_state_dict(self.model), *optimizer_tensors(self.optimizer.state_dict())

    def load_full_state(self, weights: dict[str, torch.Tensor], opt_tensors: dict[str, torch.Tensor],
                        opt_meta: dict) -> None:
        """Inverse of full_state, on every rank, from the same checkpoint. The loop has already
        loaded `weights` into the plain model before the engine was made (every strategy starts
        from it); an engine restores what it keeps apart from the module's weights: AdamW's
        state here, and DeepSpeed also its fp32 master copy."""
        restore_optimizer(self.optimizer, opt_tensors, opt_meta)


class DDPEngine(Engine):
    """DistributedDataParallel: every rank holds the whole model and optimizer; gradients are
    all-reduced in buckets during the backward of the step's last micro-batch."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, par: Parallel, device: torch.device):
        super().__init__(model, optimizer, par)
        # no buffer sync inside forward (lmforge's models keep no buffers that training changes),
        # so there is no collective in forward and rank 0 may evaluate alone
        ddp = nn.parallel.DistributedDataParallel
        no_sync_kw = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else "broadcast_buffers")  # the newer name, where torch has it
        self.forward_model = ddp(model, device_ids=[device.index] if device.type == "cuda" else None,
                                 **{no_sync_kw: False})

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.forward_model.no_sync()


def by_name(sd: dict, names: list[str]) -> dict:
    """An optimizer state_dict keyed by parameter index -> keyed by parameter name."""
    return {"state": {names[int(i)]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]]}


def by_index(sd: dict, names: list[str]) -> dict:
    """Inverse of by_name."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: s for n, s in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]}

