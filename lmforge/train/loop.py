"""The one training loop. Every task (MLM, CLM, classification) runs through `train`.

It knows about steps, gradient accumulation, the optimizer and schedule, clipping, precision,
evaluation cadence, logging, checkpoints and stopping (max_steps, a wall-clock budget, SIGINT /
SIGTERM). It knows nothing about what the model is or what the batches hold: that is the
task's business (lmforge/train/interface.py says what the loop calls).

`train` makes a `Trainer` and runs it. The Trainer's constructor sets up the run (restoring a
checkpoint when resuming, then the engine and logger); `Trainer.train` reads as the loop itself:
the step-0 checkpoint, then per step `should_stop`, `train_step`, `maybe_log`, `maybe_evaluate`,
`maybe_checkpoint`, then the final evaluation and checkpoint. What changes from step to step lives
in one `RunState`.

Exact resume: every random draw is a function of (seed, step, ...) — masks by the task, dropout by
re-seeding torch at the start of each step — and the checkpoint holds weights, optimizer moments,
the data position and, with optim.ema_decay, the weight average (train/ema.py) the run
evaluates. A resumed run therefore computes bit-for-bit the same losses on CPU as a
run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from lmforge.config import Config, to_dict
from lmforge.distributed import Engine, Parallel, current, make_engine
from lmforge.errors import LmforgeError
from lmforge.files import write_text_atomic
from lmforge.rng import derive_seed
from lmforge.train.interface import TrainableTask as Task
from lmforge.runs.checkpoint import load_average, load_newest_good, save_checkpoint
from lmforge.runs.readers import summary_covers
from lmforge.train.ema import WeightAverage
from lmforge.train.layerstats import LayerStats, first_nonfinite
from lmforge.train.recompute import checkpoint_blocks
from lmforge.train.log import MetricsLogger, NullLogger
from lmforge.train.machine import cpu_has_native_bf16, memory_mb, resolve_precision
from lmforge.train.optim import lr_at, make_optimizer
from lmforge.train.overfit import OverfitBatches, OverfitWatch, decode_last
from lmforge.train.schedule import StepShape


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
    stopped_by: str  # max_steps | max_time_s | signal | non-finite loss (overfit test)
    last_eval: dict
    overfit: Optional[dict] = None  # train.overfit_batches: the verdict's summary entries (train/overfit.py)


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


@dataclass
class RunState:
    """What the loop advances step by step; on resume the checkpoint's counters come back into it."""
    step: int = 0
    tokens_seen: int = 0
    time_before: float = 0.0  # wall-clock seconds of the processes before a resume
    last_eval: dict = field(default_factory=dict)
    # The final evaluation and checkpoint are skipped only where the last step already had them
    last_eval_step: int = -1
    last_ckpt_step: int = -1
    nonfinite_steps: int = 0  # skipped updates in all (state.json keeps it)
    nonfinite_in_a_row: int = 0
    data_wait: float = 0.0  # seconds since the last log line spent making batches
    step_time: float = 0.0  # seconds since the last log line spent in steps
    last_log_time: float = 0.0
    last_log_tokens: int = 0
    signalled: bool = False  # with several ranks: any rank's flag, agreed in the last step's all-reduce
    timed_out: bool = False
    stopped_by: str = "max_steps"  # max_steps | max_time_s | signal | non-finite loss


@dataclass
class StepOutput:
    """What one optimizer step hands to its log line."""
    lr: float
    shape: StepShape
    num_tokens: int  # over every rank
    loss_mean: torch.Tensor  # () float32: the global batch's mean loss
    means: dict[str, torch.Tensor]  # each metric's global mean, () float32
    grad_norm: torch.Tensor  # () float32


class Trainer:
    """One run of the loop: the setup (model, engine, logger), the RunState, and the units of a step.
    `Trainer(...).train()` is what `train` does."""

    def __init__(self, cfg: Config, task: Task, run_dir: Path, device: torch.device, resume: bool = False):
        """Set up everything a step needs; with `resume`, restore the run's latest checkpoint into it."""
        self.cfg, self.task, self.run_dir, self.device, self.resume = cfg, task, run_dir, device, resume
        self.t_cfg = t_cfg = cfg.train
        self.par = par = current()
        self.state = RunState()
        # FSDP2 shards a model that is still on the CPU and moves only each rank's shards to its GPU,
        # so a model too big for one GPU still starts; every other strategy starts from the device
        sharded_start = par.world > 1 and cfg.distributed.strategy == "fsdp"
        self.model = task.model if sharded_start else task.model.to(device)
        self.model.train()
        if t_cfg.activation_checkpointing:  # before any wrapping: DDP, FSDP2 and compile see the checkpointed blocks
            blocks = checkpoint_blocks(self.model)
            if blocks == 0:
                raise LmforgeError("train.activation_checkpointing=true found no transformer blocks in this model "
                                   "(no nn.ModuleList of layers); set it to false")
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls
            torch.backends.cudnn.allow_tf32 = True
        self.say = tqdm.write if par.main else (lambda text: None)  # one voice: every rank would say the same
        self.global_batch = t_cfg.batch_size * t_cfg.grad_accum_steps * par.world
        self.ckpt_root = run_dir / "checkpoints"

        self.precision = resolve_precision(device, t_cfg.precision, cfg.distributed.strategy, par.world)
        restored = self.read_checkpoint() if resume else None
        # train.overfit_batches: the same N batches over and over, drawn from the run's start
        # position (a resume has just restored it: an overfit run's checkpoints keep that one)
        self.overfit = self.overfit_watch = None
        if t_cfg.overfit_batches:
            self.overfit = OverfitBatches(t_cfg.overfit_batches, task.data_state())
            self.overfit_watch = OverfitWatch.for_model(self.model, t_cfg.overfit_batches, t_cfg.overfit_threshold)
            if restored is not None and restored[2].get("overfit"):
                self.overfit_watch.load_state_dict(restored[2]["overfit"])
            self.say(f"lmforge: overfit test: training on the same {t_cfg.overfit_batches} batch(es) for "
                     f"{t_cfg.max_steps} steps; the loss should fall under {t_cfg.overfit_threshold:.0%} of its first value")
        self.last_batches: list = []
        self.layer_stats = self.make_layer_stats()
        self.layer_record: dict = {}  # the logging step's block statistics, logged with its train record
        self.precision = par.broadcast(self.precision)  # rank 0's choice (auto times bf16 on the CPU) holds everywhere
        if tuple(task.shard) != (par.rank, par.world):
            raise ValueError(f"the task was built for rank/world {task.shard}, but this process is {par.rank} of "
                             f"{par.world}: build it after joining the process group (distributed.setup)")
        # the step's shape: sequence length, rows, micro-batches (the seq-len schedule, the batch ramp)
        self.schedule = task.schedule
        if self.schedule.varies:
            self.say(f"lmforge: {self.schedule.describe()}")
        self.engine, self.scaler = self.build_engine(restored)
        self.average = self.make_average(restored)
        del restored
        engine = self.engine
        self.forward_model = torch.compile(engine.forward_model) if t_cfg.compile else engine.forward_model
        # With whole parameters on every rank, rank 0 evaluates alone on the plain model (a DDP
        # forward would wait for the other ranks); sharded parameters need every rank's forward
        self.eval_model = self.forward_model if par.world == 1 else engine.model
        self.evaluates = par.main or engine.evaluate_on_all_ranks
        self.logger = self.make_logger()
        self.warn_if_emulated()
        self.amp = autocast_for(self.precision, device)
        self.say(f"lmforge: training on {device.type} in {self.precision}"
                 + {"bf16": " (bf16 autocast)", "fp16": " (fp16 autocast, loss scaling)"}.get(self.precision, ""))
        self.max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else math.inf
        self.stop = _StopFlag(quiet=not par.main)
        self.started = 0.0  # set by train(): the clock counts training, not setup

    def read_checkpoint(self) -> tuple[dict, dict, dict]:
        """Restore what must be in place before the engine wraps the model: weights, data position, counters.
        Returns (weights, optimizer tensors, state.json with the weight average or None under
        "average") for the engine and make_average to load."""
        t_cfg, run_dir, s = self.t_cfg, self.run_dir, self.state
        found = load_newest_good(self.ckpt_root)
        if found is None:
            raise LmforgeError(f"{run_dir} has no usable checkpoint to resume from (it stopped before its first "
                               f"checkpoint was written, or every checkpoint is damaged); start the run again")
        path, weights, opt_tensors, saved = found
        saved["average"] = load_average(path, saved)  # None without optim.ema_decay
        check_global_batch(run_dir, saved.get("global_batch"), self.cfg, self.par.world)
        self.model.load_state_dict(weights)  # every rank, before any wrapping (DeepSpeed copies it at start)
        self.task.load_data_state(saved["data"])
        s.step, s.tokens_seen, s.time_before = saved["step"], saved["tokens_seen"], saved["wall_time_s"]
        s.last_eval = saved.get("last_eval", {})
        # The final checkpoint is always written after the final evaluation (see train)
        s.last_eval_step = s.step if s.step >= t_cfg.max_steps else -1
        s.last_ckpt_step = s.step  # the resumed state is already on disk
        s.nonfinite_steps = saved.get("nonfinite_steps", 0)
        if t_cfg.precision == "auto":  # keep the precision the run started with, so resume stays exact
            self.precision = saved.get("precision", self.precision)
        if s.step >= t_cfg.max_steps and summary_covers(run_dir, s.step):
            raise LmforgeError(f"{run_dir} already finished at step {s.step} (train.max_steps={t_cfg.max_steps}); "
                               f"to train longer, resume with a larger train.max_steps=N")
        if s.step >= t_cfg.max_steps:  # killed after its last checkpoint, before summary.json was written
            self.say(f"lmforge: {run_dir} trained all {s.step} steps but stopped before its final reports; "
                     f"writing them")
        else:
            self.say(f"lmforge: resuming {run_dir} at step {s.step} ({path.name})")
        return weights, opt_tensors, saved

    def build_engine(self, restored: Optional[tuple[dict, dict, dict]]
                     ) -> tuple[Engine, Optional[torch.amp.GradScaler]]:
        """The strategy (ddp, fsdp, deepspeed; plain in one process) wraps the model and makes AdamW."""
        cfg, device = self.cfg, self.device
        engine = make_engine(self.model, cfg, self.par, device, self.precision,
                             make_optimizer=lambda m: make_optimizer(m, cfg.optim, device))
        # fp16: torch's GradScaler, or none where the engine scales the loss itself (DeepSpeed)
        scaler = engine.make_grad_scaler(self.precision, device)
        if restored is not None:  # every rank loads the same whole state; sharded engines keep their part
            weights, opt_tensors, saved = restored
            engine.load_full_state(weights, opt_tensors, saved["optimizer"])
            # the loss scale is restored by the engine that really scales the loss
            engine.load_loss_scale_state(scaler, saved.get("loss_scaler"))
        return engine, scaler

    def make_average(self, restored: Optional[tuple[dict, dict, dict]]) -> Optional[WeightAverage]:
        """optim.ema_decay: the weight average (train/ema.py), restored with its update count on resume."""
        decay = self.cfg.optim.ema_decay
        if decay is None:
            return None
        average = WeightAverage(self.model, decay)
        saved = restored[2] if restored is not None else {}
        if saved.get("average") is not None:
            average.load_state_dict(saved["average"], saved["ema_updates"])
        elif restored is not None:
            self.say(f"lmforge: the checkpoint has no weight average; optim.ema_decay={decay} averages from step "
                     f"{self.state.step} on")
        return average

    def make_layer_stats(self) -> Optional[LayerStats]:
        """log.layer_stats: the blocks to watch; refused where parameters are sharded."""
        if not self.cfg.log.layer_stats:
            return None
        if self.par.world > 1 and self.cfg.distributed.strategy in ("fsdp", "deepspeed"):
            raise LmforgeError(f"log.layer_stats needs whole parameters on every rank; distributed.strategy="
                               f"{self.cfg.distributed.strategy} shards them: use ddp, or log.layer_stats=false")
        stats = LayerStats(self.model)
        if not stats.blocks:
            raise LmforgeError("log.layer_stats=true found no transformer blocks in this model (no nn.ModuleList "
                               "of layers); set it to false")
        return stats

    def make_logger(self) -> MetricsLogger | NullLogger:
        """One writer (rank 0); on resume it drops what an interrupted process logged after the checkpoint."""
        if not self.par.main:
            return NullLogger()
        t_cfg, log_cfg, step = self.t_cfg, self.cfg.log, self.state.step
        return MetricsLogger(self.run_dir, resume_step=step if self.resume else None,
                             keep_eval_at_resume_step=step % t_cfg.eval_every == 0 or step >= t_cfg.max_steps,
                             tensorboard=log_cfg.tensorboard, csv=log_cfg.csv,
                             wandb=to_dict(self.cfg) if log_cfg.wandb else None)

    def warn_if_emulated(self) -> None:
        """A precision the hardware only emulates is far slower than fp32: say so before training."""
        if self.t_cfg.precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            self.say("lmforge: warning: train.precision=bf16 on a CPU without native bf16 is emulated and far "
                     "slower than fp32; use train.precision=auto")
        if self.precision == "fp16" and self.device.type == "cpu":
            self.say("lmforge: warning: train.precision=fp16 on a CPU is emulated and slow; it is meant for "
                     "older CUDA GPUs (use train.precision=auto)")

    def train(self) -> TrainResult:
        """Step until max_steps, the time budget or a signal; then the final evaluation and checkpoint."""
        s, t_cfg = self.state, self.t_cfg
        self.started = time.time()
        s.last_log_time, s.last_log_tokens = self.started, s.tokens_seen
        self.checkpoint_or_trim_at_start()
        self.bar = tqdm(total=t_cfg.max_steps, initial=s.step, desc=self.task.name, unit="step",
                        disable=not (t_cfg.progress and self.par.main), dynamic_ncols=True)
        with self.stop:
            while s.step < t_cfg.max_steps:
                if self.should_stop():
                    break
                out = self.train_step()
                self.bar.update(1)
                self.maybe_log(out)
                self.maybe_evaluate()
                self.maybe_checkpoint()
        self.bar.close()
        if s.last_eval_step != s.step:
            self.evaluate()
        if s.last_ckpt_step != s.step:
            self.checkpoint()
        overfit = self.report_overfit() if self.overfit_watch is not None else None
        if self.average is not None:  # the run's model is the average from here on (finish, the reports)
            self.average.copy_to_model()
        self.logger.close()
        return TrainResult(steps=s.step, tokens_seen=s.tokens_seen, wall_time_s=self.elapsed(),
                           stopped_by=s.stopped_by, last_eval=s.last_eval, overfit=overfit)

    def report_overfit(self) -> dict:
        """The overfit test's verdict: printed with the decoded last batch, written to overfit.md;
        returns the summary's entries."""
        watch = self.overfit_watch
        result = watch.result({"lr": self.cfg.optim.lr})
        table = (decode_last(self.task, self.eval_model, self.last_batches[0])
                 if self.last_batches and self.evaluates else None)
        if not self.par.main:
            return result
        line = watch.verdict()
        text = f"# Overfit test\n\n{line}\n"
        if "overfit_hint" in result:
            text += f"\nWhat to look at: {result['overfit_hint']}\n"
        if table is not None:
            text += f"\nThe last step's batch (first micro-batch, its first rows):\n\n{table.markdown()}"
        write_text_atomic(self.run_dir / "overfit.md", text)
        self.say(f"lmforge: {line}" + (f"\nlmforge: what to look at: {result['overfit_hint']}"
                                      if "overfit_hint" in result else ""))
        if table is not None:
            self.say(table.markdown().rstrip())
        return result

    def checkpoint_or_trim_at_start(self) -> None:
        """A new run checkpoints step 0, so that one killed before its first periodic checkpoint can
        still be resumed; a resumed run drops the samples.md sections written after its checkpoint."""
        if self.resume:
            if self.par.main:
                trim_samples(self.run_dir / "samples.md", self.state.step)
        else:
            self.checkpoint()

    def elapsed(self) -> float:
        """The run's wall-clock seconds, over every process that trained it (for state.json and the summary)."""
        return self.state.time_before + time.time() - self.started

    def out_of_time(self) -> bool:
        """train.max_time_s bounds this process's training time, not the run's."""
        return self.t_cfg.max_time_s is not None and time.time() - self.started >= self.t_cfg.max_time_s

    def should_stop(self) -> bool:
        """Stop at a step boundary on the time budget or a signal, noting why (ranks agree via train_step)."""
        s = self.state
        if self.par.world == 1:
            s.signalled, s.timed_out = self.stop.requested, self.out_of_time()
        if self.overfit_watch is not None and self.overfit_watch.nonfinite_step is not None:
            s.stopped_by = "non-finite loss"  # the overfit test has its answer: no need to skip more steps
            return True
        if s.timed_out:
            s.stopped_by = "max_time_s"
            return True
        if s.signalled:
            s.stopped_by = "signal"
            return True
        return False

    def train_step(self) -> StepOutput:
        """One optimizer step: its seeds and batches, the gradients over every rank, the update or its skip."""
        s, t_cfg, par, engine = self.state, self.t_cfg, self.par, self.engine
        lr = lr_at(*self.schedule.progress(s.step), self.cfg.optim)
        engine.set_lr(lr)
        # dropout: a function of the step (and of the rank: ranks' rows must not share masks)
        torch.manual_seed(derive_seed(t_cfg.seed, "step", s.step, *(("rank", par.rank) if par.rank else ())))
        step_start = time.perf_counter()
        data_step = s.step % self.overfit.count if self.overfit is not None else s.step
        shape = self.schedule.at(data_step)
        batches = self.draw_batches(s.step)
        if self.overfit is not None:  # the verdict decodes the last step's batch
            self.last_batches = batches
        s.data_wait += time.perf_counter() - step_start
        stats = self.layer_stats if self.layer_stats is not None and self.is_log_step(s.step + 1) else None
        with stats.watching() if stats is not None else contextlib.nullcontext():
            loss_mean, means, _ = accumulate_gradients(self.task, self.forward_model, batches, self.device, self.amp,
                                                       self.scaler, par, engine)
        num_tokens = sum(b.num_tokens for b in batches)
        if par.world > 1:
            num_tokens, loss_mean, means = self.reduce_over_ranks(num_tokens, loss_mean, means)
        if stats is not None:  # gradients as the backward left them, weights before the update
            grads = stats.grad_norms()
            if self.scaler is not None:  # fp16: the backward ran on the scaled loss
                grads = {k: v / self.scaler.get_scale() for k, v in grads.items()}
            stats.before_update()
        grad_norm, updated = engine.step(self.max_norm, loss_mean, self.scaler)
        if stats is not None:
            self.layer_record = stats.record(grads, stats.update_ratios())
        if self.overfit_watch is not None:  # one sync a step: the test needs every step's loss
            self.overfit_watch.observe(s.step + 1, loss_mean.item(), float(grad_norm))
        if updated:
            s.nonfinite_in_a_row = 0
            if self.average is not None:
                self.average.update()
        else:
            self.skip_nonfinite(loss_mean, batches)
        if self.scaler is not None:
            self.scaler.update()
        engine.zero_grad()
        s.step += 1
        s.tokens_seen += num_tokens
        s.step_time += time.perf_counter() - step_start
        return StepOutput(lr=lr, shape=shape, num_tokens=num_tokens, loss_mean=loss_mean, means=means,
                          grad_norm=grad_norm)

    def draw_batches(self, step: int) -> list:
        """The step's micro-batches from the task, or, in an overfit test, the repeated ones."""
        def draw(k: int) -> list:
            return [self.task.train_batch(k, micro) for micro in range(self.schedule.at(k).micro_batches)]
        return self.overfit.at(step, draw) if self.overfit is not None else draw(step)

    def reduce_over_ranks(self, num_tokens: int, loss_mean: torch.Tensor, means: dict[str, torch.Tensor]
                          ) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
        """One all-reduce per step: the global batch's tokens, loss and metrics, and every rank's stop flags."""
        s = self.state
        counts = torch.tensor([num_tokens, self.stop.requested, self.out_of_time()], dtype=torch.float32,
                              device=self.device)
        packed = self.par.sum_(torch.cat([loss_mean.view(1), counts, *(v.view(1) for v in means.values())]))
        num_tokens, s.signalled, s.timed_out = (int(x) for x in packed[1:4].tolist())
        return num_tokens, packed[0], dict(zip(means, packed[4:]))

    def skip_nonfinite(self, loss_mean: torch.Tensor, batches: list) -> None:
        """The engine skipped the update: warn (with log.layer_stats, naming the first block whose
        numbers left the finite range), and stop with a clear error after too many non-finite losses."""
        s, t_cfg = self.state, self.t_cfg
        s.nonfinite_steps += 1
        # fp16 gradient overflow with a finite loss is the loss scaler's business (it lowers
        # its factor after the step, or DeepSpeed's does); only a non-finite loss counts towards stopping
        overflow = self.precision == "fp16" and bool(torch.isfinite(loss_mean))
        s.nonfinite_in_a_row = 0 if overflow else s.nonfinite_in_a_row + 1
        scale = self.engine.loss_scale(self.scaler)
        what = ("fp16 gradients overflowed" + (f" at loss scale {scale:g}" if scale is not None else "")
                if overflow
                else "loss or gradient is not finite")
        where = ""
        if self.layer_stats is not None and not overflow:
            def replay() -> torch.Tensor:
                with self.amp:
                    return self.task.loss(self.model, batches[0]).loss_sum
            self.engine.zero_grad()
            # the backward replay runs on the plain model: one process only (DDP's hooks expect its forward)
            block = first_nonfinite(self.layer_stats, replay, backward=self.par.world == 1)
            self.engine.zero_grad()
            where = (f"; the first block whose numbers left the finite range: {block}" if block is not None
                     else "; every block's output and gradient are finite (look at the embeddings, the head, "
                          "the loss or the data)")
            self.logger.log(s.step + 1, "layers", nonfinite_block=block or "none")
        self.say(f"lmforge: warning: step {s.step + 1}: {what}; update skipped{where}")
        if s.nonfinite_in_a_row >= t_cfg.max_nonfinite_steps:
            raise LmforgeError(f"step {s.step + 1}: loss or gradient not finite for {s.nonfinite_in_a_row} steps in "
                               f"a row (train.max_nonfinite_steps={t_cfg.max_nonfinite_steps}); lower optim.lr, "
                               f"set optim.max_grad_norm, or check the data")

    def maybe_log(self, out: StepOutput) -> None:
        """Every log_every steps and at the last: one train record, and the progress bar's numbers."""
        s, t_cfg, engine = self.state, self.t_cfg, self.engine
        if not self.is_log_step(s.step):
            return
        now = time.time()
        tokens_per_s = (s.tokens_seen - s.last_log_tokens) / max(now - s.last_log_time, 1e-9)
        s.last_log_time, s.last_log_tokens = now, s.tokens_seen
        loss = out.loss_mean.item()
        extra = {k: v.item() for k, v in out.means.items()}
        # data_wait: share of step time spent making batches (the loop waits for them)
        self.logger.log(s.step, "train", loss=loss, lr=out.lr, grad_norm=out.grad_norm.item(), tokens=s.tokens_seen,
                        tokens_per_s=tokens_per_s, data_wait=s.data_wait / max(s.step_time, 1e-9),
                        skipped_steps=s.nonfinite_steps, **memory_mb(self.device), **extra,
                        **({"seq_len": out.shape.seq_len, "step_tokens": out.num_tokens}
                           if self.schedule.varies else {}),
                        **({"loss_scale": scale} if (scale := engine.loss_scale(self.scaler)) is not None else {}))
        s.data_wait = s.step_time = 0.0
        if self.layer_record:
            self.logger.log(s.step, "layers", **self.layer_record)
            self.layer_record = {}
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{out.lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")

    def is_log_step(self, step: int) -> bool:
        """Whether the step that ends at `step` (1-based) writes a train record."""
        return step % self.t_cfg.log_every == 0 or step == self.t_cfg.max_steps

    def maybe_evaluate(self) -> None:
        """Every eval_every steps and at max_steps, before that step's checkpoint, which then holds it."""
        if self.state.step % self.t_cfg.eval_every == 0 or self.state.step == self.t_cfg.max_steps:
            self.evaluate()

    def maybe_checkpoint(self) -> None:
        """Every checkpoint_every steps and at max_steps, so a killed run loses at most that many steps."""
        if self.state.step % self.t_cfg.checkpoint_every == 0 or self.state.step == self.t_cfg.max_steps:
            self.checkpoint()

    def evaluate(self) -> None:
        """Held-out metrics now: logged, printed, kept for the checkpoint and summary; samples.md at its cadence."""
        s, t_cfg = self.state, self.t_cfg
        s.last_eval_step = s.step
        if not self.evaluates:
            return
        with self.amp, (self.average.swapped_in() if self.average is not None else contextlib.nullcontext()):
            result = self.task.evaluate(self.eval_model, self.device)
        s.last_eval, s.last_eval_step = result.metrics, s.step
        if not self.par.main:
            return
        self.logger.log(s.step, "validation", tokens=s.tokens_seen, **result.metrics)
        samples_every = t_cfg.samples_every or t_cfg.eval_every
        if result.table_markdown and (s.step % samples_every == 0 or s.step == t_cfg.max_steps):
            with open(self.run_dir / "samples.md", "a") as f:
                f.write(f"\n## step {s.step} ({s.tokens_seen:,} tokens)\n\n{result.table_markdown}")
            self.logger.samples("validation/samples", result.table_markdown, result.table, s.step)
        tqdm.write("step {:>6} | val ".format(s.step) + " | ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))

    def checkpoint(self) -> None:
        """Everything an exact resume needs: weights, optimizer, data position, counters, the loss scale."""
        s, engine = self.state, self.engine
        s.last_ckpt_step = s.step
        full_state = engine.full_state()  # every rank: gathering sharded state is a collective
        if not self.par.main:  # one writer
            return
        data = self.overfit.data_state() if self.overfit is not None else self.task.data_state()
        saved = {"tokens_seen": s.tokens_seen, "wall_time_s": self.elapsed(), "data": data,
                 "last_eval": s.last_eval, "task": self.task.name, "precision": self.precision,
                 "nonfinite_steps": s.nonfinite_steps, "global_batch": self.global_batch}
        if (scale := engine.loss_scale_state(self.scaler)) is not None:
            saved["loss_scaler"] = scale
        if self.overfit_watch is not None:
            saved["overfit"] = self.overfit_watch.state_dict()
        average = None
        if self.average is not None:
            saved["ema_updates"] = self.average.updates
            average = self.average.state_dict()
        save_checkpoint(self.ckpt_root, s.step, full_state, saved, keep=self.t_cfg.keep_checkpoints,
                        average=average)


def train(cfg: Config, task: Task, run_dir: Path, device: torch.device, resume: bool = False) -> TrainResult:
    """Train `task.model` per `cfg.train` / `cfg.optim`, writing into `run_dir`. With `resume`,
    continue from the run's latest checkpoint. Returns what the run did (TrainResult)."""
    return Trainer(cfg, task, run_dir, device, resume).train()


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
    summary = {**task.summary(result.last_eval), **(extra or {}), **(result.overfit or {}), "steps": result.steps,
               "tokens_seen": result.tokens_seen, "wall_time_s": round(result.wall_time_s, 2),
               "stopped_by": result.stopped_by}
    # Written last, and atomically: a run with summary.json and max_steps reached is finished
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
