"""Metrics logging: one JSON object per line in metrics.jsonl, TensorBoard event files, CSV.

Every record has `step` and `split` ("train" or "validation"); the same numbers go to TensorBoard
as `<split>/<name>` (log.tensorboard), and metrics-<split>.csv are redrawn from metrics.jsonl at
each evaluation and at the end (log.csv), so they always agree with it. On resume, records from after the checkpoint (written by the interrupted
process after its last checkpoint) are dropped from metrics.jsonl and purged from TensorBoard,
so the files read as one uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from lmforge.train.checkpoint import write_text_atomic


class MetricsLogger:
    def __init__(self, run_dir: Path, resume_step: Optional[int] = None, tensorboard: bool = True,
                 keep_eval_at_resume_step: bool = True, csv: bool = False):
        """`keep_eval_at_resume_step=False` also drops a validation record AT resume_step: the
        evaluation a stopped run makes where it stopped, which an uninterrupted run would not."""
        self.run_dir, self.csv = run_dir, csv
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
        if self.csv and split == "validation":
            write_csv(self.run_dir)

    def text(self, tag: str, markdown: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, markdown, step)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.csv:
            write_csv(self.run_dir)
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


def write_csv(run_dir: Path) -> None:
    """metrics-<split>.csv from metrics.jsonl: a column per metric, in order of first appearance;
    a record without a metric leaves its cell empty (as a null in the JSON does). Derived, so
    redrawn whole (and not fsynced: metrics.jsonl is the record)."""
    records = read_metrics(run_dir)
    for split in dict.fromkeys(r["split"] for r in records):
        rows = [r for r in records if r["split"] == split]
        columns = list(dict.fromkeys(k for r in rows for k in r if k != "split"))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in columns} for r in rows)
        path = Path(run_dir) / f"metrics-{split}.csv"
        tmp = path.with_name(f".{path.name}.tmp")  # readers see the old or the new file, never half
        tmp.write_text(out.getvalue())
        os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
