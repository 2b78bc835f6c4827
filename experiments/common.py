"""Shared parts of the experiment scripts: the command line they all take (--out, --json, --smoke,
key=value overrides, --rounds where they time something), the folder their runs go to, the tiny
movie-review set of --smoke runs, the timing rounds and the JSON-or-text report.

Each experiment trains real runs through lmforge.jobs and prints what they show; stdout holds
only the report (the runs' progress lines go to stderr), so `--json` output can be piped.
tests/test_experiments.py runs each script in its tiny --smoke setting to keep it working.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

CONFIGS = ROOT / "configs"


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of the script's docstring `doc`."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_run_options(parser: argparse.ArgumentParser, *, rounds: Optional[int] = None,
                    smoke: str = "a few steps of each: checks the script runs",
                    overrides: Optional[str] = None) -> None:
    """The options every experiment takes, after its own: --rounds (timing rounds, when `rounds`
    is its default), --out, --json, --smoke (`smoke` is its help) and, when `overrides` is given
    (what they apply to), positional key=value config overrides."""
    if rounds is not None:
        parser.add_argument("--rounds", type=int, default=rounds, help=f"timing rounds (default {rounds})")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder, removed)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--smoke", action="store_true", help=smoke)
    if overrides is not None:
        parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides for {overrides}")


def add_run_dir_options(parser: argparse.ArgumentParser) -> None:
    """The options of a script that studies finished fine-tuning runs: the run directories,
    --json and --smoke (a tiny run of its own instead)."""
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="fine-tuning runs of a negative/positive classifier")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--smoke", action="store_true", help="a tiny run on made-up reviews, 64 examples a set")


def parse_run_dir_options(parser: argparse.ArgumentParser):
    """parser's arguments, refused in one line without a run directory or --smoke; args.out is None
    (what --smoke trains goes to a scratch folder, removed)."""
    args = parser.parse_args()
    if not args.runs and not args.smoke:
        parser.error("give a fine-tuning run directory (or --smoke)")
    args.out = None
    return args


@contextlib.contextmanager
def runs_folder(args, prefix: str) -> Iterator[tuple[Path, Path]]:
    """(out, scratch): the folder the runs go to (args.out, or else `scratch`) and a temporary
    folder named `prefix`..., removed on leaving, for files of this invocation only (--smoke's
    data). Inside, stdout goes to stderr: the runs' progress lines; stdout is for the report."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, contextlib.redirect_stdout(sys.stderr):
        yield (Path(args.out) if args.out else Path(tmp)), Path(tmp)


def tiny_reviews(path: Path) -> Path:
    """A made-up movie-review set at `path` (TSV: text, label; 200 four-word reviews): --smoke's data."""
    lines = ["text\tlabel"] + [f"the film is {w} .\t{label}" for i in range(100)
                               for w, label in (("good" if i % 2 else "great", 1), ("bad" if i % 2 else "dull", 0))]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_classifier(scratch: Path) -> list[str]:
    """Overrides of configs/mr-minilm.yaml for a --smoke classifier: a 1-layer, hidden-32 BERT from
    random weights, 2 steps on tiny_reviews (written under `scratch`), runs in `scratch`."""
    return [f"data.dataset={tiny_reviews(scratch / 'reviews.tsv')}", "model.init_from=null",
            "data.tokenizer=bert-base-uncased", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
            "model.intermediate_size=64", "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2",
            "classify.evaluate_ood=false", "train.progress=false", f"out_dir={scratch}"]


def median_seconds(models: dict, rounds: int, work: Callable[[object], object]) -> dict[str, float]:
    """{name: median seconds of work(model)} over `rounds` alternating rounds (each model once per
    round, in turn), under torch.inference_mode."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                work(model)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def accuracy_summary(accuracies: list[float]) -> dict[str, float]:
    """mean, std (0 for a single run), min and max of `accuracies`."""
    return {"mean": statistics.mean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "min": min(accuracies), "max": max(accuracies)}


def print_report(report: dict, as_json: bool, print_text: Callable[[dict], None]) -> int:
    """Print `report` as JSON, or as text by print_text(report); the script's exit status (0)."""
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_text(report)
    return 0
