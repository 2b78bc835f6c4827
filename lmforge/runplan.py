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
  are refused by fsdp and deepspeed, lmforge/distributed), plus the
  activations a micro-batch keeps for its backward. Those are MEASURED, not modelled: one
  training forward of the config's model on this machine's CPU at one row of the longest step,
  in the run's precision (bf16 autocast where the GPU would use it), counting the bytes of every
  tensor autograd saves (each storage once), scaled to train.batch_size rows; with activation
  checkpointing, the blocks' inputs plus one block's activations, recomputed in its backward.
- time: the run's FLOPs at --mfu (default 40%) of the GPU's dense bf16 peak, or at the FLOP/s a
  training step measures on this machine when no --gpu is given.

The memory model does NOT hold yet: benchmarks/bench_plan_memory.py measures what a training
run adds on this CPU, and on 2026-12-02 the plan came to 0.36-0.43 of it for bert-tiny, gpt-tiny
and llama-tiny (tiny models, where the allocator's and the math libraries' fixed costs weigh
most) and 0.65 for a 12-layer, H256, sequence-512 BERT. Not counted yet: the backward's
transient gradients of the activations, the fused loss's chunk buffers, the optimizer's
temporaries, allocator caching and library workspaces. Read its memory as a lower bound.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from lmforge.config import Config
from lmforge.data.prepared import fill_vocab_size
from lmforge.data.tokenizers import load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.tasks import registry
from lmforge.train.layerstats import block_names
from lmforge.train.loop import autocast_for
from lmforge.train.machine import resolve_precision
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


def saved_bytes(model: torch.nn.Module, cfg: Config, rows: int, seq_len: int, precision: str) -> int:
    """Bytes of the tensors autograd keeps for the backward of one training forward (each storage
    once), measured on the CPU at `rows` x `seq_len`. The parameters themselves are left out (the
    weights are counted apart); their bf16 copies under autocast are in."""
    seen: set[int] = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    amp = autocast_for(precision, torch.device("cpu"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        out = _forward(model, cfg, rows, seq_len)
    del out
    return total


MEASURED_TASKS = ("mlm", "clm")  # the objectives whose activations `plan` measures


def activation_bytes(cfg: Config, precision: str) -> Optional[dict[str, float]]:
    """Activation memory of one micro-batch, without and with activation checkpointing, at the
    step shape that keeps the most (measured at one row, scaled to the rows); None for an
    objective it does not measure (MEASURED_TASKS)."""
    if cfg.task.name not in MEASURED_TASKS:
        return None
    objective = registry.objective(cfg.task.name)
    torch.manual_seed(0)
    plain = objective.build_model(cfg).train()
    layers = len(block_names(plain))
    best = {"plain": 0.0, "checkpointed": 0.0}
    for rows, seq in step_shapes(cfg):
        a = saved_bytes(plain, cfg, 1, seq, precision)
        ckpt = objective.build_model(cfg).train()
        checkpoint_blocks(ckpt)
        b = saved_bytes(ckpt, cfg, 1, seq, precision)
        # checkpointed: what stays (block inputs, head) + one block's activations while it is recomputed
        best["plain"] = max(best["plain"], rows * a)
        best["checkpointed"] = max(best["checkpointed"], rows * (b + (a - b) / max(layers, 1)))
    return best


def memory_per_rank(counts: dict[str, int], cfg: Config, world: int, activations: dict[str, float],
                    largest_block: int) -> dict[str, dict[str, float]]:
    """Bytes per rank under each strategy: weights, gradients, optimizer, average, activations."""
    p = counts["all"]
    optimizer = 8 * p if cfg.optim.name != "muon" else 4 * counts["hidden_matrices"] + 8 * (p - counts["hidden_matrices"])
    average = 4 * p if cfg.optim.ema_decay is not None else 0
    act = activations["checkpointed" if cfg.train.activation_checkpointing else "plain"] if activations else 0.0
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
        out[s] = {"weights": weights, "gradients": grads, "optimizer": opt, "average": shared_average,
                  "gathered_or_buckets": extra, "activations": act,
                  "total": weights + grads + opt + shared_average + extra + act}
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
    lines = [f"{p['config'] or 'config'}: {p['arch']} ({p['task']}), {p['parameters'] / 1e6:.1f}M parameters"
             + (f" ({p['parameters_with_padding'] / 1e6:.2f}M with the vocabulary's padding)"
                if p["parameters_with_padding"] != p["parameters"] else ""),
             f"{p['flops_per_token'] / 1e6:,.0f} MFLOP a token; {p['step_tokens']:,} tokens a step "
             f"({p['micro_batches_per_rank']} micro-batch(es) per rank x {p['world']} rank(s)), {p['steps']:,} steps = "
             f"{p['tokens'] / 1e9:.3g}B tokens, {p['flops']:.3g} FLOPs",
             f"time on {p['throughput']}: {p['seconds_per_step']:.3g} s a step, {p['hours']:,.1f} h in all",
             (f"activations of a micro-batch ({p['precision']}): {gib(p['activations']['plain'])}, "
              f"{gib(p['activations']['checkpointed'])} with train.activation_checkpointing" if p["activations"]
              else f"activations: not measured for task.name={p['task']} (only {', '.join(MEASURED_TASKS)}); "
                   f"left out of the totals"),
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
