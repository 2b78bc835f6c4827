"""A training run of any objective, from a config to a finished run directory, or resumed.

    config -> objective (the registry, by task.name) -> task.create (data, model) -> run directory
           -> the loop (lmforge/train/loop.py) -> task.finish, report.png, summary.json

`start` and `resume_run` are what `lmforge pretrain` and `lmforge finetune` (and the Python API) run;
they know nothing of any particular objective: everything that differs lives in the objective's
own file (lmforge/tasks/).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from lmforge import distributed
from lmforge.config import Config, dump_yaml, load_config
from lmforge.errors import LmforgeError
from lmforge.files import write_text_atomic
from lmforge.eval.report import write_report
from lmforge.runs.checkpoint import checkpoints_newest_first, load_model_weights
from lmforge.runs.readers import summary_covers
from lmforge.runs.run_dir import check_out_dir, create_run_dir, flatten
from lmforge.tasks import registry
from lmforge.tasks.base import Task
from lmforge.train.loop import check_global_batch, resolve_device, train, write_summary
from lmforge.train.machine import check_environment, set_threads

# Settings that may change when a run is resumed; everything else would make it another run.
RESUMABLE_OVERRIDES = ("train.max_steps", "train.max_time_s", "train.progress", "train.device",
                       "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                       # another world size or strategy, with the same global batch (checked)
                       "train.batch_size", "train.grad_accum_steps", "distributed.strategy",
                       "distributed.zero_stage", "distributed.offload_optimizer", "distributed.offload_param",
                       "distributed.deepspeed_config")


def objective_for(cfg: Config, verb: Optional[str]) -> type[Task]:
    """The objective of cfg.task.name, refused in one line when `verb` does not train it."""
    objective = registry.objective(cfg.task.name)
    if verb is not None and objective.verb != verb:
        hint = objective.wrong_verb_hint or f"use `lmforge {objective.verb}` for {cfg.task.name}"
        raise LmforgeError(f"`lmforge {verb}` runs task.name={', '.join(registry.names(verb))}, not "
                           f"{cfg.task.name!r}; {hint}")
    objective.check_config(cfg)
    return objective


def start(cfg: Config, verb: Optional[str] = None) -> tuple[Path, dict]:
    """Run a new training job of cfg's objective (`verb`: the command asked for, checked against
    the objective's own). Returns (run directory, summary; empty on ranks other than 0)."""
    objective = objective_for(cfg, verb)
    check_out_dir(cfg.out_dir)
    set_threads(cfg.train.num_threads)
    par, device = distributed.setup(resolve_device(cfg.train.device), timeout_s=cfg.distributed.timeout_s)
    check_environment(cfg, par.world)
    task = objective.create(cfg)  # before the run directory: a task that cannot start leaves none
    run_dir = Path(par.broadcast(str(create_run_dir(cfg, cfg.task.name)) if par.main else None))
    if par.main:
        task.write_run_files(run_dir)
        rows, t = task.rows_are, cfg.train
        print(f"lmforge: run directory {run_dir}")
        print(f"lmforge: {task.describe()}; device {device}"
              + (f", {par.world} processes ({cfg.distributed.strategy}); global batch {t.batch_size} x "
                 f"{t.grad_accum_steps} x {par.world} = {t.batch_size * t.grad_accum_steps * par.world} {rows}"
                 if par.world > 1 else ""))
    return run_dir, run_task(cfg, task, run_dir, device, resume=False)


def pretrain(cfg: Config) -> tuple[Path, dict]:
    """`lmforge pretrain`: a new run of a pretraining objective. Returns (run directory, summary)."""
    return start(cfg, "pretrain")


def finetune(cfg: Config) -> tuple[Path, dict]:
    """`lmforge finetune`: a new run of a fine-tuning objective. Returns (run directory, summary)."""
    return start(cfg, "finetune")


def resume(run_dir: Path, overrides: Optional[list[str]] = None) -> tuple[Path, dict]:
    """`lmforge pretrain --resume`: continue a pretraining run from its latest checkpoint."""
    return resume_run(run_dir, overrides, "pretrain")


def resume_finetune(run_dir: Path, overrides: Optional[list[str]] = None) -> tuple[Path, dict]:
    """`lmforge finetune --resume`: continue a fine-tuning run from its latest checkpoint."""
    return resume_run(run_dir, overrides, "finetune")


def build_model(cfg: Config) -> torch.nn.Module:
    """A freshly initialised model of cfg's objective and shape (BertForMaskedLM, GPT, Electra...)."""
    return registry.objective(cfg.task.name).build_model(cfg)


def resume_run(run_dir: Path, overrides: Optional[list[str]] = None,
               verb: Optional[str] = None) -> tuple[Path, dict]:
    """Continue a run from its latest checkpoint, in the same directory (`verb`: refuse a run the
    other command trains)."""
    run_dir = Path(run_dir)
    cfg, device = resume_config(run_dir, overrides, verb)
    task = registry.objective(cfg.task.name).reopen(cfg, run_dir)
    save_overrides(run_dir, cfg, overrides)
    return run_dir, run_task(cfg, task, run_dir, device, resume=True)


def resume_config(run_dir: Path, overrides: Optional[list[str]], verb: Optional[str]) -> tuple[Config, torch.device]:
    """The run's config with the allowed overrides applied, and the device, after every check that
    can refuse the resume. Nothing is written: `save_overrides` does that once nothing can refuse,
    so a refused resume leaves the run directory exactly as it was."""
    if not (run_dir / "config.yaml").is_file():
        raise LmforgeError(f"{run_dir} is not an lmforge run directory (no config.yaml)")
    for text in overrides or []:
        key = text.split("=", 1)[0].strip()
        if key not in RESUMABLE_OVERRIDES:
            raise LmforgeError(f"'{key}' cannot change when resuming (it would be a different run); "
                               f"allowed: {', '.join(RESUMABLE_OVERRIDES)}")
    cfg = load_config(run_dir / "config.yaml", overrides, migrate_run=True)  # (a run from before a key moved too)
    objective = registry.objective(cfg.task.name)
    if verb is not None and objective.verb != verb:
        kind = "fine-tuning" if objective.verb == "finetune" else "pretraining"
        raise LmforgeError(f"{run_dir} is a {kind} run; continue it with `lmforge {objective.verb} --resume`")
    objective.check_config(cfg)
    _check_model_unchanged(run_dir, cfg)
    _check_steps_left(run_dir, cfg)
    set_threads(cfg.train.num_threads)
    par, device = distributed.setup(resolve_device(cfg.train.device),  # joins torchrun's ranks, if any
                                    timeout_s=cfg.distributed.timeout_s)
    check_environment(cfg, par.world)
    _check_global_batch(run_dir, cfg, par.world)
    return cfg, device


def _check_model_unchanged(run_dir: Path, cfg: Config) -> None:
    """config.yaml's model section must be the one the run started with (hparams.json is written
    once, at the start): the checkpoints only load into that model."""
    path = run_dir / "hparams.json"
    if not path.is_file():
        return
    started = json.loads(path.read_text())
    for key, value in flatten({"model": dataclasses.asdict(cfg.model)}).items():
        if key in started and started[key] != value:
            raise LmforgeError(f"{key}={value} in {run_dir / 'config.yaml'} differs from the {started[key]} the run "
                               f"started with; the model cannot change when resuming: restore {key}="
                               f"{started[key]}, or start a new run")


def _newest_state(run_dir: Path) -> Optional[dict]:
    """state.json of the newest checkpoint, or None when there is none or it is damaged (the loop
    then falls back to an older checkpoint and says so)."""
    newest = checkpoints_newest_first(run_dir / "checkpoints")
    if not newest:
        return None
    try:
        state = json.loads((newest[0] / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _check_steps_left(run_dir: Path, cfg: Config) -> None:
    """Refuse a run with no checkpoint or with no steps left here, before train.max_steps=N is
    saved (the loop checks the same when it loads the checkpoint, after the overrides would be)."""
    if not checkpoints_newest_first(run_dir / "checkpoints"):
        raise LmforgeError(f"{run_dir} has no usable checkpoint to resume from (it stopped before its first "
                           f"checkpoint was written); start the run again")
    step = (_newest_state(run_dir) or {}).get("step")
    # at max_steps without summary.json: killed before its final reports; the loop writes them
    if isinstance(step, int) and step >= cfg.train.max_steps and summary_covers(run_dir, step):
        raise LmforgeError(f"{run_dir} already finished at step {step} (train.max_steps={cfg.train.max_steps}); "
                           f"to train longer, resume with a larger train.max_steps=N")


def _check_global_batch(run_dir: Path, cfg: Config, world: int) -> None:
    """The loop's check (train/loop.py check_global_batch) before anything is written; a damaged
    newest checkpoint is left to the loop, which falls back to an older one and checks that."""
    state = _newest_state(run_dir)
    if state is not None:
        check_global_batch(run_dir, state.get("global_batch"), cfg, world)


def save_overrides(run_dir: Path, cfg: Config, overrides: Optional[list[str]]) -> None:
    """Write the resumed config (with its new train.* settings) back, so the next resume sees them."""
    if overrides and distributed.current().main:
        write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))  # a kill here leaves the old one whole


def run_task(cfg: Config, task: Task, run_dir: Path, device: torch.device, resume: bool) -> dict:
    """The loop, then the task's final reports, summary.json and report.png. Returns the summary.
    With sharded parameters (fsdp, deepspeed), rank 0 loads the final checkpoint into a fresh
    model (`task.fresh_model()`) for the reports."""
    result = train(cfg, task, run_dir, device, resume=resume)
    par = distributed.current()
    if not par.main:  # rank 0 writes the reports
        par.barrier()
        return {}
    model = task.model
    if par.world > 1 and cfg.distributed.strategy != "ddp":  # sharded: rank 0 reports on the whole model
        model = task.fresh_model().to(device)
        model.load_state_dict(load_model_weights(run_dir / "checkpoints", run_dir))
    extra = task.finish(model, run_dir, device)
    write_report(run_dir)
    summary = write_summary(run_dir, task, result, extra)  # last: its presence marks a finished run
    par.barrier()
    return summary
