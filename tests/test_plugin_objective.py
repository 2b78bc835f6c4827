"""A new objective, defined entirely in this file, trained through lmforge's public API.

`MajorityTask` (task.name=toy-majority) learns whether a row of random bits holds more ones than
zeros, with a small MLP. Nothing under lmforge/ knows it: it is registered here with
`lmforge.register_objective`, and it gets what every built-in objective gets — the one loop, a run
directory, checkpoints, exact resume after a kill, `lmforge report`, `lmforge.load`. This is the
shape of the README's "Add your own objective".

The kill test trains it from the command line, `lmforge pretrain task.plugin=THIS_FILE
task.name=toy-majority ...`, in a process of its own that it kills, then resumes with `lmforge
pretrain --resume` in another: config.yaml keeps task.plugin, so the new process finds the toy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lmforge
from lmforge.tasks.base import Batch, EvalResult, LossOutput, Table, Task

BITS = 11  # odd: a row always has a majority


class MajorityModel(nn.Module):
    """bits (batch, BITS) float -> logits (batch, 2): [fewer ones, more ones]."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(BITS, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, 2))

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        return self.net(bits)


@lmforge.register_objective
class MajorityTask(Task):
    name = "toy-majority"
    verb = "pretrain"

    def __init__(self, cfg, model: nn.Module):
        self.cfg, self.model = cfg, model
        self._val: Batch | None = None

    # -- a run of it: model and (synthetic) data; nothing to write beside config.yaml ---------
    @classmethod
    def build_model(cls, cfg) -> nn.Module:
        return MajorityModel(cfg.model.hidden_size, cfg.model.dropout)

    @classmethod
    def create(cls, cfg) -> "MajorityTask":
        torch.manual_seed(cfg.train.seed)
        return cls(cfg, cls.build_model(cfg))

    @classmethod
    def headline(cls, summary: dict) -> str:
        return f"toy majority: validation accuracy {summary['val_accuracy']:.1%}, loss {summary['val_loss']:.4f}"

    # -- batches: row g of step s is drawn from its own generator, keyed by (seed, s, g) ---------
    def _rows(self, key: str, step: int, rows: range) -> Batch:
        # (an integer seed: Python's hash() of a string differs between processes)
        base = self.cfg.train.seed * 1_000_003 + {"train": 0, "validation": 1}[key] * 100_003 + step * 10_007
        bits = torch.stack([torch.randint(0, 2, (BITS,), generator=torch.Generator().manual_seed(base + g))
                            for g in rows]).float()
        if os.environ.get("TOY_KILL_AT_STEP") == str(step) and key == "train":
            os.kill(os.getpid(), signal.SIGKILL)  # the kill test: the process dies mid-step
        labels = (bits.sum(1) > BITS / 2).long()
        return Batch({"bits": bits, "labels": labels}, num_targets=len(rows), num_tokens=len(rows) * BITS)

    def train_batch(self, step: int, micro: int) -> Batch:
        return self._rows("train", step, self.step_rows(micro, self.step_shape(step).rows))

    def data_state(self) -> dict:
        return {}  # a batch is a function of (seed, step) alone

    def load_data_state(self, state: dict) -> None:
        pass

    # -- loss and metrics -----------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        logits = model(batch.tensors["bits"]).float()
        labels = batch.tensors["labels"]
        return LossOutput(F.cross_entropy(logits, labels, reduction="sum"),
                          {"accuracy": (logits.argmax(-1) == labels).sum()})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult:
        if self._val is None:
            self._val = self._rows("validation", 0, range(self.eval_sizes()[0]))
        was_training = model.training
        model.eval()
        t = {k: v.to(device) for k, v in self._val.tensors.items()}
        logits = model(t["bits"]).float()
        model.train(was_training)
        predicted = logits.argmax(-1)
        metrics = {"loss": F.cross_entropy(logits, t["labels"]).item(),
                   "accuracy": (predicted == t["labels"]).float().mean().item()}
        table = Table(["bits", "target", "predicted"],
                      [["".join(str(int(b)) for b in t["bits"][r].tolist()), str(int(t["labels"][r])),
                        str(int(predicted[r]))] for r in range(3)])
        return EvalResult(metrics, table.markdown(), table)

    def summary(self, last_eval: dict[str, float]) -> dict[str, float]:
        return {"val_loss": last_eval["loss"], "val_accuracy": last_eval["accuracy"]}


SETTINGS = {"task__name": "toy-majority", "model__hidden_size": 32, "model__dropout": 0.1,
            "train__max_steps": 150, "train__batch_size": 32, "train__eval_every": 50, "train__eval_batches": 8,
            "train__checkpoint_every": 10, "train__log_every": 1, "train__progress": False,
            "train__precision": "fp32", "train__device": "cpu", "optim__lr": 1e-2, "optim__warmup_frac": 0.05,
            "log__tensorboard": True}


def _train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_a_toy_objective_defined_in_a_test_file_trains_through_the_public_api(tmp_path):
    run = lmforge.pretrain(None, out_dir=str(tmp_path), **SETTINGS)
    assert run.dir.parent == tmp_path and run.dir.name.startswith("toy-majority.")
    for name in ("config.yaml", "hparams.json", "env.json", "githash.log", "metrics.jsonl", "summary.json",
                 "report.png", "samples.md"):
        assert (run.dir / name).is_file(), name
    assert list((run.dir / "tb").iterdir()) and (run.dir / "checkpoints" / "latest").exists()
    # it learned: majority of 11 bits is easy for an MLP, a coin flip is 50%
    assert run.summary["val_accuracy"] >= 0.85 and run.summary["steps"] == 150
    first, last = run.metrics("validation")[0], run.metrics("validation")[-1]
    assert last["loss"] < first["loss"]
    # loaded back through the registry: the toy's own model with the final weights
    model, tokenizer, config = lmforge.load(run.dir)
    assert isinstance(model, MajorityModel) and tokenizer is None and config.task.name == "toy-majority"
    bits = torch.tensor([[1.0] * 6 + [0.0] * 5, [0.0] * 8 + [1.0] * 3])
    assert model(bits).argmax(-1).tolist() == [1, 0]
    # a verb for another kind of model says so in one line
    with pytest.raises(lmforge.LmforgeError, match="fills in \\[MASK\\] with a masked-LM run"):
        lmforge.predict(run, ["the [MASK]"])


def test_lmforge_report_draws_the_toy_run_and_the_cli_prints_its_headline(tmp_path, capsys):
    from lmforge.cli import main

    run = lmforge.pretrain(None, out_dir=str(tmp_path / "runs"), **{**SETTINGS, "train__max_steps": 20})
    assert main(["report", str(run.dir), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp.png").stat().st_size > 10_000 and "toy-majority" in (tmp_path / "cmp.html").read_text()
    # the CLI resumes it and prints the objective's own headline
    assert main(["pretrain", "--resume", str(run.dir), "train.max_steps=30"]) == 0
    out = capsys.readouterr().out
    assert "toy majority: validation accuracy" in out and "30 steps" in out


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`lmforge ARGS` in a process of its own, which knows the toy only through task.plugin."""
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_a_toy_run_killed_mid_step_resumes_to_exactly_the_uninterrupted_run(tmp_path):
    overrides = [f"{k.replace('__', '.')}={str(v).lower() if isinstance(v, bool) else v}"
                 for k, v in SETTINGS.items()] + ["train.max_steps=40"]
    overrides.append(f"task.plugin={__file__}")  # the command line finds the toy through this file
    whole = _cli("pretrain", f"out_dir={tmp_path / 'whole'}", *overrides)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _cli("pretrain", f"out_dir={tmp_path / 'killed'}", *overrides, env={"TOY_KILL_AT_STEP": "25"})
    assert killed.returncode == -signal.SIGKILL  # died in step 26, after the checkpoint of step 20
    (cut,) = (tmp_path / "killed").iterdir()
    assert not (cut / "summary.json").exists() and max(_train_losses(cut)) == 25
    resumed = _cli("pretrain", "--resume", str(cut))  # config.yaml names the plug-in: a new process finds it
    assert "toy majority: validation accuracy" in resumed.stdout
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (ref,) = (tmp_path / "whole").iterdir()
    assert _train_losses(cut) == _train_losses(ref)  # bit for bit, every step (21-25 again from the checkpoint)
    from safetensors.torch import load_file

    weights = [load_file(next((d / "checkpoints").glob("step_*40")) / "model.safetensors") for d in (cut, ref)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    assert json.loads((cut / "summary.json").read_text())["val_accuracy"] == \
        json.loads((ref / "summary.json").read_text())["val_accuracy"]
