"""`lmforge plan --config FILE [--gpu NAME] [--world N]`: what a config's run costs before it
starts — its parameters, FLOPs, memory per rank under each strategy, and time.

- parameters: the config's model built on the meta device (no memory), counted without the rows
  a family pads its vocabulary with (so bert-base is BertForMaskedLM's 109.5M, GPT-2 small
  GPT2LMHeadModel's 124.4M);
- FLOPs per token of a training step: counted by torch's FlopCounterMode over one forward and
  backward of the config's model on this CPU (one row of each sequence length the run uses):
  what lmforge really runs, e.g. the vocabulary projection on the masked positions only. For
  ELECTRA and MLM distillation, the formula 6 x the matmul weights a token goes through + 12 x
  layers x sequence x hidden (the PaLM / nanoGPT convention; tests/test_runplan.py compares the
  two). Classification configs are not planned;
- memory per rank: fp32 weights (4 bytes a parameter), gradients (4), the optimizer's state
  (AdamW 8; Muon 4 for the hidden matrices, AdamW's 8 for the rest), optim.ema_decay's average
  (4), as each strategy shards them (ddp: all of it, plus DDP's gradient buckets; fsdp: a 1/N
  share, plus the largest block gathered whole for its forward and backward; deepspeed ZeRO
  stage 1/2/3: the optimizer, then the gradients, then the weights sharded; Muon and the average
  are refused by fsdp and deepspeed, lmforge/distributed), plus the step's working memory.
  That is MEASURED, not modelled (step_memory): one training step of the config's model on this
  machine's CPU, in the run's precision (bf16 autocast where the GPU would use it), with the C
  heap's bytes in use read after every op: the most of the forward (what autograd keeps, the
  ops' transient outputs, the fused loss's logits chunk), of the backward beside the gradients
  made so far, and of the optimizer's temporaries. It is measured at the micro-batch itself, or
  at two smaller ones and extrapolated in the rows (_probe_rows), with and without activation
  checkpointing. The step's peak is the largest of: the forward (plus the gradients when
  micro-batches accumulate), the backward plus the gradients, the optimizer plus the gradients.
- time: the run's FLOPs at --mfu (default 40%) of the GPU's dense bf16 peak, or at the FLOP/s a
  training step measures on this machine when no --gpu is given.

benchmarks/bench_plan_memory.py checks the model against three whole training steps at the full
micro-batch: on 2026-12-02 the plan came to 0.93, 1.03 and 1.05 of the measured peak for
bert-tiny, gpt-tiny and llama-tiny. On a GPU the math libraries' caches and the allocator's
rounding differ from this CPU's: leave a GPU 10% spare (the "fits" verdict does).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import math
import sys
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.config import Config
from lmforge.data.prepared import fill_vocab_size
from lmforge.data.tokenizers import load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.ops.linear_cross_entropy import DEFAULT_CHUNK_ROWS
from lmforge.tasks import registry
from lmforge.train.layerstats import block_names
from lmforge.train.loop import autocast_for
from lmforge.train.machine import resolve_precision
from lmforge.train.optim import make_optimizer
from lmforge.train.recompute import checkpoint_blocks

# dense bf16 (fp16 for V100 and T4) tensor-core peak FLOP/s and memory in GiB, from the vendors' sheets
GPUS = {"A100": (312e12, 80), "A100-40GB": (312e12, 40), "H100": (989e12, 80), "H200": (989e12, 141),
        "L40S": (362e12, 48), "L4": (121e12, 24), "A10G": (125e12, 24), "RTX4090": (165e12, 24),
        "V100": (125e12, 32), "T4": (65e12, 16)}
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
PLANNED_TASKS = ("mlm", "clm", "electra", "distill-mlm")  # the objectives a plan builds a model for
GiB = 2 ** 30


def _model_and_config(cfg: Config) -> tuple[Config, torch.nn.Module]:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model))
    if cfg.model.vocab_size is None:
        fill_vocab_size(cfg, load_tokenizer(cfg.data.tokenizer, cfg.data.cache_dir))
    objective = registry.objective(cfg.task.name)
    if cfg.task.name not in PLANNED_TASKS:
        raise LmforgeError(f"lmforge plan --config plans pretraining runs (task.name={', '.join(PLANNED_TASKS)}), not "
                           f"task.name={cfg.task.name}")
    with torch.device("meta"):
        model = objective.build_model(cfg)
    return cfg, model


def parameter_counts(cfg: Config, model: torch.nn.Module) -> dict[str, int]:
    """all (as built), unpadded (without the vocabulary's padding rows), and hidden_matrices (the
    blocks' 2-D weights: what Muon updates)."""
    vocab = cfg.model.vocab_size
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    # the vocabulary's tensors (embedding, decoder, its bias), padded to a multiple of 64 rows; a
    # position table of a similar length is not one of them
    padding = sum((p.shape[0] - vocab) * math.prod(p.shape[1:]) for name, p in model.named_parameters()
                  if p.dim() >= 1 and vocab < p.shape[0] <= vocab + 256 and p.shape[0] % 64 == 0
                  and "position" not in name)
    blocks = [b for _, b in block_names(model)]
    hidden = sum(p.numel() for b in blocks for p in b.parameters() if p.dim() == 2)
    return {"all": total, "unpadded": total - padding, "hidden_matrices": hidden}


def step_shapes(cfg: Config) -> list[tuple[int, int]]:
    """(rows per micro-batch, sequence length) of the run's steps: one, or two with data.long_seq_len."""
    t, d = cfg.train, cfg.data
    shapes = [(t.batch_size, d.seq_len)]
    if d.long_seq_len is not None:  # tokens per micro-batch kept (lmforge/train/schedule.py)
        shapes.append((max(1, t.batch_size * d.seq_len // d.long_seq_len), d.long_seq_len))
    return shapes


def flops_per_token(cfg: Config, model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per input token: 6 x matmul weights per token + 12 x L x s x h of attention."""
    m = cfg.model
    blocks = [name for name, _ in block_names(model)]
    linear = {n: mod.in_features * mod.out_features for n, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear)}
    in_blocks = sum(v for n, v in linear.items() if any(n.startswith(b + ".") for b in blocks))
    head = sum(v for n, v in linear.items() if not any(n.startswith(b + ".") for b in blocks))
    vocab_rows = max((p.shape[0] for p in model.parameters() if p.dim() == 2 and p.shape[0] >= m.vocab_size),
                     default=m.vocab_size)
    head += vocab_rows * m.hidden_size  # the vocabulary projection (tied or not: F.linear on a parameter)
    predicted = cfg.mlm.mask_prob if cfg.task.name in ("mlm", "electra", "distill-mlm") else 1.0
    if cfg.task.name in ("classify", "distill"):
        predicted = 0.0  # a classifier's heads run once per example
    return 6 * (in_blocks + predicted * head) + 12 * len(blocks) * seq_len * m.hidden_size


def _forward(model: torch.nn.Module, cfg: Config, rows: int, seq_len: int):
    """One training forward of the objective's model on random tokens: its output (with loss_sum)."""
    ids = torch.randint(min(1000, cfg.model.vocab_size - 1), cfg.model.vocab_size, (rows, seq_len),
                        generator=torch.Generator().manual_seed(0))
    if cfg.task.name == "mlm":
        selected = torch.rand(rows, seq_len, generator=torch.Generator().manual_seed(1)) < cfg.mlm.mask_prob
        return model(ids, selected=selected, targets=ids[selected])
    return model(ids, targets=ids)


def counted_flops_per_token(cfg: Config, seq_len: int) -> float:
    """The FLOPs of one training step's forward and backward per input token, counted by torch's
    FlopCounterMode on the config's model on the CPU (one row of `seq_len`): what lmforge's code
    really runs (the vocabulary projection on the masked positions only, for instance)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = registry.objective(cfg.task.name).build_model(cfg).train()
    # torch's table has no entry for the in-place addmm_ the fused loss accumulates its weight
    # gradient with (as benchmarks/common.py count_flops)
    inplace = {torch.ops.aten.addmm_: lambda s, a, b, *args, out_shape=None, **kw: 2 * a[0] * a[1] * b[1]}
    with FlopCounterMode(display=False, custom_mapping=inplace) as counter:
        _forward(model, cfg, 1, seq_len).loss_sum.backward()
    return counter.get_total_flops() / seq_len


MEASURED_TASKS = ("mlm", "clm")  # the objectives whose activations `plan` measures


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def malloc_in_use() -> Optional[Callable[[], int]]:
    """A function giving the bytes the C heap has in use (glibc's mallinfo2: every arena's chunks in
    use plus the mmapped ones), or None without glibc. Torch's CPU tensors and the math libraries'
    workspaces are allocated there; freed memory the heap keeps for reuse is not counted: the CPU's
    counterpart of torch.cuda.max_memory_allocated, where resident memory (RSS) also counts the
    heap's fragmentation and the libraries' code."""
    try:
        info = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    info.restype = _MallInfo2

    def in_use() -> int:
        m = info()
        return m.uordblks + m.hblkhd
    return in_use


class _PeakPerPhase(TorchDispatchMode):
    """After every aten op (forward, backward and optimizer alike), the bytes in use above `floor`
    less the gradients made so far; the most of it in each phase."""

    def __init__(self, in_use: Callable[[], int], floor: int, grads: list[int]):
        super().__init__()
        self.in_use, self.floor, self.grads, self.phase, self.peak = in_use, floor, grads, "forward", {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        used = self.in_use() - self.floor - self.grads[0]
        self.peak[self.phase] = max(self.peak.get(self.phase, 0), used)
        return out


def step_memory(cfg: Config, rows: int, seq_len: int, precision: str, checkpointing: bool) -> Optional[dict[str, int]]:
    """Measured on this CPU: one training step of the config's model at `rows` x `seq_len` in
    `precision`, from the freshly built model and optimizer. Bytes above what was in use before
    the forward (the weights), less the parameters' gradients made so far:
      forward   the most during the forward (what autograd keeps, plus each op's transient
                outputs, e.g. the loss's chunk of logits; plus caches the math libraries keep
                from then on, e.g. oneDNN's bf16 copies of the weights);
      backward  the most during the backward (the activations not yet freed, the gradients of
                the activations in flight);
      optimizer the most during the optimizer step, less its state (its temporaries).
    None where malloc_in_use is not available."""
    in_use = malloc_in_use()
    if in_use is None:
        return None
    objective = registry.objective(cfg.task.name)
    torch.manual_seed(0)
    model = objective.build_model(cfg).train()
    if checkpointing:
        checkpoint_blocks(model)
    optimizer = make_optimizer(model, cfg.optim, torch.device("cpu"))
    grads = [0]

    def count(p: torch.Tensor) -> None:
        grads[0] += p.grad.untyped_storage().nbytes() if p not in counted else 0
        counted.add(p)
    counted: set = set()
    handles = [p.register_post_accumulate_grad_hook(count) for p in model.parameters() if p.requires_grad]
    gc.collect()
    mode = _PeakPerPhase(in_use, in_use(), grads)
    with mode:
        with autocast_for(precision, torch.device("cpu")):
            out = _forward(model, cfg, rows, seq_len)
        mode.phase = "backward"
        out.loss_sum.backward()
        del out
        mode.phase = "optimizer"
        optimizer.step()
    for h in handles:
        h.remove()
    state = sum(t.untyped_storage().nbytes() for st in optimizer.state.values() for t in st.values()
                if torch.is_tensor(t))
    return {"forward": mode.peak["forward"], "backward": mode.peak["backward"],
            "optimizer": max(0, mode.peak["optimizer"] - state)}


def _probe_rows(cfg: Config, rows: int, seq_len: int) -> tuple[int, ...]:
    """The micro-batch sizes step_memory measures to know `rows`: `rows` itself when small, else
    two sizes r and 2r past the point where the fused loss's logits buffer stops growing (it holds
    DEFAULT_CHUNK_ROWS predicted positions at most), between which memory grows with the rows."""
    predicted = seq_len * (cfg.mlm.mask_prob if cfg.task.name == "mlm" else 1.0)
    r = max(1, math.ceil(DEFAULT_CHUNK_ROWS / predicted))
    return (rows,) if rows <= 2 * r else (r, 2 * r)


def activation_bytes(cfg: Config, precision: str) -> Optional[dict[str, dict[str, float]]]:
    """step_memory's phases at the run's micro-batch, without and with activation checkpointing,
    for the step shape that needs the most: measured at the micro-batch itself when it is small,
    else at two smaller ones (_probe_rows) and extrapolated linearly in the rows. None for an
    objective it does not measure (MEASURED_TASKS), or without glibc."""
    if cfg.task.name not in MEASURED_TASKS or malloc_in_use() is None:
        return None
    best: dict[str, dict[str, float]] = {}
    steps = [(variant, checkpointing, rows, seq, _probe_rows(cfg, rows, seq))
             for variant, checkpointing in (("plain", False), ("checkpointed", True)) for rows, seq in step_shapes(cfg)]
    probes_total = sum(len(probes) for *_, probes in steps)
    if probes_total * max(r * seq for *_, seq, probes in steps for r in probes) > 8192:  # more than a few seconds
        print(f"lmforge: measuring a step's memory on this CPU ({probes_total} training steps of up to "
              f"{max(r for *_, probes in steps for r in probes)} rows; minutes for a real-size model)...",
              file=sys.stderr)
    for variant, checkpointing, rows, seq, probes in steps:
        measured = [step_memory(cfg, r, seq, precision, checkpointing) for r in probes]
        if len(probes) == 1:
            at = measured[0]
        else:
            (r1, r2), (m1, m2) = probes, measured
            at = {k: m2[k] + max(0, m2[k] - m1[k]) * (rows - r2) / (r2 - r1) for k in m1}
        if variant not in best or max(at.values()) > max(best[variant].values()):
            best[variant] = at
    return best


def memory_per_rank(counts: dict[str, int], cfg: Config, world: int, activations: Optional[dict],
                    largest_block: int) -> dict[str, dict[str, float]]:
    """Bytes per rank under each strategy: weights, gradients, optimizer, average, what the
    strategy gathers or buckets, and the step's working memory beyond those ("activations": the
    most of the forward, of the backward beside the gradients, and of the optimizer's temporaries,
    step_memory). Gradients are there during the forward only when micro-batches accumulate."""
    p = counts["all"]
    optimizer = 8 * p if cfg.optim.name != "muon" else 4 * counts["hidden_matrices"] + 8 * (p - counts["hidden_matrices"])
    average = 4 * p if cfg.optim.ema_decay is not None else 0
    phases = activations["checkpointed" if cfg.train.activation_checkpointing else "plain"] if activations else None
    accumulating = cfg.train.grad_accum_steps > 1
    out = {}
    for s in STRATEGIES:
        weights, grads, opt, extra = 4 * p, 4 * p, optimizer, 0.0
        if s == "ddp" and world > 1:
            extra = 4 * p  # DDP's flat gradient buckets
        elif s == "fsdp":
            weights, grads, opt = weights / world, grads / world, opt / world
            extra = 2 * 4 * largest_block  # one block's weights gathered whole, and its gradients before the reduce-scatter
        elif s.startswith("zero"):
            stage = int(s[-1])
            opt = opt / world
            grads = grads / world if stage >= 2 else grads
            weights = weights / world if stage >= 3 else weights
            extra = 2 * 4 * largest_block if stage >= 3 else 0.0
        shared_average = average / world if s in ("fsdp", "zero3") else average
        if phases:  # the step's peak: the forward (gradients only when accumulating), backward or optimizer
            step = max(phases["forward"] + (grads if accumulating else 0.0),
                       phases["backward"] + grads, phases["optimizer"] + grads)
        else:
            step = grads
        out[s] = {"weights": weights, "gradients": grads, "optimizer": opt, "average": shared_average,
                  "gathered_or_buckets": extra, "activations": step - grads,
                  "total": weights + opt + shared_average + extra + step}
    return out


def plan_config(cfg: Config, config_name: str = "", gpu: Optional[str] = None, world: int = 1, mfu: float = 0.4,
                flops_per_s: Optional[float] = None) -> dict:
    """The plan of `cfg` as a dict (the module docstring says what each part is). Without `gpu`,
    `flops_per_s` is this machine's measured training FLOP/s (lmforge/plan.py measures it)."""
    if gpu is None and flops_per_s is None:
        raise ValueError("plan_config needs a GPU's name or this machine's measured flops_per_s")
    if gpu is not None and gpu not in GPUS:
        raise LmforgeError(f"--gpu {gpu}: use one of {', '.join(GPUS)}")
    if world < 1:
        raise LmforgeError(f"--world {world} must be at least 1")
    if not 0 < mfu <= 1:
        raise LmforgeError(f"--mfu {mfu} must be in (0, 1]")
    cfg, meta_model = _model_and_config(cfg)
    counts = parameter_counts(cfg, meta_model)
    t = cfg.train
    shapes = step_shapes(cfg)
    tokens_per_micro = shapes[0][0] * shapes[0][1]
    # train.tokens_per_step sets each process's accumulation (config.py): a step is world x that
    accumulation = t.grad_accum_steps
    step_tokens = tokens_per_micro * accumulation * world
    long_frac = (1 - cfg.data.short_seq_frac) if len(shapes) == 2 else 0.0
    if cfg.task.name in MEASURED_TASKS:  # counted on the real model; else the formula
        flops_at = {seq: counted_flops_per_token(cfg, seq) for _, seq in shapes}
    else:
        flops_at = {seq: flops_per_token(cfg, meta_model, seq) for _, seq in shapes}
    per_token = (1 - long_frac) * flops_at[shapes[0][1]] + long_frac * flops_at[shapes[-1][1]]
    run_tokens = step_tokens * t.max_steps
    run_flops = per_token * run_tokens
    # the precision of the activations: a GPU's autocast dtype, or what train.precision resolves to here
    if t.precision != "auto":
        precision = t.precision
    elif gpu is not None:
        precision = "fp16" if gpu in ("V100", "T4") else "bf16"
    else:
        precision = resolve_precision(torch.device("cpu"), t.precision, cfg.distributed.strategy, world)
    activations = activation_bytes(cfg, precision)
    largest_block = max((sum(p.numel() for p in b.parameters()) for _, b in block_names(meta_model)), default=0)
    memory = memory_per_rank(counts, cfg, world, activations, largest_block)
    if gpu is not None:
        peak, gib = GPUS[gpu]
        rate, where = peak * mfu * world, f"{world} x {gpu} at {mfu:.0%} MFU of {peak / 1e12:.0f} TFLOP/s"
    else:
        rate = flops_per_s * world
        gib, where = None, f"this machine, {rate / world / 1e9:.1f} GFLOP/s measured on a small training step"
    seconds_per_step = per_token * step_tokens / rate
    return {"config": config_name, "arch": cfg.model.arch, "task": cfg.task.name, "parameters": counts["unpadded"],
            "parameters_with_padding": counts["all"], "flops_per_token": per_token, "step_tokens": step_tokens,
            "micro_batches_per_rank": accumulation, "steps": t.max_steps, "tokens": run_tokens, "flops": run_flops,
            "world": world, "gpu": gpu, "gpu_memory_gib": gib, "precision": precision, "throughput": where,
            "seconds_per_step": seconds_per_step, "hours": seconds_per_step * t.max_steps / 3600,
            "activations": activations, "activation_checkpointing": t.activation_checkpointing,
            "memory_per_rank": memory}


def format_config_plan(p: dict) -> str:
    def gib(x: float) -> str:
        return f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 2**20:.0f} MiB"

    def phases(a: dict) -> str:
        return " / ".join(gib(a[k]) for k in ("forward", "backward", "optimizer"))
    lines = [f"{p['config'] or 'config'}: {p['arch']} ({p['task']}), {p['parameters'] / 1e6:.1f}M parameters"
             + (f" ({p['parameters_with_padding'] / 1e6:.2f}M with the vocabulary's padding)"
                if p["parameters_with_padding"] != p["parameters"] else ""),
             f"{p['flops_per_token'] / 1e6:,.0f} MFLOP a token; {p['step_tokens']:,} tokens a step "
             f"({p['micro_batches_per_rank']} micro-batch(es) per rank x {p['world']} rank(s)), {p['steps']:,} steps = "
             f"{p['tokens'] / 1e9:.3g}B tokens, {p['flops']:.3g} FLOPs",
             f"time on {p['throughput']}: {p['seconds_per_step']:.3g} s a step, {p['hours']:,.1f} h in all",
             (f"a micro-batch's working memory ({p['precision']}, measured on this CPU: forward / backward / "
              f"optimizer): {phases(p['activations']['plain'])}; {phases(p['activations']['checkpointed'])} with "
              f"train.activation_checkpointing" if p["activations"]
              else f"activations: not measured for task.name={p['task']} (only {', '.join(MEASURED_TASKS)}, "
                   f"where glibc's malloc counts are available); left out of the totals"),
             f"memory per rank (activation checkpointing {'on' if p['activation_checkpointing'] else 'off'}):"]
    for s, m in p["memory_per_rank"].items():
        fits = ""
        if p["gpu_memory_gib"] is not None:
            fits = "  fits" if m["total"] < 0.9 * p["gpu_memory_gib"] * GiB else "  does not fit"
        lines.append(f"  {s:<6} {gib(m['total']):>10}  (weights {gib(m['weights'])}, gradients {gib(m['gradients'])}, "
                     f"optimizer {gib(m['optimizer'])}, activations {gib(m['activations'])}"
                     + (f", gathered/buckets {gib(m['gathered_or_buckets'])}" if m["gathered_or_buckets"] else "")
                     + (f", average {gib(m['average'])}" if m["average"] else "") + ")" + fits)
    return "\n".join(lines)
