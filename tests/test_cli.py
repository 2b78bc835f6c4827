"""The `lmforge` command as a user runs it: help, one-line errors with exit code 2, predict."""

import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from lmforge.cli import main
from lmforge.jobs import pretrain


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, cwd=cwd)


def _verb_parsers() -> dict:
    """{verb: its sub-parser}, read from the parser `lmforge` itself builds."""
    import argparse

    from lmforge.cli import build_parser

    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


VERBS = sorted(_verb_parsers())


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    import re

    assert {"prepare", "pretrain", "finetune", "predict", "plan"} <= set(VERBS)  # the parser was read
    with pytest.raises(SystemExit) as exit_:  # `lmforge --help` lists the verb
        main(["--help"])
    assert exit_.value.code == 0 and re.search(rf"^ +{re.escape(verb)}( |$)", capsys.readouterr().out, re.M)
    sub = _verb_parsers()[verb]
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lmforge " + verb)
    flat = "".join(out.split())  # argparse wraps lines (also after hyphens): compare without whitespace
    assert sub.description and "".join(sub.description.split()) in flat
    for action in sub._actions:  # each of this verb's own options and positionals, with its help line
        names = action.option_strings or [action.metavar or action.dest]
        assert all(name in out for name in names), (verb, names)
        if action.help and "%(" not in action.help:
            assert "".join(action.help.split()) in flat, (verb, action.help)


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


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_a_reader_that_leaves_early_stops_lmforge_quietly_without_a_traceback(unbuffered, tmp_path):
    # a real pipe whose read end is closed before lmforge writes: its first write (unbuffered) or its
    # flush (buffered) meets EPIPE, as under `lmforge pretrain --list-keys | head -1` once head has gone
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    try:
        proc = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--list-keys"], stdout=write,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.stderr == "" and proc.returncode == 1


def test_list_keys_piped_into_head_prints_the_first_key_and_no_traceback(tmp_path):
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m lmforge pretrain --list-keys | head -1"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout == "model.arch\n"
    assert "Traceback" not in proc.stderr, proc.stderr


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
