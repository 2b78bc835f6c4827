"""The optimizers (AdamW with two parameter groups, decayed / not; Muon for the hidden matrices
with AdamW for the rest) and the learning-rate schedules.

Which tensors are decayed (optim.decay):
  "linear" (BERT, seed MLAB W2D2): the weight of every `nn.Linear`, nothing else — not biases,
           LayerNorm parameters or embeddings. A BERT with L layers has 6·L + 1 decayed tensors
           (q, k, v, out, ffn_in, ffn_out per layer, plus the MLM head's dense layer).
  "2d"     (GPT-2/GPT-3 recipe): every parameter with 2 or more dimensions — matmul weights and
           embeddings — and no bias or LayerNorm parameter.

optim.name=muon (Jordan et al. 2024, modded-nanogpt; torch.optim.Muon): the weight of every
nn.Linear inside the transformer blocks (the children of an nn.ModuleList: q, k, v, out, MLP)
steps with Muon — momentum, then the update orthogonalised by a Newton-Schulz iteration, so every
direction of the matrix moves at the same rate — and everything else (embeddings, the LM or MLM
head, norms, biases, classifier heads) with AdamW as above. Muon's learning rate is optim.muon_lr
(null: optim.lr), scaled per matrix by optim.muon_adjust_lr: "match_rms_adamw" (Liu et al. 2025,
Moonlight) makes the update's RMS AdamW's, so AdamW's lr and weight decay carry over; "original"
is Keller Jordan's sqrt(max(1, rows/cols)) with lrs near 0.02-0.05. The schedule multiplies both.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lmforge.config import OptimConfig
from lmforge.errors import LmforgeError


def param_groups(model: nn.Module, weight_decay: float, rule: str = "linear") -> list[dict]:
    """[decayed group, undecayed group] by `rule` ("linear" or "2d", see above); every trainable
    parameter appears in exactly one group, in module order."""
    if rule == "linear":
        decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    else:
        decay_ids = {id(p) for p in model.parameters() if p.dim() >= 2}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def layer_lr_scales(model: nn.Module, decay: float) -> dict[int, float]:
    """id(parameter) -> its learning-rate scale under layer-wise lr decay (optim.layer_lr_decay;
    Howard & Ruder 2018, Clark et al. 2020): in the model's stack of L layers (its largest
    nn.ModuleList), layer i (0 at the bottom) gets decay^(L - i); what comes before the stack
    (embeddings) decay^(L + 1); what comes after it (a final norm, the heads) 1. The layers near
    the input, the most general, move the least."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not stacks:
        raise LmforgeError("optim.layer_lr_decay needs a model with a stack of layers (an nn.ModuleList)")
    stack = max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))
    depth = len(stack)
    layer_of = {id(p): i for i, layer in enumerate(stack) for p in layer.parameters()}
    scales, past_stack = {}, False
    for p in model.parameters():
        if id(p) in layer_of:
            past_stack = True
            scales[id(p)] = decay ** (depth - layer_of[id(p)])
        else:
            scales[id(p)] = 1.0 if past_stack else decay ** (depth + 1)
    return scales


def with_layer_lr_decay(groups: list[dict], model: nn.Module, decay: float) -> list[dict]:
    """`groups` split by layer_lr_scales, each part carrying its "lr_scale" (the schedule
    multiplies it in: set_lr), in order of first appearance; unchanged for decay 1."""
    if decay == 1.0:
        return groups
    scales = layer_lr_scales(model, decay)
    out = []
    for group in groups:
        parts: dict[float, list] = {}
        for p in group["params"]:
            parts.setdefault(scales[id(p)], []).append(p)
        out += [{**group, "params": params, "lr_scale": scale, "name": f"{group['name']}@{scale:.4g}"}
                for scale, params in parts.items()]
    return out


def make_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """optim.name's optimizer: AdamW, or Muon with AdamW (MuonWithAdamW)."""
    if cfg.name == "muon":
        return MuonWithAdamW(model, cfg, device)
    return make_adamw(model, cfg, device)


def make_adamw(model: nn.Module, cfg: OptimConfig, device: torch.device,
               exclude: frozenset[int] = frozenset()) -> torch.optim.AdamW:
    """AdamW over `param_groups` (without the parameters whose id is in `exclude`; split by
    optim.layer_lr_decay), with torch's fused kernel on CUDA and on the CPU: one pass over
    each tensor and no temporaries (measured here on a 12M-parameter BERT: 4 ms a step against
    16 ms for the multi-tensor and 40 ms for the per-tensor implementation). With
    optim.bias_correction=false, the original BERT optimizer (`AdamWithoutBiasCorrection`)."""
    cls = torch.optim.AdamW if cfg.bias_correction else AdamWithoutBiasCorrection
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in exclude]}
              for g in param_groups(model, cfg.weight_decay, cfg.decay)]
    groups = with_layer_lr_decay(groups, model, cfg.layer_lr_decay)
    return cls([g for g in groups if g["params"] or not exclude], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
               eps=cfg.eps, fused=device.type in ("cuda", "cpu"))


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights Muon steps: of every nn.Linear inside an nn.ModuleList (the transformer blocks),
    in module order; not embeddings, heads, norms or biases."""
    seen, out = set(), []
    for blocks in (m for m in model.modules() if isinstance(m, nn.ModuleList)):
        for linear in (m for m in blocks.modules() if isinstance(m, nn.Linear)):
            if linear.weight.requires_grad and id(linear.weight) not in seen:
                seen.add(id(linear.weight))
                out.append(linear.weight)
    return out


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on `hidden_matrices(model)`, AdamW (make_adamw) on every other parameter,
    stepped together and seen by the loop, the engines and checkpoints as one optimizer: its
    param_groups are Muon's then AdamW's (the same dicts), and its state_dict is torch's format,
    Muon's parameters first, so a checkpoint and an exact resume work as for AdamW. Each group
    carries "lr_scale" (its peak lr / optim.lr): the schedule sets group lr = lr * lr_scale."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, device: torch.device):
        hidden = hidden_matrices(model)
        if not hidden:
            raise LmforgeError("optim.name=muon found no hidden matrices (nn.Linear inside the model's blocks) "
                               "to step; use optim.name=adamw for this model")
        muon_lr = cfg.muon_lr if cfg.muon_lr is not None else cfg.lr
        self.muon = torch.optim.Muon([{"params": hidden, "name": "muon", "lr_scale": muon_lr / cfg.lr}], lr=muon_lr,
                                     weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, nesterov=True,
                                     adjust_lr_fn=cfg.muon_adjust_lr)
        self.adamw = make_adamw(model, cfg, device, exclude=frozenset(map(id, hidden)))
        for group in self.adamw.param_groups:
            group.setdefault("lr_scale", 1.0)
        self.parts = (self.muon, self.adamw)
        # not super().__init__: the groups and state live in the two parts; these views are theirs
        self.defaults = {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonWithAdamW.step takes no closure")
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for part in self.parts:
            sd = part.state_dict()
            state.update({int(i) + offset: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [int(i) + offset for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in part.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups, offset = list(state_dict["param_groups"]), 0
        for part in self.parts:
            mine, groups = groups[:len(part.param_groups)], groups[len(part.param_groups):]
            n = sum(len(g["params"]) for g in mine)
            part.load_state_dict({
                "state": {int(i) - offset: s for i, s in state_dict["state"].items() if offset <= int(i) < offset + n},
                "param_groups": [{**g, "params": [int(i) - offset for i in g["params"]]} for g in mine]})
            offset += n


class AdamWithoutBiasCorrection(torch.optim.AdamW):
    """The optimizer of the original BERT code ("BERTAdam"): AdamW without Adam's bias correction,
    p -= lr * (m / (sqrt(v) + eps) + weight_decay * p). Zhang et al. 2021 ("Revisiting Few-sample
    BERT Fine-tuning") found that leaving the correction out makes fine-tuning unstable, mostly
    early on, when m and v are still small; it is here to measure that (optim.bias_correction).

    It runs torch's AdamW kernel exactly: with t the step, m / (sqrt(v) + eps) equals
    k * m_hat / (sqrt(v_hat) + eps / sqrt(1 - beta2^t)) with k = (1 - beta1^t) / sqrt(1 - beta2^t),
    so each step scales the group's lr by k and its eps by 1 / sqrt(1 - beta2^t), and divides
    weight_decay by k so that the decay (lr * weight_decay) stays as given; then restores them."""

    @torch.no_grad()
    def step(self, closure=None):
        saved = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            first = next((p for p in group["params"] if p in self.state), None)
            t = float(self.state[first]["step"]) + 1 if first is not None else 1.0
            k = (1 - beta1 ** t) / math.sqrt(1 - beta2 ** t)
            saved.append((group["lr"], group["eps"], group["weight_decay"]))
            group["lr"], group["eps"] = group["lr"] * k, group["eps"] / math.sqrt(1 - beta2 ** t)
            group["weight_decay"] = group["weight_decay"] / k
        try:
            return super().step(closure)
        finally:
            for group, (lr, eps, wd) in zip(self.param_groups, saved):
                group["lr"], group["eps"], group["weight_decay"] = lr, eps, wd


def lr_at(step: float, max_steps: float, cfg: OptimConfig) -> float:
    """Learning rate for the update made at `step` (0-based). With a batch-size ramp the loop
    passes positions counted in tokens (in units of a full step) instead: lmforge/train/schedule.py.

    linear (default, seed MLAB W2D2): rises linearly from lr·min_lr_frac at step 0 to lr at the end
    of warmup (warmup_frac · max_steps steps), then falls linearly to lr·min_lr_frac at max_steps.
    cosine: same warmup, then half a cosine down to lr·min_lr_frac. constant: same warmup, then lr.
    """
    top, bottom = cfg.lr, cfg.lr * cfg.min_lr_frac
    warmup = int(round(cfg.warmup_frac * max_steps))
    if step < warmup:
        return bottom + (top - bottom) * step / warmup
    if cfg.schedule == "constant":
        return top
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if cfg.schedule == "cosine":
        return bottom + (top - bottom) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return top - (top - bottom) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr: `lr` times the group's lr_scale (Muon's own peak lr; 1 elsewhere)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
