"""A step is a function of its global batch alone: the same rows, masks and loss however the step
is cut into micro-batches (train.batch_size x train.grad_accum_steps), for every task. One
property over every task, end to end through the training loop (fp32, dropout 0); and a run
resumed with another split continues exactly as if it had never stopped.

Ranks are the third way to cut a step: tests/test_distributed.py runs the same comparison under
torchrun (2 processes against one)."""

from __future__ import annotations

import pytest
import torch

from conftest import interrupt_during_step, tiny_config
from lmforge.jobs import finetune
from lmforge.jobs import pretrain, resume
from lmforge.tasks.mlm import MaskedLMTask
from lmforge.train.log import read_metrics
from test_finetune import _cfg, tiny_reviews  # noqa: F401  (a fixture)

SPLITS = [("8", "1"), ("4", "2"), ("2", "4")]  # train.batch_size x train.grad_accum_steps = 8 rows a step
EXACT = ["model.dropout=0", "train.precision=fp32", "train.max_steps=4", "train.eval_every=100",
         "train.checkpoint_every=100", "train.log_every=1"]
PRETRAINING = {
    "mlm": [],
    "mlm+nsp": ["mlm.nsp=true"],
    "whole-word": ["mlm.whole_word_mask=true"],
    "electra": ["task.name=electra"],
    "clm": ["model.arch=gpt", "task.name=clm", "data.tokenizer=gpt2", "data.train_tokenizer_vocab=300"],
    "distill-mlm": ["task.name=distill-mlm"],  # + the teacher, made below
}


def _train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]


@pytest.fixture(scope="module")
def mlm_teacher(tiny_prepared, tmp_path_factory):
    run_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path_factory.mktemp("teacher"), "train.max_steps=6",
                                      "model.num_layers=2"))
    return run_dir


@pytest.mark.parametrize("task", PRETRAINING)
def test_a_pretraining_step_is_the_same_whatever_micro_batches_it_is_cut_into(task, tiny_prepared, tmp_path,
                                                                              mlm_teacher):
    extra = PRETRAINING[task] + ([f"distill.teacher={mlm_teacher}"] if task == "distill-mlm" else [])
    if task == "clm":  # CLM reads the corpus through its own byte-level tokenizer
        extra = [e for e in extra if not e.startswith("data.tokenizer")]
    losses = {}
    for batch, accum in SPLITS:
        cfg = tiny_config(tiny_prepared, tmp_path / f"{batch}x{accum}", *EXACT, *extra,
                          f"train.batch_size={batch}", f"train.grad_accum_steps={accum}")
        run_dir, _ = pretrain(cfg)
        losses[batch, accum] = _train_losses(run_dir)
    reference = losses[SPLITS[0]]
    assert len(reference) == 4 and all(torch.isfinite(torch.tensor(reference)))
    for split in SPLITS[1:]:
        torch.testing.assert_close(losses[split], reference, rtol=1e-5, atol=0, msg=f"{task}: {split} vs 8 x 1")


@pytest.mark.parametrize("task", ["classify", "distill"])
def test_a_fine_tuning_step_is_the_same_whatever_micro_batches_it_is_cut_into(task, tiny_prepared, tiny_reviews,
                                                                              tmp_path):
    extra = []
    if task == "distill":
        teacher_dir, _ = finetune(_cfg(tiny_prepared, tmp_path / "teacher", tiny_reviews, "train.max_steps=4"))
        extra = ["task.name=distill", f"distill.teacher={teacher_dir}", "distill.student_layers=1"]
    losses = {}
    # 160 training examples in steps of 48: the fourth step is an epoch's short last one (16 examples)
    for batch, accum in [("48", "1"), ("12", "4"), ("8", "6")]:
        cfg = _cfg(tiny_prepared, tmp_path / f"{batch}x{accum}", tiny_reviews, *EXACT, *extra,
                   f"train.batch_size={batch}", f"train.grad_accum_steps={accum}", "train.max_steps=5")
        run_dir, _ = finetune(cfg)
        losses[batch, accum] = _train_losses(run_dir)
    reference = losses["48", "1"]
    assert len(reference) == 5
    for split, got in losses.items():
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=0, msg=f"{task}: {split} vs 48 x 1")


def test_a_run_resumed_with_another_split_continues_exactly(tiny_prepared, tmp_path, monkeypatch):
    """8 x 1 stopped after step 4, resumed as 4 x 2: the losses of one uninterrupted 8 x 1 run."""
    common = [*EXACT, "mlm.nsp=true", "train.max_steps=8"]
    whole, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "whole", *common))
    interrupt_during_step(monkeypatch, MaskedLMTask, 3)  # SIGINT in step 4: it finishes, checkpoints, stops
    cut, summary = pretrain(tiny_config(tiny_prepared, tmp_path / "cut", *common))
    assert summary["stopped_by"] == "signal" and len(_train_losses(cut)) == 4
    monkeypatch.undo()
    resume(cut, ["train.batch_size=4", "train.grad_accum_steps=2"])
    torch.testing.assert_close(_train_losses(cut), _train_losses(whole), rtol=1e-5, atol=0)
