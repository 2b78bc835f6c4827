"""The Python API (lmforge/api.py): the README's examples run as written, and each function does
what its verb does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lmforge
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    """The first ```python block under `## heading` in the README."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_readmes_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    scope: dict = {}
    exec(readme_block("From Python"), scope)
    run, model, config = scope["run"], scope["model"], scope["config"]
    assert run.dir.resolve().parent == (tmp_path / "runs").resolve() and run.summary["steps"] == 200
    assert [r["step"] for r in run.metrics("validation")] == [100, 200]
    printed = capsys.readouterr().out
    assert f"{run.summary['val_loss']}" in printed and "'token':" in printed  # the prediction's dict
    assert type(model).__name__ == "BertForMaskedLM" and config.train.max_steps == 200


def test_the_readmes_own_objective_trains_and_loads_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(readme_block("Add your own objective"), scope)
    run = scope["run"]
    assert run.config.task.name == "bits-majority" and run.summary["steps"] == 100
    assert (run.dir / "checkpoints" / "latest").exists() and (run.dir / "report.png").is_file()
    model, _, _ = lmforge.load(run.dir)
    assert isinstance(model, type(scope["Majority"].build_model(run.config)))


def test_keyword_overrides_are_config_keys_and_go_through_the_same_checks(tiny_prepared, tmp_path):
    cfg = lmforge.make_config(None, [f"data.corpus={tiny_prepared.folder}"], train__max_steps=7,
                              optim__lr=5e-4, train__progress=False, model__vocab_size=None)
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.train.progress, cfg.model.vocab_size) == (7, 5e-4, False, None)
    with pytest.raises(lmforge.LmforgeError, match="did you mean 'train.max_steps'"):
        lmforge.make_config(None, train__max_stepz=7)
    with pytest.raises(lmforge.LmforgeError, match="must be at least 1"):
        lmforge.make_config(None, train__max_steps=0)
    # finetune's task.name is classify unless the config or the overrides say otherwise
    assert lmforge.make_config(None, default_task="classify").task.name == "classify"
    assert lmforge.make_config(None, ["task.name=mlm"], default_task="classify").task.name == "mlm"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("task:\n  name: clm\nmodel:\n  arch: gpt\n")
    assert lmforge.make_config(yaml_file, default_task="classify").task.name == "clm"


def test_pretrain_resume_and_run_open_agree_with_the_run_directory(tiny_prepared, tmp_path):
    cfg = tiny_config(tiny_prepared, tmp_path, "train.max_steps=4", "train.checkpoint_every=2")
    run = lmforge.pretrain(cfg)
    assert run.summary["steps"] == 4 and run.config.train.max_steps == 4
    longer = lmforge.resume(run, train__max_steps=6)
    assert longer.dir == run.dir and longer.summary["steps"] == 6 and longer.config.train.max_steps == 6
    opened = lmforge.Run.open(run.dir)
    assert opened.summary == longer.summary and [r["step"] for r in opened.metrics("train")] == list(range(1, 7))
    with pytest.raises(lmforge.LmforgeError, match="is a pretraining run; continue it with `lmforge pretrain --resume`"):
        lmforge.resume(run, verb="finetune")
    with pytest.raises(lmforge.LmforgeError, match="not an lmforge run directory"):
        lmforge.Run.open(tmp_path)
    assert "Run(" in repr(opened) and "task=mlm" in repr(opened)
