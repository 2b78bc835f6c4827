"""Metrics logging: one JSON object per line in metrics.jsonl, and TensorBoard event files.

Every record has `step` and `split` ("train" or "validation"); the same numbers go to TensorBoard
as `<split>/<name>`. On resume, records from after the checkpoint (written by the interrupted
process after its last checkpoint) are dropped from metrics.jsonl and purged from TensorBoard,
so the files read as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from lmforge.train.checkpoint import write_text_atomic


class MetricsLogger:
    def __init__(self, run_dir: Path, resume_step: Optional[int] = None, tensorboard: bool = True,
                 keep_eval_at_resume_step: bool = True):
        """`keep_eval_at_resume_step=False` also drops a validation record AT resume_step: the
        evaluation a stopped run makes where it stopped, which an uninterrupted run would not."""
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            def kept_record(r: dict) -> bool:
                return r["step"] < resume_step or (r["step"] == resume_step and
                                                   (r["split"] != "validation" or keep_eval_at_resume_step))
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and kept_record(json.loads(line))]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard's own event writer

            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge)

    def log(self, step: int, split: str, **metrics: Any) -> None:
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{split}/{k}", v, step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, markdown, step)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class NullLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's files)."""

    def log(self, step: int, split: str, **metrics: Any) -> None:
        pass

    def text(self, tag: str, markdown: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _plain(v: Any) -> Any:
    """Python scalars for JSON; non-finite floats become null (JSON has no NaN)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
