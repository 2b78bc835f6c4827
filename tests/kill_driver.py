"""Runs `lmforge <verb> ...` in this process and SIGKILLs it at a chosen moment (tests/test_kill_resume.py).

    python tests/kill_driver.py PLAN.json -- pretrain --config run.yaml

PLAN.json: {"kill": {"point": NAME, "n": N} or null, "counts": PATH or null}. The driver wraps
the functions a run passes through (see POINTS) and, once the run's first checkpoint is on disk
("armed"), counts their calls; at call N of POINT it sends itself SIGKILL — no handler, no
cleanup, exactly what the kernel's OOM killer or a pulled plug does. With "counts" it kills
nothing and writes how often each point was reached after arming, and the seconds from arming to
exit, so the test can draw kill moments that really happen. It prints ARMED on stdout when armed,
for kills at a random time sent from outside.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import sys
import time

import lmforge.jobs
import lmforge.runs.checkpoint as checkpoint
from lmforge.cli import main
from lmforge.tasks.classify import ClassifyTask
from lmforge.tasks.clm import CausalLMTask
from lmforge.tasks.mlm import MaskedLMTask
from lmforge.train.log import MetricsLogger

TASKS = (MaskedLMTask, CausalLMTask, ClassifyTask)
counts: dict[str, int] = {}
armed_at: list[float] = []
plan: dict = {}


def reached(point: str) -> None:
    if not armed_at:
        return
    counts[point] = counts.get(point, 0) + 1
    kill = plan.get("kill")
    if kill and kill["point"] == point and kill["n"] == counts[point]:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name: str, point: str, when: str) -> None:
    """Replace owner.name by a function that calls `reached(point)` before or after the original."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if when == "before":
            reached(point)
        result = original(*args, **kwargs)
        if when == "after":
            reached(point)
        return result

    setattr(owner, name, wrapper)


class KillingModel:
    """Stands in for the model during evaluation so that a kill lands between two eval batches."""

    def __init__(self, model):
        self._model = model

    def __call__(self, *args, **kwargs):
        reached("eval_forward")
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def install() -> None:
    for cls in TASKS:
        wrap(cls, "train_batch", "train_batch", "before")  # a step starts
        wrap(cls, "loss", "loss", "after")  # between forward and backward
        evaluate = cls.evaluate
        cls.evaluate = lambda self, model, device, _evaluate=evaluate: _evaluate(self, KillingModel(model), device)
    wrap(MetricsLogger, "log", "log", "after")  # a record is on disk, the next checkpoint is not
    wrap(checkpoint, "save_file", "save_file", "after")  # half a checkpoint folder written
    wrap(checkpoint, "_fsync_dir", "renamed", "before")  # new folder in place, `latest` not yet moved
    wrap(checkpoint, "write_text_atomic", "latest", "after")  # `latest` moved, old ones not yet pruned
    wrap(shutil, "rmtree", "rmtree", "after")  # pruning (and temp-folder clean-up)
    wrap(lmforge.jobs, "write_summary", "summary", "before")  # training over, reports not written
    wrap(lmforge.jobs, "write_report", "report", "before")

    save = checkpoint._save_checkpoint

    def first_save_arms(*args, **kwargs):
        result = save(*args, **kwargs)
        if not armed_at:
            armed_at.append(time.time())
            print("ARMED", flush=True)
        return result

    checkpoint._save_checkpoint = first_save_arms


def write_counts(path: str) -> None:
    data = {"counts": counts, "armed_seconds": time.time() - armed_at[0] if armed_at else 0.0}
    with open(path, "w") as f:
        json.dump(data, f)


if __name__ == "__main__":
    plan_path, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: kill_driver.py PLAN.json -- VERB ARGS..."
    with open(plan_path) as f:
        plan.update(json.load(f))
    install()
    if plan.get("counts"):
        atexit.register(write_counts, plan["counts"])
    raise SystemExit(main(argv))
