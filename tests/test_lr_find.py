"""`lmforge lr-find` (lmforge/lrfind.py): the exponential learning-rate sweep, the smoothing and the
suggestions read off it, and a real sweep on a tiny config that writes its picture and JSON and
nothing else (no run directory, no file replaced)."""

import json
import math

import pytest

from conftest import tiny_config
from lmforge.cli import main
from lmforge.lrfind import lr_at, lr_find, smooth, suggest


def test_the_learning_rate_grows_exponentially_from_start_to_end():
    lrs = [lr_at(k, 5, 1e-6, 1e-2) for k in range(5)]
    assert lrs == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2])


def test_smoothing_is_a_bias_corrected_moving_average():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards zero at the start
    s = smooth([1.0, 3.0], beta=0.5)
    assert s == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_a_centred_median_neither_lags_nor_keeps_a_single_spike():
    from lmforge.lrfind import centred
    losses = [10.0 - k for k in range(10)]
    assert centred(losses, 2)[2:8] == losses[2:8]  # a straight line is left where it is: no lag
    assert centred([5.0, 5.0, 5.0, 50.0, 5.0, 5.0, 5.0], 2) == [5.0] * 7


def test_the_suggestions_are_the_steepest_point_and_the_minimum():
    # a loss falling fastest at lr 1e-3 (log10 = -3), lowest at 1e-1, diverging after it
    lrs = [10 ** (-6 + 6 * k / 60) for k in range(61)]
    curve = [5 - 2 * math.tanh(2 * (math.log10(x) + 3)) + max(0.0, math.log10(x) + 1) ** 2 * 40 for x in lrs]
    steepest, minimum, suggested = suggest(lrs, curve)
    assert steepest == pytest.approx(1e-3, rel=0.3)
    assert minimum == pytest.approx(1e-1, rel=0.3)
    assert suggested == steepest
    assert suggest(lrs, [5.0 + k for k in range(61)]) == (None, None, None)  # never fell: no suggestion


def test_a_sweep_writes_its_picture_and_curve_and_no_run(tiny_prepared, tmp_path):
    cfg = tiny_config(tiny_prepared, tmp_path / "runs")
    out = tmp_path / "lr-find.png"
    test = lr_find(cfg, "tiny", out, steps=40, start=1e-5, end=10, progress=False)
    assert test.picture == str(out) and out.stat().st_size > 10_000
    curve = json.loads(out.with_suffix(".json").read_text())
    assert curve["lrs"][0] == pytest.approx(1e-5) and len(curve["lrs"]) == len(curve["losses"]) <= 40
    # lr 10 on a tiny BERT diverges before the end, and the loss fell on the way there
    assert test.stopped in ("diverged", "non-finite") and len(test.lrs) < 40
    assert test.suggested_lr is not None and 1e-5 < test.suggested_lr < 1
    assert test.suggested_lr == test.steepest_lr and test.minimum_lr > test.steepest_lr
    assert not (tmp_path / "runs").exists()  # it does not count as a run
    again = lr_find(cfg, "tiny", out, steps=20, start=1e-5, end=10, progress=False)
    assert again.picture == str(tmp_path / "lr-find-2.png")  # the first picture is kept
    assert json.loads(out.with_suffix(".json").read_text()) == curve


def test_the_command_prints_the_override_and_refuses_a_bad_range(tiny_prepared, tmp_path, capsys):
    args = [f"data.corpus={tiny_prepared.folder}", "data.seq_len=32", "model.hidden_size=32", "model.num_layers=1",
            "model.num_heads=2", "model.intermediate_size=64", "model.max_position_embeddings=64",
            "train.batch_size=8", f"out_dir={tmp_path / 'runs'}"]
    assert main(["lr-find", *args, "--steps", "30", "--start", "1e-5", "--out", str(tmp_path / "f.png")]) == 0
    said = capsys.readouterr().out
    assert "lr-find: suggested optim.lr=" in said and "wrote " in said
    assert main(["lr-find", *args, "--start", "1", "--end", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "0 < --start < --end" in err and "Traceback" not in err
