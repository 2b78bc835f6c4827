"""`lmforge lr-find`: the learning-rate range test (Smith 2017, "Cyclical Learning Rates for
Training Neural Networks"; fastai's lr_find) on a config's own data, objective and optimizer.

A short run from the config's freshly initialised model: step k trains on the config's own step-k
batch with the learning rate growing exponentially from `start` to `end` (default 1e-7 to 10 over
200 steps), no warm-up and no schedule, until the loss (its moving average) passes 4x its lowest
(it diverged) or is not finite. Each learning rate is paired with the loss of the NEXT batch,
the first measured after an update at that rate. The curve is smoothed by a centred moving
median: no lag (a trailing average, fastai's, lags by most of a decade at 100-200 steps and
moves the steepest point up) and no bump from one spiking batch (a mean turns one into a step
whose far side looks steep). It is drawn in a picture (lr-find.png) and written as JSON beside
it, and two points are read off it:

- steepest: where the loss falls fastest (the most negative slope against log lr), Smith's
  choice for the base learning rate;
- minimum / 10: a tenth of the learning rate at the lowest loss, fastai's rule: safely below the
  point where training starts to diverge.

The suggested override is the steepest point; a tenth of the minimum is printed beside it as the
cautious choice. Measured here (see the README), the suggestion for configs/bert-tiny.yaml and
configs/gpt-tiny.yaml falls within 2x of the rates they ship with. Nothing of a run is written:
no run directory, no checkpoint; the picture never overwrites a file (lr-find-2.png, ... next to
it). One process only: the curve does not depend on how a step is split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from lmforge.config import Config
from lmforge.distributed import Parallel, make_engine
from lmforge.errors import LmforgeError
from lmforge.files import write_text_atomic
from lmforge.rng import derive_seed
from lmforge.tasks import registry
from lmforge.train.loop import accumulate_gradients, autocast_for, resolve_device
from lmforge.train.machine import check_environment, resolve_precision, set_threads
from lmforge.train.optim import make_optimizer

SMOOTHING = 0.98  # the loss's exponential moving average (with bias correction), as fastai's
DIVERGED = 4.0  # stop once the smoothed loss is this many times its lowest


@dataclass
class RangeTest:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # each step's loss, before its update
    smoothed: list[float] = field(default_factory=list)
    stopped: str = "end"  # end | diverged | non-finite
    steepest_lr: Optional[float] = None
    minimum_lr: Optional[float] = None  # the lr at the lowest smoothed loss
    suggested_lr: Optional[float] = None
    picture: str = ""
    config: str = ""

    def suggestion_line(self) -> str:
        if self.suggested_lr is None:
            return "lr-find: no suggestion: the loss never fell (see the picture)"
        return (f"lr-find: suggested optim.lr={self.suggested_lr:.2g} ("
                f"where the loss falls fastest; the cautious choice, a tenth of the lowest-loss point "
                f"{self.minimum_lr:.2g}, is {self.minimum_lr / 10:.2g})")


def lr_at(k: int, steps: int, start: float, end: float) -> float:
    """Step k's learning rate: start x (end / start)^(k / (steps - 1)), exponential."""
    return start * (end / start) ** (k / max(steps - 1, 1))


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The bias-corrected exponential moving average of `losses` (trailing: for the stop rule)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))
    return out


def centred(losses: list[float], half: int) -> list[float]:
    """The median of each point's window of +-`half` points (fewer at the ends): no lag, and a
    single spiking batch leaves no mark."""
    return [statistics.median(losses[max(0, i - half):i + half + 1]) for i in range(len(losses))]


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """(steepest, minimum, suggested) learning rates read off the smoothed curve; Nones when the
    loss never fell below its start. The first tenth of the points (the moving average's start)
    and the diverging tail after the minimum are left out of the slope."""
    if len(smoothed) < 5:
        return None, None, None
    low = min(range(len(smoothed)), key=smoothed.__getitem__)
    if smoothed[low] >= smoothed[0]:
        return None, None, None
    skip = max(1, len(smoothed) // 10)
    span = range(skip, low + 1) if low > skip else range(0, low + 1)
    logs = [math.log10(x) for x in lrs]

    def slope(i: int) -> float:  # central difference against log10 lr
        a, b = max(i - 1, 0), min(i + 1, len(smoothed) - 1)
        return (smoothed[b] - smoothed[a]) / (logs[b] - logs[a])
    steepest = lrs[min(span, key=slope)]
    minimum = lrs[low]
    return steepest, minimum, steepest


def range_test(cfg: Config, steps: int = 200, start: float = 1e-7, end: float = 10.0,
               progress: bool = True) -> RangeTest:
    """Train cfg's objective from its fresh model for up to `steps` steps with the learning rate
    growing from `start` to `end`; returns the curve and the suggestions (no picture yet)."""
    if not (0 < start < end):
        raise LmforgeError(f"lr-find needs 0 < --start < --end; got {start:g} and {end:g}")
    if steps < 10:
        raise LmforgeError(f"lr-find needs at least 10 steps to draw a curve; got --steps {steps}")
    # every step at the config's full shape: a sequence-length switch or a batch ramp would put
    # kinks in the curve that are not the learning rate's
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, long_seq_len=None),
                              train=dataclasses.replace(cfg.train, batch_ramp_start_tokens=None))
    objective = registry.objective(cfg.task.name)
    objective.check_config(cfg)
    set_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    check_environment(cfg, 1)
    task = objective.create(cfg)
    model = task.model.to(device).train()
    par = Parallel()
    precision = resolve_precision(device, cfg.train.precision, cfg.distributed.strategy, 1)
    engine = make_engine(model, cfg, par, device, precision,
                         make_optimizer=lambda m: make_optimizer(m, cfg.optim, device))
    scaler = engine.make_grad_scaler(precision, device)
    amp = autocast_for(precision, device)
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else math.inf
    test = RangeTest()
    trailing: list[float] = []
    previous_lr = None  # the rate of the update just before this step's loss
    bar = tqdm(range(steps + 1), desc="lr-find", unit="step", disable=not progress, dynamic_ncols=True)
    for k in bar:
        lr = lr_at(min(k, steps - 1), steps, start, end)
        engine.set_lr(lr)
        torch.manual_seed(derive_seed(cfg.train.seed, "step", k))
        batches = [task.train_batch(k, micro) for micro in range(task.schedule.at(k).micro_batches)]
        loss, _, _ = accumulate_gradients(task, engine.forward_model, batches, device, amp, scaler, par, engine)
        loss = float(loss)
        engine.step(max_norm, torch.tensor(loss), scaler)
        if scaler is not None:
            scaler.update()
        engine.zero_grad()
        if not math.isfinite(loss):
            test.stopped = "non-finite"
            break
        if previous_lr is not None:  # this loss is the first seen after an update at previous_lr
            test.lrs.append(previous_lr)
            test.losses.append(loss)
            trailing = smooth(test.losses)
            bar.set_postfix(lr=f"{previous_lr:.2e}", loss=f"{loss:.3f}")
            if k > steps // 10 and trailing[-1] > DIVERGED * min(trailing):
                test.stopped = "diverged"
                break
        previous_lr = lr
    bar.close()
    test.smoothed = centred(test.losses, max(1, steps // 40))
    test.steepest_lr, test.minimum_lr, test.suggested_lr = suggest(test.lrs, test.smoothed)
    return test


def free_path(path: Path) -> Path:
    """`path`, or the first of path-2, path-3, ... (same suffix) that does not exist yet."""
    k = 2
    candidate = path
    while candidate.exists() or candidate.with_suffix(".json").exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate


def draw(test: RangeTest, path: Path, title: str) -> None:
    """The loss (each step faint, smoothed solid) against the learning rate, log scale, with the
    suggestions marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(test.lrs, test.losses, color="0.75", lw=0.8, label="loss at each step")
    ax.plot(test.lrs, test.smoothed, color="C0", lw=2, label="smoothed")
    marks = [("steepest", test.steepest_lr, "C2"), ("lowest / 10", test.minimum_lr and test.minimum_lr / 10, "C3")]
    for name, lr, color in marks:
        if lr:
            ax.axvline(lr, color=color, ls="--", lw=1, label=f"{name}: {lr:.2g}")
    ax.set_xscale("log")
    finite = [x for x in test.losses if math.isfinite(x)]
    if finite:  # the diverging tail would flatten the rest
        ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), min(max(finite), 1.5 * finite[0]) * 1.05)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lr_find(cfg: Config, config_name: str = "", out: str | Path = "lr-find.png", steps: int = 200,
            start: float = 1e-7, end: float = 10.0, progress: bool = True) -> RangeTest:
    """The range test, its picture at `out` (or the next free name) and the curve as JSON beside it."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise LmforgeError(f"--out {out}: the picture is a PNG; give a path ending in .png")
    test = range_test(cfg, steps, start, end, progress)
    path = free_path(out)
    test.picture, test.config = str(path), config_name
    draw(test, path, f"lr-find: {config_name or cfg.task.name} ({test.stopped})")
    write_text_atomic(path.with_suffix(".json"), json.dumps(asdict(test), indent=1) + "\n")
    return test
