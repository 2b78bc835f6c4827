"""Kill anywhere, resume exactly: SIGKILL a real `lmforge` process at random moments, resume it,
and require the same run as one never interrupted.

Each trial starts a tiny run in a subprocess (tests/kill_driver.py), kills it with SIGKILL — during
a step, between forward and backward, in the middle of evaluation, half-way through writing a
checkpoint, after renaming it but before moving `latest`, while pruning old ones, before the
final reports, or simply after a random number of milliseconds — then runs `--resume` and
compares with an uninterrupted run of the same config: every logged train and validation
number, samples.md, the final weights and summary.json must be identical (CPU, bit for bit).
MLM, CLM and fine-tuning each get trials. The default suite runs one trial per task; the slow
suite runs 20 more. Kill moments are drawn from a seeded generator and every failure message
names its plan, so a failing trial can be replayed.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import tiny_config
from lmforge.config import dump_yaml, load_config
from lmforge.train.log import read_metrics

DRIVER = Path(__file__).with_name("kill_driver.py")
TIMING_KEYS = {"tokens_per_s", "data_wait", "rss_mb", "cuda_peak_mb"}  # measurements of the machine, not results
SUMMARY_TIMING_KEYS = {"wall_time_s"}


def write_tiny_reviews(path: Path) -> Path:
    rng = random.Random(0)
    good, bad = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
    lines = ["text\tlabel"]
    for _ in range(120):
        label = rng.randrange(2)
        words = good if label else bad
        lines.append(f"the cat is {rng.choice(words)} and {rng.choice(words)} .\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def scenario_config(task: str, prepared, root: Path) -> tuple[str, Path]:
    """(verb, config file) of a 12-step tiny run with dropout, eval and checkpoints every 4 steps."""
    common = ["train.max_steps=12", "train.eval_every=4", "train.checkpoint_every=4", "train.keep_checkpoints=2",
              "train.log_every=1", "model.dropout=0.1"]
    if task == "classify":
        reviews = write_tiny_reviews(root / "reviews.tsv")
        cfg = load_config(None, [
            "task.name=classify", f"data.dataset={reviews}", f"data.tokenizer={prepared.folder / 'tokenizer.json'}",
            "data.seq_len=16", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
            "model.intermediate_size=64", "model.max_position_embeddings=32", "train.batch_size=8",
            "train.eval_batches=2", "train.progress=false", "optim.lr=3e-3", *common])
        verb = "finetune"
    else:
        extra = ["task.name=clm", "model.arch=gpt"] if task == "clm" else []
        cfg = tiny_config(prepared, root, *extra, *common)
        verb = "pretrain"
    cfg.out_dir = "OUT"  # each run gets its own out_dir on the command line
    path = root / f"{task}.yaml"
    path.write_text(dump_yaml(cfg))
    return verb, path


def run_driver(tmp: Path, plan: dict, argv: list[str], kill_after_armed_s: float | None = None):
    plan_path = tmp / f"plan-{time.monotonic_ns()}.json"
    plan_path.write_text(json.dumps(plan))
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(plan_path), "--", *argv], cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after_armed_s is not None:
        for line in proc.stdout:
            if line.strip() == "ARMED":
                time.sleep(kill_after_armed_s)
                proc.send_signal(signal.SIGKILL)
                break
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def only_run_dir(out_dir: Path) -> Path:
    runs = [p for p in out_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def results(run_dir: Path) -> dict:
    """Everything a run produced that must not depend on having been killed and resumed."""
    records = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir)]
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpts = run_dir / "checkpoints"
    final = ckpts / (ckpts / "latest").read_text().strip()
    samples = run_dir / "samples.md"
    return {"records": records, "summary": {k: v for k, v in summary.items() if k not in SUMMARY_TIMING_KEYS},
            "final": final.name, "weights": load_file(final / "model.safetensors"),
            "samples": samples.read_text() if samples.exists() else None}


class Scenario:
    """One task's uninterrupted reference run, and how often each kill point is reached in it."""

    def __init__(self, task: str, prepared, root: Path):
        root.mkdir(parents=True)
        self.task, self.root = task, root
        self.verb, self.config = scenario_config(task, prepared, root)
        counts_path = root / "counts.json"
        code, out, err = run_driver(root, {"kill": None, "counts": str(counts_path)},
                                    [self.verb, "--config", str(self.config), f"out_dir={root / 'reference'}"])
        assert code == 0, err
        info = json.loads(counts_path.read_text())
        self.counts, self.armed_seconds = info["counts"], info["armed_seconds"]
        self.reference = results(only_run_dir(root / "reference"))

    def draw(self, rng: random.Random) -> dict:
        """A kill moment: a point the run passes through and which pass, or a random time."""
        points = sorted(self.counts)
        choice = rng.choice(points + ["time"])
        if choice == "time":
            return {"point": "time", "after_s": round(rng.uniform(0, self.armed_seconds), 3)}
        return {"point": choice, "n": rng.randint(1, self.counts[choice])}

    def trial(self, kill: dict, name: str) -> None:
        out_dir = self.root / name
        argv = [self.verb, "--config", str(self.config), f"out_dir={out_dir}"]
        timed = kill["point"] == "time"
        code, out, err = run_driver(self.root, {"kill": None if timed else kill}, argv,
                                    kill_after_armed_s=kill["after_s"] if timed else None)
        label = f"{self.task} trial {name} kill={kill}"
        if timed and code == 0:
            pass  # the run ended before the timer: nothing to resume, still must match
        else:
            assert code == -signal.SIGKILL, f"{label}: expected SIGKILL, got exit {code}\n{err[-2000:]}"
            run_dir = only_run_dir(out_dir)
            finished = (run_dir / "summary.json").is_file() and json.loads(
                (run_dir / "summary.json").read_text())["stopped_by"] == "max_steps"
            code, out, err = run_driver(self.root, {"kill": None}, [self.verb, "--resume", str(run_dir)])
            if finished:  # killed while exiting, after summary.json (written last): nothing to redo
                assert code == 2 and "already finished at step" in err, f"{label}: exit {code}\n{err[-2000:]}"
            else:
                assert code == 0, f"{label}: resume failed (exit {code})\n{err[-2000:]}"
        got = results(only_run_dir(out_dir))
        ref = self.reference
        assert got["records"] == ref["records"], f"{label}: logged metrics differ"
        assert got["summary"] == ref["summary"], f"{label}: summary differs"
        assert got["samples"] == ref["samples"], f"{label}: samples.md differs"
        assert got["final"] == ref["final"] and got["weights"].keys() == ref["weights"].keys(), label
        for k, v in ref["weights"].items():
            assert v.equal(got["weights"][k]), f"{label}: final weight {k} differs"
        assert not list((out_dir / only_run_dir(out_dir).name / "checkpoints").glob(".step_*")), \
            f"{label}: a temporary checkpoint folder was left behind"


@pytest.fixture(scope="module")
def scenarios(tiny_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    return {task: Scenario(task, tiny_prepared, root / task) for task in ("mlm", "clm", "classify")}


@pytest.mark.parametrize("task,kill", [
    ("mlm", {"point": "save_file", "n": 3}),  # half-way through the second checkpoint after arming
    ("clm", {"point": "eval_forward", "n": 2}),  # between two evaluation batches
    ("classify", {"point": "loss", "n": 6}),  # between a forward and its backward
])
def test_sigkill_then_resume_equals_the_uninterrupted_run(scenarios, task, kill):
    scenario = scenarios[task]
    assert kill["n"] <= scenario.counts[kill["point"]], "this kill point is never reached; fix the test"
    scenario.trial(kill, f"fixed-{kill['point']}")


@pytest.mark.slow
def test_twenty_random_sigkills_then_resume_equal_the_uninterrupted_run(scenarios):
    rng = random.Random(20261126)
    tasks = ["mlm", "clm", "classify"]
    for i in range(20):
        scenario = scenarios[tasks[i % 3]]
        scenario.trial(scenario.draw(rng), f"random-{i:02d}")
