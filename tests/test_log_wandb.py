"""log.wandb: Weights & Biases logging, run offline here (no network), checked in the files W&B
writes: the metric names in its run log, the decoded prediction tables, one run id across resume."""

import json
import signal

import pytest

from conftest import interrupt_during_step, tiny_config
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.jobs import pretrain, resume
from lmforge.tasks.mlm import MaskedLMTask
from lmforge.train.log import wandb_mode


@pytest.fixture()
def no_wandb_account(monkeypatch, tmp_path):
    """As on this machine: no API key, no ~/.netrc entry, no WANDB_MODE."""
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def test_auto_mode_is_offline_without_an_account_and_follows_wandb_mode(no_wandb_account, monkeypatch):
    assert wandb_mode("auto") == "offline"
    assert wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"
    with pytest.raises(LmforgeError, match="log.wandb_mode='cloud': use auto, online or offline"):
        load_config(None, ["log.wandb_mode=cloud"])


def test_wandb_gets_the_metrics_the_config_and_the_prediction_tables_and_resume_keeps_the_run(
        tiny_prepared, tmp_path, monkeypatch, no_wandb_account):
    overrides = ("log.wandb=true", "train.max_steps=8", "train.eval_every=4", "train.checkpoint_every=4")
    interrupt_during_step(monkeypatch, MaskedLMTask, 5, signal.SIGINT)
    run_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path, *overrides))
    monkeypatch.undo()
    run_id = (run_dir / "wandb-id.txt").read_text().strip()
    resume(run_dir)
    assert (run_dir / "wandb-id.txt").read_text().strip() == run_id
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # the first process and the resumed one: one W&B run, uploaded together by `wandb sync`
    log = b"".join((r / f"run-{run_id}.wandb").read_bytes() for r in runs)
    for name in (b"train/loss", b"train/grad_norm", b"validation/loss", b"validation/top_prediction_share",
                 b"max_steps", b"whole_word_mask"):  # and the resolved config
        assert name in log, name
    tables = sorted(runs[-1].glob("files/media/table/validation/samples_*.table.json"))
    assert tables
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["input", "targets", "predicted"] and len(table["data"]) == 4
    last = (run_dir / "samples.md").read_text().split("## step 8 ")[1]  # the same rows as the last evaluation's markdown
    assert all(f"| {' | '.join(row)} |" in last.replace("\\|", "|") for row in table["data"])
