"""The `lmforge` command as a user runs it: help, one-line errors with exit code 2, predict."""

import json
import subprocess
import sys

import pytest

from conftest import tiny_config
from lmforge.cli import main
from lmforge.pretrain import pretrain


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("verb", ["prepare", "pretrain", "predict"])
def test_every_verb_has_help(verb):
    proc = run_cli(verb, "--help")
    assert proc.returncode == 0 and "usage: lmforge " + verb in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["pretrain", "train.max_step=5"], "error: unknown config key 'train.max_step'; did you mean 'train.max_steps'?"),
    (["pretrain", "--config", "missing.yaml"], "error: config file not found: missing.yaml"),
    (["pretrain", "model.num_heads=3"], "error: model.num_heads=3 does not divide model.hidden_size=128"),
    (["prepare", "--corpus", "no-such-corpus", "--out", "x"], "error: unknown corpus 'no-such-corpus'"),
    (["predict", "no-such-run", "a [MASK]"], "error: no-such-run is neither an lmforge run directory"),
    (["pretrain", "--resume", "no-such-run"], "error: no-such-run is not an lmforge run directory"),
])
def test_bad_input_is_one_line_on_stderr_with_exit_code_2(args, message, tmp_path):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message)
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_print_config_shows_the_resolved_config(capsys):
    assert main(["pretrain", "--print-config", "train.max_steps=77"]) == 0
    assert "max_steps: 77" in capsys.readouterr().out


def test_predict_prints_top_k_per_mask_as_text_and_json(tiny_prepared, tmp_path, capsys):
    run_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path, "train.max_steps=3"))
    capsys.readouterr()
    assert main(["predict", str(run_dir), "the cat [MASK] the hill.", "[MASK] dog [MASK]", "--top-k", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [len(item["masks"]) for item in out] == [1, 2]
    for item in out:
        for candidates in item["masks"]:
            assert len(candidates) == 3
            probs = [c["prob"] for c in candidates]
            assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert main(["predict", str(run_dir), "the cat [MASK] the hill."]) == 0
    assert "[MASK] #1:" in capsys.readouterr().out
    assert main(["predict", str(run_dir), "no mask here"]) == 2


def test_prepare_trains_a_bpe_vocabulary_and_refuses_to_overwrite(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["prepare", "--corpus", str(tiny_corpus), "--train-tokenizer", "300", "--kind", "bpe",
                 "--val-frac", "0.2", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "gpt2" and manifest["tokenizer"]["vocab_size"] == 300
    assert main(["prepare", "--corpus", str(tiny_corpus), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
