"""`lmforge plan`: how big a model and how many tokens a compute budget should buy, and how long
that takes here (seed MLAB "Applying scaling laws").

The fit used is Chinchilla's parametric loss, Approach 3 of Hoffmann et al. 2022 ("Training
Compute-Optimal Large Language Models", eq. 10 and appendix D.2):

    L(N, D) = E + A / N^alpha + B / D^beta,   E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28

with N parameters, D training tokens and the compute C = 6 N D FLOPs. Minimising L at fixed C
gives (their eq. 4)

    N_opt(C) = G (C/6)^a,   D_opt(C) = G^-1 (C/6)^b,   a = beta/(alpha+beta), b = alpha/(alpha+beta),
    G = (alpha A / (beta B))^(1/(alpha+beta))

i.e. a = 0.45, b = 0.55. Their Approaches 1 and 2 find a = b = 0.5 and about 20 tokens per
parameter at the compute they trained; the plan prints that rule of thumb beside the fit. The fit
was made on decoder-only models of 70M-16B parameters trained on MassiveText: for a BERT, for
tiny models and for other data it is a starting point, not a law.

Time: the budget in FLOPs divided by the FLOP/s a training step reaches on this machine, measured
by timing a few steps of a small lmforge GPT (6 N FLOPs per token, the same convention as C = 6ND)
unless --tokens-per-s gives the throughput of the planned model itself. The steps run where a run
would train: train.device and train.precision resolved as the training loop resolves them (auto:
a GPU if there is one, bf16 where it pays), under the loop's autocast and optimizer; the plan says
which device and precision it measured.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

# Hoffmann et al. 2022, Approach 3 (parametric fit), as published
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
EXP_N = BETA / (ALPHA + BETA)
EXP_D = ALPHA / (ALPHA + BETA)
G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))


def chinchilla_loss(n: float, d: float) -> float:
    return E + A / n ** ALPHA + B / d ** BETA


def compute_optimal(flops: float) -> tuple[float, float]:
    """(parameters, tokens) that minimise the fitted loss for `flops` = 6 N D."""
    return G * (flops / 6) ** EXP_N, (flops / 6) ** EXP_D / G


def flops_for_tokens(tokens: float) -> float:
    """The budget whose compute-optimal token count is `tokens` (inverse of compute_optimal's D)."""
    return 6 * (tokens * G) ** (1 / EXP_D)


@dataclass
class Shape:
    num_layers: int
    hidden_size: int
    params: int

    @property
    def num_heads(self) -> int:
        return max(1, self.hidden_size // 64)

    def overrides(self, arch: str) -> list[str]:
        return [f"model.arch={arch}", f"model.num_layers={self.num_layers}", f"model.hidden_size={self.hidden_size}",
                f"model.num_heads={self.num_heads}", f"model.intermediate_size={4 * self.hidden_size}"]


def count_params(arch: str, num_layers: int, hidden: int, vocab: int, positions: int = 512) -> int:
    """Every parameter of the lmforge model of this shape (built on the meta device: no memory)."""
    from lmforge.models.registry import build_model

    cfg = ModelConfig(arch=arch, vocab_size=vocab, hidden_size=hidden, num_layers=num_layers,
                      num_heads=max(1, hidden // 64), intermediate_size=4 * hidden, max_position_embeddings=positions)
    with torch.device("meta"):
        model = build_model(cfg)
    return sum(p.numel() for p in model.parameters())


# (layers, hidden) of the usual shapes: BERT tiny/mini/small/medium/base/large (Turc et al. 2019)
# and GPT-2/GPT-3 sizes, heads of 64 and FFN 4x hidden
LADDER = [(2, 128), (4, 256), (4, 512), (8, 512), (12, 768), (24, 1024), (24, 1536), (24, 2048), (32, 2560),
          (32, 4096), (40, 5120), (48, 6144), (64, 8192), (96, 12288)]


def closest_shape(params: float, arch: str, vocab: int) -> Shape:
    """The shape of LADDER whose parameter count is nearest to `params` on a log scale."""
    shapes = [Shape(layers, h, count_params(arch, layers, h, vocab)) for layers, h in LADDER]
    return min(shapes, key=lambda s: abs(math.log(s.params / params)))


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a clock read after it times finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Throughput:
    flops_per_s: float
    device: str  # the resolved train.device, e.g. "cuda"
    precision: str  # the resolved train.precision: "bf16", "fp16" or "fp32"


def measure_throughput(seconds: float = 2.0, device: str | None = None, precision: str | None = None) -> Throughput:
    """FLOP/s of full training steps (forward, backward, AdamW) of a small lmforge GPT, counted as
    6 x parameters x tokens, on the device and in the precision a run would train in: `device` and
    `precision` are train.device / train.precision (default: the config's defaults, auto / auto),
    resolved, autocast and optimized the way the training loop does."""
    from lmforge.config import OptimConfig, TrainConfig
    from lmforge.models.registry import build_model
    from lmforge.train.loop import autocast_for, resolve_device
    from lmforge.train.machine import resolve_precision
    from lmforge.train.optim import make_optimizer

    defaults = TrainConfig()
    where = resolve_device(defaults.device if device is None else device)
    precision = resolve_precision(where, defaults.precision if precision is None else precision)
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4,
                      intermediate_size=1024, max_position_embeddings=256, dropout=0.0)
    model = build_model(cfg).to(where)
    model.train()
    opt = make_optimizer(model, OptimConfig(lr=1e-4), where)
    scaler = torch.amp.GradScaler(where.type) if precision == "fp16" else None  # as the loop does for fp16
    amp = autocast_for(precision, where)
    n = sum(p.numel() for p in model.parameters())
    # 512 tokens a step keep a CPU busy; a GPU would spend them waiting on kernel launches
    rows = 4 if where.type == "cpu" else 64
    ids = torch.randint(0, 8192, (rows, 129), device=where)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if where.type == "cuda":  # the loop trains with TF32 tensor cores for fp32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        steps, start, counted = 0, None, 0
        while True:
            with amp:
                loss = model(ids[:, :-1], targets=ids[:, 1:]).loss_sum
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
            if steps == 2:  # the first steps warm up kernels and allocate AdamW's state
                _synchronize(where)
                start = time.perf_counter()
            elif start is not None:
                counted += 1
                if counted >= 2 and time.perf_counter() - start >= seconds:
                    _synchronize(where)
                    elapsed = time.perf_counter() - start
                    return Throughput(6 * n * ids[:, 1:].numel() * counted / elapsed, where.type, precision)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def measured_flops_per_s(seconds: float = 2.0, device: str | None = None, precision: str | None = None) -> float:
    """measure_throughput's FLOP/s alone."""
    return measure_throughput(seconds, device, precision).flops_per_s


def plan(flops: float | None = None, hours: float | None = None, tokens_per_s: float | None = None,
         arch: str = "bert", vocab: int = 30522, flops_per_s: float | None = None,
         device: str | None = None, precision: str | None = None) -> dict:
    """The plan as a dict (see the top of this file). Without --tokens-per-s or `flops_per_s`, the
    throughput is measured on `device` in `precision` (train.device / train.precision, default
    auto / auto, resolved as the training loop resolves them) and the dict says which, under
    "measured_on"."""
    if (flops is None) == (hours is None):
        raise LmforgeError("give exactly one of --flops F or --hours H")
    for name, value in (("--flops", flops), ("--hours", hours), ("--tokens-per-s", tokens_per_s)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise LmforgeError(f"{name} must be a positive number, got {value}")
    out: dict = {"fit": "Hoffmann et al. 2022, Approach 3: L = E + A/N^alpha + B/D^beta",
                 "coefficients": {"E": E, "A": A, "B": B, "alpha": ALPHA, "beta": BETA}}
    if tokens_per_s is None:
        if flops_per_s is None:
            print("lmforge: measuring this machine's training throughput (a few seconds)...", file=sys.stderr)
            measured = measure_throughput(device=device, precision=precision)
            flops_per_s = measured.flops_per_s
            out["measured_on"] = {"device": measured.device, "precision": measured.precision}
        out["measured_flops_per_s"] = flops_per_s
        if flops is None:
            flops = flops_per_s * hours * 3600
    elif flops is None:  # the planned model's own throughput: D tokens take D / tokens_per_s seconds
        flops = flops_for_tokens(tokens_per_s * hours * 3600)
    n_opt, d_opt = compute_optimal(flops)
    shape = closest_shape(n_opt, arch, vocab)
    out.update(flops=flops, params=n_opt, tokens=d_opt, tokens_per_param=d_opt / n_opt,
               expected_loss=chinchilla_loss(n_opt, d_opt),
               rule_of_thumb={"params": math.sqrt(flops / 120), "tokens": 20 * math.sqrt(flops / 120)},
               closest={"arch": arch, "num_layers": shape.num_layers, "hidden_size": shape.hidden_size,
                        "num_heads": shape.num_heads, "intermediate_size": 4 * shape.hidden_size,
                        "params": shape.params, "overrides": shape.overrides(arch),
                        # the compute-optimal tokens for this model's real size
                        "tokens": flops / (6 * shape.params)})
    seconds = (d_opt / tokens_per_s if tokens_per_s is not None else flops / out["measured_flops_per_s"])
    out["hours"] = seconds / 3600
    return out


def format_plan(p: dict) -> str:
    def si(x: float) -> str:
        for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
            if x >= scale:
                return f"{x / scale:.3g}{unit}"
        return f"{x:.3g}"

    c = p["closest"]
    lines = [f"compute budget: {p['flops']:.3g} FLOPs (C = 6 N D)"]
    if "measured_flops_per_s" in p:
        on = p.get("measured_on")
        where = f" on {on['device']} in {on['precision']}" if on else ""
        lines.append(f"this machine: {p['measured_flops_per_s'] / 1e9:.1f} GFLOP/s measured{where} on a small lmforge "
                     f"GPT training step")
    lines += [
        f"compute-optimal (Chinchilla Approach 3): {si(p['params'])} parameters, {si(p['tokens'])} tokens "
        f"({p['tokens_per_param']:.1f} tokens per parameter), fitted loss {p['expected_loss']:.2f}",
        f"rule of thumb (Approaches 1-2, ~20 tokens per parameter): {si(p['rule_of_thumb']['params'])} parameters, "
        f"{si(p['rule_of_thumb']['tokens'])} tokens",
        f"closest usual lmforge {c['arch']} shape: {c['num_layers']} layers x {c['hidden_size']} hidden, {c['num_heads']} heads, "
        f"FFN {c['intermediate_size']} = {si(c['params'])} parameters; train it on {si(c['tokens'])} tokens",
        f"  {' '.join(c['overrides'])}",
        f"expected training time here: {p['hours']:.3g} hours",
        f"fit: {p['fit']}, " + ", ".join(f"{k}={v}" for k, v in p["coefficients"].items()),
    ]
    return "\n".join(lines)
