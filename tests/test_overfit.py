"""The overfit test (train.overfit_batches, lmforge/train/overfit.py): every objective drives the
loss of one repeated batch under 5% of its start, and says so; a broken setup (a learning rate of
10, a frozen model) gets "did not overfit" and what to look at; an overfit run resumes exactly."""

import json
import math

import pytest

from conftest import tiny_config, tiny_finetune_config
from lmforge.jobs import finetune, pretrain, resume
from lmforge.train.log import read_metrics
from lmforge.train.overfit import OverfitBatches, OverfitWatch
from test_clm import bpe_prepared, gpt_config  # noqa: F401 (a fixture)
from test_finetune import tiny_reviews  # noqa: F401 (a fixture)

# one batch, no dropout, no weight decay: nothing but the optimizer between the model and the batch
OVERFIT = ("train.overfit_batches=1", "model.dropout=0", "optim.weight_decay=0", "optim.warmup_frac=0.05",
           "train.eval_every=1000", "train.checkpoint_every=1000", "train.log_every=10")


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]


def assert_overfit_ok(run_dir, summary, columns):
    assert summary["overfit"] == "ok", summary
    assert summary["overfit_loss_ratio"] <= 0.05 and "overfit_hint" not in summary
    assert 1 <= summary["overfit_reached_step"] <= summary["steps"]
    report = (run_dir / "overfit.md").read_text()
    assert f"ok, under 5% at step {summary['overfit_reached_step']}" in report
    assert all(c in report for c in columns)  # the decoded last batch


@pytest.mark.parametrize("objective, extra, columns", [
    ("mlm", ("train.max_steps=150",), ("| input | targets | predicted |",)),
    ("nsp", ("mlm.nsp=true", "train.max_steps=150"), ("| input | targets | predicted |",)),
    # ELECTRA's generator is a quarter of the width (8 here): it needs a higher rate to learn the
    # batch by heart (at 3e-3 it is at 5.9% of its first loss after 300 steps; at 1e-2, 5% at ~100)
    ("electra", ("task.name=electra", "mlm.mask_token_frac=1.0", "mlm.random_token_frac=0.0", "optim.lr=1e-2",
                 "train.max_steps=200"),
     ("discriminator input",)),
])
def test_each_encoder_objective_overfits_one_batch(tiny_prepared, tmp_path, objective, extra, columns):
    run_dir, summary = pretrain(tiny_config(tiny_prepared, tmp_path, *OVERFIT, "optim.lr=3e-3", *extra))
    assert_overfit_ok(run_dir, summary, columns)
    # the mask was the same every step: the loss of the repeated batch fell steadily (a fresh
    # batch each step would stay near the corpus's entropy)
    losses = train_losses(run_dir)
    assert losses[-1] < 0.05 * losses[0]


def test_the_decoded_table_shows_the_batch_predicted_back(tiny_prepared, tmp_path):
    run_dir, summary = pretrain(tiny_config(tiny_prepared, tmp_path, *OVERFIT, "train.max_steps=150", "optim.lr=3e-3"))
    lines = [line for line in (run_dir / "overfit.md").read_text().splitlines() if line.startswith("| ")]
    assert lines[0] == "| input | targets | predicted |"
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]
    # after overfitting, the predictions at the masked places are the targets
    assert len(rows) == 4 and all(targets == predicted and targets for _, targets, predicted in rows)


def test_a_gpt_overfits_one_batch(bpe_prepared, tmp_path):  # noqa: F811
    run_dir, summary = pretrain(gpt_config(bpe_prepared, tmp_path, *OVERFIT, "train.max_steps=150"))
    assert_overfit_ok(run_dir, summary, ("| input | targets (next tokens) | predicted |",))


def test_a_classifier_overfits_two_batches(tiny_prepared, tiny_reviews, tmp_path):  # noqa: F811
    cfg = tiny_finetune_config(tiny_prepared, tmp_path, tiny_reviews, "train.overfit_batches=2",
                               "train.max_steps=60", "train.eval_every=60", "train.checkpoint_every=60",
                               "classify.rating_weight=0")
    run_dir, summary = finetune(cfg)
    assert_overfit_ok(run_dir, summary, ("| text | true | predicted |",))


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_a_learning_rate_of_10_does_not_overfit_and_says_what_to_look_at(tiny_prepared, bpe_prepared, tmp_path,  # noqa: F811
                                                                          capsys, family):
    broken = (*OVERFIT, "train.max_steps=60", "optim.lr=10", "optim.warmup_frac=0")
    cfg = tiny_config(tiny_prepared, tmp_path, *broken) if family == "bert" else gpt_config(bpe_prepared, tmp_path, *broken)
    run_dir, summary = pretrain(cfg)
    assert summary["overfit"] == "did not overfit" and summary["overfit_reached_step"] is None
    assert "optim.lr=10" in summary["overfit_hint"] and "lr-find" in summary["overfit_hint"]
    said = capsys.readouterr()
    assert "did not overfit" in said.out + said.err and "what to look at: " in said.out + said.err
    assert "did not overfit" in (run_dir / "overfit.md").read_text()
    assert summary["overfit_loss_ratio"] > 0.05 or not math.isfinite(summary["overfit_loss_ratio"])


def test_the_verdict_names_a_frozen_model_a_stall_and_a_non_finite_loss():
    frozen = OverfitWatch(1, 0.05, trainable=0, total=100)
    for step in range(1, 6):
        frozen.observe(step, 7.0, 0.0)
    assert not frozen.ok and "frozen" in frozen.result()["overfit_hint"]
    half = OverfitWatch(1, 0.05, trainable=10, total=100)
    half.observe(1, 7.0, 1.0)
    assert "only 10 of 100 parameters are trainable" in half.result()["overfit_hint"]
    stall = OverfitWatch(1, 0.05, trainable=100, total=100)
    for step, loss in enumerate([8.0, 4.0, 2.0, 1.0], start=1):
        stall.observe(step, loss, 1.0)
    hint = stall.result({"lr": 1e-4})["overfit_hint"]
    assert "12.5% of its first value" in hint and "optim.lr=0.0001" in hint
    jumpy = OverfitWatch(1, 0.05, trainable=100, total=100)
    for step, loss in enumerate([10.0, 23.0, 11.0, 6.0, 5.2], start=1):
        jumpy.observe(step, loss, 1.0)
    assert "rose to 23 (2.3x its first value) at step 2" in jumpy.result({"lr": 0.3})["overfit_hint"]
    assert "optim.lr=0.3 is probably too high" in jumpy.result({"lr": 0.3})["overfit_hint"]
    nan = OverfitWatch(1, 0.05, trainable=100, total=100)
    nan.observe(1, 8.0, 1.0)
    nan.observe(2, math.nan, math.nan)
    assert nan.nonfinite_step == 2 and "non-finite at step 2" in nan.result()["overfit_hint"]
    good = OverfitWatch(1, 0.05, trainable=100, total=100)
    for step, loss in enumerate([8.0, 1.0, 0.3, 0.2], start=1):
        good.observe(step, loss, 1.0)
    assert good.ok and good.reached_step == 3 and good.verdict().endswith("ok, under 5% at step 3")


def test_the_batches_are_drawn_once_in_step_order_and_repeat():
    drawn = []

    def draw(k):
        drawn.append(k)
        return [f"batch {k}"]
    batches = OverfitBatches(3, start_state={"position": 0})
    assert [batches.at(s, draw)[0] for s in (4, 0, 1, 2, 3, 5)] == ["batch 1", "batch 0", "batch 1", "batch 2",
                                                                  "batch 0", "batch 2"]
    assert drawn == [0, 1, 2] and batches.data_state() == {"position": 0}


def test_an_overfit_run_resumes_exactly(tiny_prepared, tmp_path):
    # a constant learning rate: the 5-step run resumed to 12 trains as the 12-step run does
    args = (*OVERFIT, "train.overfit_batches=2", "train.log_every=1", "optim.lr=3e-3", "optim.schedule=constant",
            "optim.warmup_frac=0")
    full_dir, full = pretrain(tiny_config(tiny_prepared, tmp_path / "full", *args, "train.max_steps=12"))
    # stopped at step 5: in the middle of the 2-batch cycle
    half_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "half", *args, "train.max_steps=5",
                                       "train.checkpoint_every=5"))
    state = json.loads((half_dir / "checkpoints" / "step_00000005" / "state.json").read_text())
    assert state["data"] == json.loads((full_dir / "checkpoints" / "step_00000000" / "state.json").read_text())["data"]
    _, resumed = resume(half_dir, ["train.max_steps=12"])
    assert train_losses(half_dir) == train_losses(full_dir)  # bit for bit
    assert resumed["overfit_last_loss"] == full["overfit_last_loss"]
