"""Metrics logging: one JSON object per line in metrics.jsonl, TensorBoard event files, CSV,
and Weights & Biases (log.wandb).

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
import uuid
from pathlib import Path
from typing import Any, Optional

from lmforge.errors import LmforgeError
from lmforge.files import write_text_atomic


class MetricsLogger:
    def __init__(self, run_dir: Path, resume_step: Optional[int] = None, tensorboard: bool = True,
                 keep_eval_at_resume_step: bool = True, csv: bool = False, wandb: Optional[dict] = None):
        """`keep_eval_at_resume_step=False` also drops a validation record AT resume_step: the
        evaluation a stopped run makes where it stopped, which an uninterrupted run would not.
        `wandb`: the resolved config (as a dict) to log to Weights & Biases with, or None."""
        self.run_dir, self.csv = run_dir, csv
        self.wandb = WandbLogger(run_dir, wandb, resume=resume_step is not None) if wandb is not None else None
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
            for k, v in scalars(record).items():
                self.tb.add_scalar(f"{split}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(step, split, record)
        if self.csv and split == "validation":
            write_csv(self.run_dir)

    def samples(self, tag: str, markdown: str, table: Any, step: int) -> None:
        """Decoded examples: markdown to TensorBoard, the table (tasks/base.py Table) to W&B."""
        if self.tb is not None:
            self.tb.add_text(tag, markdown, step)
        if self.wandb is not None and table is not None:
            self.wandb.table(tag, table, step)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.csv:
            write_csv(self.run_dir)
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


class NullLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's files)."""

    def log(self, step: int, split: str, **metrics: Any) -> None:
        pass

    def samples(self, tag: str, markdown: str, table: Any, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class WandbLogger:
    """The run's records in Weights & Biases, under RUN_DIR/wandb. One W&B run per lmforge run:
    its id is kept in RUN_DIR/wandb-id.txt and a resumed run continues it. The x-axis is the
    logged `step` (not W&B's own counter), so a resumed run's records (which repeat, with the
    same values, those logged after the last checkpoint) never clash with W&B's rule that its
    counter only grows."""

    def __init__(self, run_dir: Path, config: dict, resume: bool):
        try:
            import wandb
        except ImportError:
            raise LmforgeError("log.wandb=true needs the wandb package: pip install wandb") from None
        log = config["log"]
        id_file = run_dir / "wandb-id.txt"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:12]
        write_text_atomic(id_file, run_id + "\n")
        self.mode = wandb_mode(log["wandb_mode"])
        self.wandb = wandb
        try:
            self.run = wandb.init(project=log["wandb_project"], name=run_dir.name, id=run_id, resume="allow",
                                  dir=str(run_dir), config=config, mode=self.mode,
                                  settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        except Exception as e:  # wandb's errors (no network, bad key, bad project) have many classes
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LmforgeError(f"W&B could not start a {self.mode} run: {first}; set log.wandb_mode=offline "
                               f"(or log.wandb=false)") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        where = f"{run_dir}/wandb" + (" (upload later: wandb sync " + f"{run_dir}/wandb/offline-run-*)"
                                      if self.mode == "offline" else "")
        print(f"lmforge: W&B run {run_id} ({self.mode}) in {where}")

    def log(self, step: int, split: str, record: dict) -> None:
        self.run.log({"step": step, **{f"{split}/{k}": v for k, v in scalars(record).items()}})

    def table(self, tag: str, table: Any, step: int) -> None:
        self.run.log({"step": step, tag: self.wandb.Table(columns=list(table.columns), data=table.rows)})

    def close(self) -> None:
        self.run.finish()


def wandb_mode(mode: str) -> str:
    """log.wandb_mode=auto: WANDB_MODE when set, else online when an API key is set up (the
    WANDB_API_KEY variable or `wandb login`'s ~/.netrc entry) and api.wandb.ai answers within
    3 s, else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    keyed = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    if not keyed:
        return "offline"
    import socket

    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
    except OSError:
        return "offline"
    return "online"


def scalars(record: dict) -> dict:
    """The numbers of a record that go to TensorBoard and W&B (not step and split, not nulls)."""
    return {k: v for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and v is not None}


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
        write_text_atomic(Path(run_dir) / f"metrics-{split}.csv", out.getvalue())  # never half a file


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
