"""DeepSpeed ZeRO (seed HelloDeepSpeed): optimizer state, gradients and parameters partitioned.

  stage 0  plain data parallel through DeepSpeed's engine
  stage 1  each rank keeps 1/N of AdamW's fp32 master weights and moments
  stage 2  + 1/N of the gradients (reduce-scattered during backward)
  stage 3  + 1/N of the parameters (gathered layer by layer in forward and backward)
  offload_optimizer: the partitioned optimizer state and its step on the CPU (ZeRO-Offload);
  offload_param (stage 3): parameters in CPU memory between uses.

lmforge keeps one meaning for its settings under DeepSpeed: the engine is given torch's AdamW
(train/optim.py, same groups and hyper-parameters), train.batch_size as the micro-batch,
train.grad_accum_steps as its accumulation (with the boundary set by the loop, so stages 0 and 1
reduce the gradients once per step; stages 2 and 3 reduce-scatter them at every micro-batch, as a
rank keeps only its partition of them — tests/test_distributed_semantics.py counts them),
optim.max_grad_norm as its clipping, and the loop keeps setting the learning rate every step. bf16 and fp16 (with DeepSpeed's dynamic loss scaling) come from
train.precision. The loss is already the token-weighted global mean (train/loop.py), so
DeepSpeed does not divide it by the accumulation steps again.

A non-finite gradient makes DeepSpeed skip the update itself (it checks the norm it computes);
the loop counts that step as skipped, as in one process. Stage 0 in fp32 is DeepSpeed's plain
data parallelism with torch's optimizer as it is: DeepSpeed computes no gradient norm and checks
nothing there, so lmforge clips, measures the norm and skips a non-finite step itself, exactly as
in one process. fp16's dynamic loss scale is DeepSpeed's own (the loop's GradScaler is not used):
its scale and counters go into the checkpoint and come back on resume.

Checkpoints: every tensor is gathered to the single-process format through DeepSpeed's
fragment API (deepspeed.utils.safe_get_full_fp32_param / safe_get_full_optimizer_state): the
fp32 master weights and AdamW moments of each parameter, whole, keyed as one process keys them.
Resuming sets them back the same way, so a ZeRO run resumes under any strategy and world size.
On a CPU, DeepSpeed needs DS_ACCELERATOR=cpu (set here if unset); it then talks over gloo.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import yaml
from torch.utils._pytree import tree_flatten, tree_unflatten

from lmforge.distributed.engine import Engine, param_names
from lmforge.distributed.parallel import Parallel
from lmforge.errors import LmforgeError
from lmforge.runs.checkpoint import clean_state_dict, indexed_state_dict, optimizer_tensors


def deepspeed_config(cfg, world: int, precision: str, device: torch.device) -> dict:
    """The DeepSpeed config for this run: lmforge's settings, then the file of
    distributed.deepspeed_config merged in (refused where it contradicts them)."""
    d, t = cfg.distributed, cfg.train
    zero: dict = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    ours = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.batch_size * t.grad_accum_steps * world,
        "gradient_clipping": cfg.optim.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # dynamic loss scaling (loss_scale 0), as torch's GradScaler: start high, halve on overflow
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, lmforge's parameter groups
        "zero_force_ds_cpu_optimizer": False,  # also with offload: the same AdamW as one process
        "steps_per_print": 2 ** 31 - 1,  # lmforge logs
    }
    if d.deepspeed_config is None:
        return ours
    path = Path(d.deepspeed_config)
    try:
        theirs = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text())
    except OSError as e:
        raise LmforgeError(f"distributed.deepspeed_config={d.deepspeed_config}: cannot read it ({e.strerror})") from None
    except (ValueError, yaml.YAMLError) as e:
        raise LmforgeError(f"distributed.deepspeed_config={d.deepspeed_config} is not valid JSON/YAML: "
                           f"{str(e).splitlines()[0]}") from None
    if not isinstance(theirs, dict):
        raise LmforgeError(f"distributed.deepspeed_config={d.deepspeed_config} must hold a mapping")
    for key in ("optimizer", "scheduler"):
        if key in theirs:
            raise LmforgeError(f"{path}: remove '{key}'; lmforge passes its AdamW and sets the learning rate "
                               f"every step (optim.*)")
    return _merge(ours, theirs, str(path))


def _merge(ours: dict, theirs: dict, where: str, prefix: str = "") -> dict:
    out = dict(ours)
    for k, v in theirs.items():
        if isinstance(v, dict) and isinstance(ours.get(k), dict):
            out[k] = _merge(ours[k], v, where, prefix + k + ".")
        elif k in ours and ours[k] != v and not isinstance(ours[k], dict):
            raise LmforgeError(f"{where} sets {prefix}{k}={v!r} but lmforge's settings give {ours[k]!r}; "
                               f"set it through the lmforge config (train.*, optim.*, distributed.*) instead")
        else:
            out[k] = v
    return out


class OutputsAsTuple:
    """Forward hooks on `module` that show ZeRO-3's own forward hooks its output as a tuple of its
    tensors, and give the caller the output as the model made it.

    ZeRO-3 gathers a module's parameters for its backward from an autograd hook it puts on the
    tensors of the module's output, which it finds inside tuples, lists and dicts only (it warns
    and skips anything else); lmforge's models return a dataclass (a pytree node, lmforge/models).
    The root module's hook is the one that gathers what the root's own forward reads, such as the
    tied decoder. The first hook here, ahead of DeepSpeed's, flattens the output into a tuple; the
    last, after them, puts the (now hooked) tensors back into their dataclass."""

    def __init__(self, module: nn.Module):
        self.specs: list = []  # one per forward in flight (a module's hooks run in order, per call)
        module.register_forward_hook(self.flatten, prepend=True)
        module.register_forward_hook(self.unflatten)

    def flatten(self, module: nn.Module, inputs, output) -> tuple:
        leaves, spec = tree_flatten(output)
        self.specs.append(spec)
        return tuple(leaves)

    def unflatten(self, module: nn.Module, inputs, output):
        return tree_unflatten(list(output), self.specs.pop())


class DeepSpeedEngine(Engine):

    def __init__(self, model: nn.Module, cfg, par: Parallel, device: torch.device, precision: str,
                 make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError:
            raise LmforgeError("distributed.strategy=deepspeed needs DeepSpeed: pip install deepspeed") from None
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # lmforge reports; DeepSpeed's INFO is noise here
        # DeepSpeed still calls torch's older collective names; the warning says nothing to a user
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        optimizer = make_optimizer(model)
        self.names = param_names(model, optimizer)  # index -> name, before DeepSpeed flattens the groups
        self.group_params = [len(g["params"]) for g in optimizer.param_groups]
        self.stage = cfg.distributed.zero_stage
        # stage 0 in fp32: DeepSpeed steps torch's optimizer untouched (no norm, no overflow check)
        self.plain = self.stage == 0 and precision == "fp32"
        config = deepspeed_config(cfg, par.world, precision, device)
        if self.plain:
            config["gradient_clipping"] = 0.0  # lmforge clips (step), as in one process
        self.ds, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                           dist_init_required=False)
        if self.stage == 3:  # after initialize: around the hooks ZeRO-3 has just put on every module
            OutputsAsTuple(model)
        super().__init__(model, ds_optimizer, par)
        self.base = optimizer  # torch's AdamW, stepping DeepSpeed's flat fp32 partitions
        self.forward_model = self.ds
        self.evaluate_on_all_ranks = self.stage == 3  # a stage-3 forward gathers parameters from every rank
        self.param_by_name = dict(model.named_parameters(remove_duplicate=False))
        # every name of a tied parameter -> the name the optimizer knows it by
        name_of = {id(self.param_by_name[n]): n for n in self.names}
        self.owner = {key: name_of[id(p)] for key, p in self.param_by_name.items()}
        from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                     safe_set_full_fp32_param, safe_set_full_optimizer_state)
        self._get, self._get_state = safe_get_full_fp32_param, safe_get_full_optimizer_state
        self._set, self._set_state = safe_set_full_fp32_param, safe_set_full_optimizer_state

    # -- one step -------------------------------------------------------------------------------
    def micro_batch(self, last: bool):
        # DeepSpeed reduces (ZeRO-2/3: reduce-scatters) gradients at the accumulation boundary only
        self.ds.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the loop's loss is already the step's mean

    def step(self, max_norm: float, loss_sum: torch.Tensor, scaler=None) -> tuple[torch.Tensor, bool]:
        if self.plain:  # the gradients are whole and already averaged over the ranks
            norm = torch.nn.utils.clip_grad_norm_([p for g in self.base.param_groups for p in g["params"]], max_norm)
            if not bool(torch.isfinite(loss_sum + norm)):
                self.ds.zero_grad()  # skip: the weights stay as they are
                return norm, False
            self.ds.step()
            return norm, True
        # DeepSpeed computes the norm, clips to gradient_clipping (= optim.max_grad_norm) and
        # steps, or skips the update when the gradients are not finite
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        if norm is None:  # a configuration where DeepSpeed measures none: a bug to report, not a bad step
            raise RuntimeError(f"DeepSpeed (ZeRO stage {self.stage}) reported no gradient norm")
        norm = torch.as_tensor(float(norm))
        overflow = getattr(self.ds.optimizer, "overflow", False)  # fp16: DeepSpeed skipped this update
        return norm, bool(torch.isfinite(norm)) and bool(torch.isfinite(loss_sum)) and not overflow

    def zero_grad(self) -> None:
        """Nothing to do: DeepSpeed's step clears the gradients at the accumulation boundary."""

    # -- fp16 loss scaling: DeepSpeed's own -----------------------------------------------------
    SCALE_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")

    def make_grad_scaler(self, precision: str, device: torch.device):
        return None  # DeepSpeed scales the loss in ds.backward: a second scaler would scale it twice

    def _ds_scaler(self):
        """DeepSpeed's dynamic loss scaler (ZeRO 1-3: loss_scaler; stage 0: loss_scale_config),
        None outside fp16."""
        if not self.ds.fp16_enabled():
            return None
        opt = self.ds.optimizer
        for name in ("loss_scaler", "loss_scale_config"):
            found = getattr(opt, name, None)
            if found is not None and hasattr(found, "cur_scale"):
                return found
        return None

    def loss_scale_state(self, scaler) -> "dict | None":
        found = self._ds_scaler()
        if found is None:
            return None
        return {k: float(getattr(found, k)) if k == "cur_scale" else getattr(found, k)
                for k in self.SCALE_FIELDS if hasattr(found, k)}

    def load_loss_scale_state(self, scaler, state: "dict | None") -> None:
        found = self._ds_scaler()
        if found is None or not state:
            return
        if "cur_scale" not in state:  # a GradScaler's state (a run started under another strategy)
            state = {"cur_scale": float(state.get("scale", found.cur_scale))}
        for k, v in state.items():
            if k in self.SCALE_FIELDS and hasattr(found, k):
                setattr(found, k, v)

    def loss_scale(self, scaler) -> "float | None":
        found = self._ds_scaler()
        return float(found.cur_scale) if found is not None else None

    def set_lr(self, lr: float) -> None:
        for group in self.base.param_groups:  # the groups DeepSpeed's partitions step with
            group["lr"] = lr

    # -- checkpoints ----------------------------------------------------------------------------
    def _partitioned(self) -> bool:
        p = next(iter(self.param_by_name.values()))
        return hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None

    def _link_optimizer_fragments(self) -> None:
        """ZeRO 1/2 (and bf16) map each parameter to its slices of AdamW's flat state tensors.
        DeepSpeed makes that map once, right after the first group's first update, when the
        second group (lmforge has two: decayed, not) has no state yet; make it again now that
        every group has one."""
        zero_opt = self.ds.optimizer
        if hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state") and all(self.base.state.get(p) for g in
                                                                              self.base.param_groups for p in g["params"]):
            zero_opt._hp_optimizer_states_linked = False
            zero_opt._lazy_init_hp_params_optimizer_state()

    def full_state(self):
        if not self._partitioned():  # ZeRO stage 0 in fp32: whole tensors and torch's own optimizer
            return super().full_state()
        self._link_optimizer_fragments()
        # every rank joins each gather, in the same order
        masters = {n: self._get(self.param_by_name[n]) for n in self.names}
        states = {}
        if self.base.state:
            step = next(iter(self.base.state.values()))["step"]
            for i, n in enumerate(self.names):
                p = self.param_by_name[n]
                states[i] = {"step": step.detach().clone().cpu(),
                             **{k: self._get_state(p, k).cpu() for k in ("exp_avg", "exp_avg_sq")}}
        if not self.par.main:
            return {}, {}, {}
        weights = clean_state_dict(self.model) if self.stage < 3 else {}
        for key in self.param_by_name:  # tied parameters: every name, one tensor
            weights[key] = masters[self.owner[key]].detach().to("cpu", torch.float32).contiguous()
        groups, start = [], 0
        for g, count in zip(self.base.param_groups, self.group_params):
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + count))})
            start += count
        return weights, *optimizer_tensors({"state": states, "param_groups": groups})

    def load_full_state(self, weights, opt_tensors, opt_meta):
        # the module got these weights before deepspeed.initialize (train/loop.py); here the fp32
        # masters (exact also when the module runs in bf16) and AdamW's moments and step
        if not self._partitioned():
            return super().load_full_state(weights, opt_tensors, opt_meta)
        for n in self.names:
            self._set(self.param_by_name[n], weights[n].float())
        sd = indexed_state_dict(opt_tensors, opt_meta)
        if not sd["state"]:  # saved before the first step
            return
        step = next(iter(sd["state"].values()))["step"]
        for flat in (p for g in self.base.param_groups for p in g["params"]):
            if not self.base.state[flat]:  # torch's AdamW makes its state at the first step: make it now
                self.base.state[flat] = {"step": step.clone().to(flat.device),
                                         "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        self._link_optimizer_fragments()
        for i, n in enumerate(self.names):
            for k in ("exp_avg", "exp_avg_sq"):
                self._set_state(self.param_by_name[n], sd["state"][i][k].float(), k)
