"""The one training loop. Every task (MLM, CLM, classification) runs through `train`.

It knows about steps, gradient accumulation, the optimizer and schedule, clipping, precision,
evaluation cadence, logging, checkpoints and stopping (max_steps, a wall-clock budget, SIGINT /
SIGTERM). It knows nothing about what the model is or what the batches hold: that is the
task's business (lmforge/tasks/base.py).

Exact resume: every random draw is a function of (seed, step, ...) — masks by the task, dropout by
re-seeding torch at the start of each step — and the checkpoint holds weights, optimizer moments
and the data position. A resumed run therefore computes bit-for-bit the same losses on CPU as a
run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from lmforge.config import Config, to_dict
from lmforge.distributed import Engine, Parallel, current, make_engine
from lmforge.errors import LmforgeError
from lmforge.rng import derive_seed
from lmforge.tasks.base import Task
from lmforge.train.checkpoint import load_newest_good, save_checkpoint, write_text_atomic
from lmforge.train.log import MetricsLogger, NullLogger
from lmforge.train.machine import cpu_has_native_bf16, memory_mb, resolve_precision
from lmforge.train.optim import lr_at
from lmforge.train.schedule import BatchSchedule


def resolve_device(spec: str) -> torch.device:
    """'auto' -> cuda if present, else mps, else cpu."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise LmforgeError(f"train.device={spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(f"train.device={spec!r} but no CUDA GPU is visible; use train.device=auto or cpu")
    return device


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast for a resolved precision of 'bf16' / 'fp16' (train/machine.py decides),
    else nothing."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    wall_time_s: float
    stopped_by: str  # max_steps | max_time_s | signal
    last_eval: dict


def step_counts(batches: list, par: Parallel, device: torch.device) -> dict[str, int]:
    """The step's denominators over every micro-batch and rank: "targets" (Batch.num_targets)
    and each count the task names in Batch.counts. One all-reduce with several ranks."""
    names = sorted({k for b in batches for k in b.counts})
    local = [sum(b.num_targets for b in batches), *(sum(b.counts.get(k, 0) for b in batches) for k in names)]
    if par.world > 1:  # no tensor and no device sync for a single process
        local = [int(x) for x in par.sum_(torch.tensor(local, dtype=torch.float64, device=device)).tolist()]
    return dict(zip(["targets", *names], local))


def accumulate_gradients(task: Task, model: torch.nn.Module, batches: list, device: torch.device,
                         amp: contextlib.AbstractContextManager, scaler: Optional[torch.amp.GradScaler] = None,
                         par: Parallel = Parallel(), engine: Optional[Engine] = None
                         ) -> tuple[torch.Tensor, dict, dict[str, int]]:
    """Forward and backward every micro-batch of one optimizer step into `.grad`.

    Each micro-batch's summed loss is divided by the number of targets in the WHOLE step, so the
    gradient equals that of one batch holding all micro-batches (the mean over all targets), not
    a mean of per-micro-batch means; a loss part over another count (LossOutput.terms) is divided
    by the step's total of that count. With fp16, `scaler` multiplies the loss before backward so
    that small gradients do not underflow.

    Data parallel (`par.world` > 1): the counts are taken over every rank's micro-batches, and
    each rank's loss is multiplied by the world size, so that the engine's average of the ranks'
    gradients is the gradient of the mean over the global batch. `engine` (lmforge/distributed)
    reduces gradients once, on the last micro-batch, and runs the backward; `model` is what the
    loss is computed with (the engine's forward model, maybe compiled).
    Returns (this rank's share of the step's mean loss, its share of each metric's mean — summed
    over ranks, both are the global batch's — and the step's counts over all ranks).
    """
    counts = step_counts(batches, par, device)
    scale = {k: par.world / max(1, v) for k, v in counts.items()}
    engine = engine or Engine(model, optimizer=None)
    loss_mean = torch.zeros((), device=device)
    means: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        batch.tensors = {k: v.to(device, non_blocking=True) for k, v in batch.tensors.items()}
        with engine.micro_batch(last=i == len(batches) - 1):
            with amp:
                out = task.loss(model, batch)
            loss = out.loss_sum * scale["targets"]
            for name, part in out.terms.items():
                loss = loss + part * scale[name]
            engine.backward(scaler.scale(loss) if scaler is not None else loss)
        loss_mean += loss.detach().float() / par.world
        for k, v in out.sums.items():
            means[k] = means.get(k, 0) + v.detach().float() * (scale[out.per.get(k, "targets")] / par.world)
    return loss_mean, means, counts


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (with a checkpoint); a second
    SIGINT interrupts at once."""

    def __init__(self, quiet: bool = False):
        self.requested = False
        self.quiet = quiet  # torchrun forwards a signal to every rank; rank 0 says it
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if not self.quiet:
            tqdm.write(f"lmforge: {signal.Signals(signum).name} received, stopping after this step "
                       f"(send SIGINT again to abort without a checkpoint)")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: Config, task: Task, run_dir: Path, device: torch.device, resume: bool = False) -> TrainResult:
    """Train `task.model` per `cfg.train` / `cfg.optim`, writing into `run_dir`. With `resume`,
    continue from the run's latest checkpoint."""
    t_cfg = cfg.train
    par = current()
    # FSDP2 shards a model that is still on the CPU and moves only each rank's shards to its GPU,
    # so a model too big for one GPU still starts; every other strategy starts from the device
    sharded_start = par.world > 1 and cfg.distributed.strategy == "fsdp"
    model = task.model if sharded_start else task.model.to(device)
    model.train()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    say = tqdm.write if par.main else (lambda text: None)  # one voice: every rank would say the same
    global_batch = t_cfg.batch_size * t_cfg.grad_accum_steps * par.world
    scaler = scale_state = None  # fp16: the loop's loss scaler, made by the engine (see below)
    ckpt_root = run_dir / "checkpoints"

    step, tokens_seen, time_before = 0, 0, 0.0
    precision = resolve_precision(device, t_cfg.precision, cfg.distributed.strategy, par.world)
    if resume:
        found = load_newest_good(ckpt_root)
        if found is None:
            raise LmforgeError(f"{run_dir} has no usable checkpoint to resume from (it stopped before its first "
                               f"checkpoint was written, or every checkpoint is damaged); start the run again")
        path, weights, opt_tensors, state = found
        check_global_batch(run_dir, state.get("global_batch"), cfg, par.world)
        model.load_state_dict(weights)  # every rank, before any wrapping (DeepSpeed copies it at start)
        task.load_data_state(state["data"])
        step, tokens_seen, time_before = state["step"], state["tokens_seen"], state["wall_time_s"]
        if t_cfg.precision == "auto":  # keep the precision the run started with, so resume stays exact
            precision = state.get("precision", precision)
        scale_state = state.get("loss_scaler")  # restored by the engine that really scales the loss
        if step >= t_cfg.max_steps and (run_dir / "summary.json").is_file():
            raise LmforgeError(f"{run_dir} already finished at step {step} (train.max_steps={t_cfg.max_steps}); "
                               f"to train longer, resume with a larger train.max_steps=N")
        if step >= t_cfg.max_steps:  # killed after its last checkpoint, before summary.json was written
            say(f"lmforge: {run_dir} trained all {step} steps but stopped before its final reports; "
                f"writing them")
        else:
            say(f"lmforge: resuming {run_dir} at step {step} ({path.name})")

    precision = par.broadcast(precision)  # rank 0's choice (auto times bf16 on the CPU) holds on every rank
    task.shard = (par.rank, par.world)
    # the step's shape: sequence length, rows, micro-batches (the seq-len schedule, the batch ramp)
    schedule = task.schedule = BatchSchedule(cfg, par.world)
    if schedule.varies:
        say(f"lmforge: {schedule.describe()}")
    # the strategy (ddp, fsdp, deepspeed; plain in one process) wraps the model and makes AdamW
    engine = make_engine(model, cfg, par, device, precision)
    # fp16: torch's GradScaler, or none where the engine scales the loss itself (DeepSpeed)
    scaler = engine.make_grad_scaler(precision, device)
    if resume:  # every rank loads the same whole state; sharded engines keep their part
        engine.load_full_state(weights, opt_tensors, state["optimizer"])
        engine.load_loss_scale_state(scaler, scale_state)
        del weights, opt_tensors
    forward_model = torch.compile(engine.forward_model) if t_cfg.compile else engine.forward_model
    # With whole parameters on every rank, rank 0 evaluates alone on the plain model (a DDP
    # forward would wait for the other ranks); sharded parameters need every rank's forward
    eval_model = forward_model if par.world == 1 else engine.model
    evaluates = par.main or engine.evaluate_on_all_ranks
    logger = (MetricsLogger(run_dir, resume_step=step if resume else None,
                            keep_eval_at_resume_step=step % t_cfg.eval_every == 0 or step >= t_cfg.max_steps,
                            tensorboard=cfg.log.tensorboard, csv=cfg.log.csv,
                            wandb=to_dict(cfg) if cfg.log.wandb else None)
              if par.main else NullLogger())
    if t_cfg.precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        say("lmforge: warning: train.precision=bf16 on a CPU without native bf16 is emulated and far "
                   "slower than fp32; use train.precision=auto")
    if precision == "fp16" and device.type == "cpu":
        say("lmforge: warning: train.precision=fp16 on a CPU is emulated and slow; it is meant for "
                   "older CUDA GPUs (use train.precision=auto)")
    amp = autocast_for(precision, device)
    say(f"lmforge: training on {device.type} in {precision}"
               + {"bf16": " (bf16 autocast)", "fp16": " (fp16 autocast, loss scaling)"}.get(precision, ""))
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else math.inf

    started = time.time()
    last_log_time, last_log_tokens = started, tokens_seen
    last_eval: dict = state.get("last_eval", {}) if resume else {}
    # The final checkpoint is always written after the final evaluation (see the end of the loop)
    last_eval_step = step if resume and step >= t_cfg.max_steps else -1
    last_ckpt_step = step if resume else -1  # the resumed state is already on disk
    data_wait = step_time = 0.0  # seconds since the last log line
    nonfinite_steps = state.get("nonfinite_steps", 0) if resume else 0  # skipped updates in all
    nonfinite_in_a_row = 0
    stopped_by = "max_steps"

    def elapsed() -> float:
        return time_before + time.time() - started

    def checkpoint() -> None:
        nonlocal last_ckpt_step
        last_ckpt_step = step
        full_state = engine.full_state()  # every rank: gathering sharded state is a collective
        if not par.main:  # one writer
            return
        state = {"tokens_seen": tokens_seen, "wall_time_s": elapsed(), "data": task.data_state(),
                 "last_eval": last_eval, "task": task.name, "precision": precision,
                 "nonfinite_steps": nonfinite_steps, "global_batch": global_batch}
        if (scale := engine.loss_scale_state(scaler)) is not None:
            state["loss_scaler"] = scale
        save_checkpoint(ckpt_root, step, full_state, state, keep=t_cfg.keep_checkpoints)

    def evaluate() -> None:
        nonlocal last_eval, last_eval_step
        last_eval_step = step
        if not evaluates:
            return
        with amp:
            result = task.evaluate(eval_model, device)
        last_eval, last_eval_step = result.metrics, step
        if not par.main:
            return
        logger.log(step, "validation", tokens=tokens_seen, **result.metrics)
        samples_every = t_cfg.samples_every or t_cfg.eval_every
        if result.table_markdown and (step % samples_every == 0 or step == t_cfg.max_steps):
            with open(run_dir / "samples.md", "a") as f:
                f.write(f"\n## step {step} ({tokens_seen:,} tokens)\n\n{result.table_markdown}")
            logger.samples("validation/samples", result.table_markdown, result.table, step)
        tqdm.write("step {:>6} | val " .format(step) + " | ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))

    if resume:
        if par.main:
            trim_samples(run_dir / "samples.md", step)
    else:
        checkpoint()  # step 0: a run killed before its first periodic checkpoint can still be resumed
    bar = tqdm(total=t_cfg.max_steps, initial=step, desc=task.name, unit="step",
               disable=not (t_cfg.progress and par.main), dynamic_ncols=True)

    def out_of_time() -> bool:
        return t_cfg.max_time_s is not None and time.time() - started >= t_cfg.max_time_s

    signalled = timed_out = False  # with several ranks: any rank's flag, agreed in the last step's all-reduce
    with _StopFlag(quiet=not par.main) as stop:
        while step < t_cfg.max_steps:
            if par.world == 1:
                signalled, timed_out = stop.requested, out_of_time()
            if timed_out:
                stopped_by = "max_time_s"
                break
            if signalled:
                stopped_by = "signal"
                break
            lr = lr_at(*schedule.progress(step), cfg.optim)
            engine.set_lr(lr)
            # dropout: a function of the step (and of the rank: ranks' rows must not share masks)
            torch.manual_seed(derive_seed(t_cfg.seed, "step", step, *(("rank", par.rank) if par.rank else ())))
            step_start = time.perf_counter()
            shape = schedule.at(step)
            batches = [task.train_batch(step, micro) for micro in range(shape.micro_batches)]
            data_wait += time.perf_counter() - step_start
            loss_mean, means, _ = accumulate_gradients(task, forward_model, batches, device, amp, scaler, par,
                                                       engine)
            num_tokens = sum(b.num_tokens for b in batches)
            if par.world > 1:  # one all-reduce: the loss and metrics of the global batch, and the stop flags
                counts = torch.tensor([num_tokens, stop.requested, out_of_time()], dtype=torch.float32, device=device)
                packed = par.sum_(torch.cat([loss_mean.view(1), counts, *(v.view(1) for v in means.values())]))
                num_tokens, signalled, timed_out = (int(x) for x in packed[1:4].tolist())
                loss_mean, means = packed[0], dict(zip(means, packed[4:]))
            grad_norm, updated = engine.step(max_norm, loss_mean, scaler)
            if updated:
                nonfinite_in_a_row = 0
            else:
                nonfinite_steps += 1
                # fp16 gradient overflow with a finite loss is the loss scaler's business (it lowers
                # its factor below, or DeepSpeed's does); only a non-finite loss counts towards stopping
                overflow = precision == "fp16" and bool(torch.isfinite(loss_mean))
                nonfinite_in_a_row = 0 if overflow else nonfinite_in_a_row + 1
                scale = engine.loss_scale(scaler)
                what = ("fp16 gradients overflowed" + (f" at loss scale {scale:g}" if scale is not None else "")
                        if overflow
                        else "loss or gradient is not finite")
                say(f"lmforge: warning: step {step + 1}: {what}; update skipped")
                if nonfinite_in_a_row >= t_cfg.max_nonfinite_steps:
                    raise LmforgeError(f"step {step + 1}: loss or gradient not finite for {nonfinite_in_a_row} steps in a "
                                       f"row (train.max_nonfinite_steps={t_cfg.max_nonfinite_steps}); lower optim.lr, "
                                       f"set optim.max_grad_norm, or check the data")
            if scaler is not None:
                scaler.update()
            engine.zero_grad()
            step += 1
            tokens_seen += num_tokens
            step_time += time.perf_counter() - step_start
            bar.update(1)

            if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
                now = time.time()
                tokens_per_s = (tokens_seen - last_log_tokens) / max(now - last_log_time, 1e-9)
                last_log_time, last_log_tokens = now, tokens_seen
                loss = loss_mean.item()
                extra = {k: v.item() for k, v in means.items()}
                if "correct" in extra:
                    extra["accuracy"] = extra.pop("correct")
                # data_wait: share of step time spent making batches (the loop waits for them)
                logger.log(step, "train", loss=loss, lr=lr, grad_norm=grad_norm.item(), tokens=tokens_seen,
                           tokens_per_s=tokens_per_s, data_wait=data_wait / max(step_time, 1e-9),
                           skipped_steps=nonfinite_steps, **memory_mb(device), **extra,
                           **({"seq_len": shape.seq_len, "step_tokens": num_tokens} if schedule.varies else {}),
                           **({"loss_scale": scale} if (scale := engine.loss_scale(scaler)) is not None else {}))
                data_wait = step_time = 0.0
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            # at max_steps: evaluate, then checkpoint, so that the last checkpoint holds the last evaluation
            if step % t_cfg.eval_every == 0 or step == t_cfg.max_steps:
                evaluate()
            if step % t_cfg.checkpoint_every == 0 or step == t_cfg.max_steps:
                checkpoint()
    bar.close()
    if last_eval_step != step:
        evaluate()
    if last_ckpt_step != step:
        checkpoint()
    logger.close()
    return TrainResult(steps=step, tokens_seen=tokens_seen, wall_time_s=elapsed(), stopped_by=stopped_by,
                       last_eval=last_eval)


def check_global_batch(run_dir: Path, trained: Optional[int], cfg: Config, world: int) -> None:
    """A run resumes under another world size or strategy only with the global batch (sequences
    per optimizer step) it trained with: then the data, masks and schedule continue as if
    uninterrupted (the sampler's position and every random draw are global, not per process)."""
    t = cfg.train
    here = t.batch_size * t.grad_accum_steps * world
    if isinstance(trained, int) and trained != here:
        raise LmforgeError(f"{run_dir} trained with {trained} sequences per step; here train.batch_size="
                           f"{t.batch_size} x train.grad_accum_steps={t.grad_accum_steps} x {world} process(es) = "
                           f"{here}. Keep the global batch when resuming, e.g. with half the processes double "
                           f"train.batch_size or train.grad_accum_steps")


def trim_samples(path: Path, step: int) -> None:
    """Drop the sections of samples.md written after `step` by an interrupted process, so that a
    resumed run's file reads like an uninterrupted one (metrics.jsonl is trimmed the same way)."""
    if not path.is_file():
        return
    text = path.read_text()
    cut = next((m.start() for m in re.finditer(r"^## step (\d+) ", text, flags=re.M) if int(m.group(1)) > step), None)
    if cut is not None:
        write_text_atomic(path, text[:cut - 1])  # each section starts with the "\n" before its "## step"


def write_summary(run_dir: Path, task: Task, result: TrainResult, extra: Optional[dict] = None) -> dict:
    summary = {**task.summary(result.last_eval), **(extra or {}), "steps": result.steps,
               "tokens_seen": result.tokens_seen, "wall_time_s": round(result.wall_time_s, 2),
               "stopped_by": result.stopped_by}
    # Written last, and atomically: a run with summary.json and max_steps reached is finished
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
