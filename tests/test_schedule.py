"""Step shapes that change during training (lmforge/train/schedule.py): BERT's sequence-length
schedule and GPT-3's batch-size ramp — the shapes, the loop following them, and exact resume
across a change."""

import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupt_during_step, tiny_config
from lmforge.api import make_config
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.jobs import pretrain, resume
from lmforge.tasks.clm import CausalLMTask
from lmforge.tasks.mlm import MaskedLMTask
from lmforge.train.log import read_metrics
from lmforge.train.machine import check_environment
from lmforge.train.optim import lr_at
from lmforge.train.schedule import BatchSchedule, StepShape

SEQ_SCHEDULE = ("data.seq_len=16", "data.long_seq_len=32", "data.short_seq_frac=0.5", "train.batch_size=8")
RAMP = ("train.batch_size=4", "train.grad_accum_steps=4", "train.batch_ramp_start_tokens=128",
        "train.batch_ramp_tokens=2000")  # micro-batches of 4 x 32 = 128 tokens: 1 -> 4 of them


def _train(run_dir):
    return [r for r in read_metrics(run_dir) if r["split"] == "train"]


def test_sequence_length_schedule_keeps_tokens_per_step_and_switches_at_the_share():
    cfg = load_config(None, ["train.max_steps=1000", "data.long_seq_len=512", "train.batch_size=32"])
    s = BatchSchedule(cfg, world=2)
    assert s.at(0) == s.at(899) == StepShape(128, 32, 1)  # default: 90% of the steps at 128
    assert s.at(900) == s.at(999) == StepShape(512, 8, 1)
    assert s.step_tokens(0) == s.step_tokens(999) == 2 * 32 * 128
    assert s.progress(500) == (500, 1000) and s.varies
    plain = BatchSchedule(load_config(None, ["train.max_steps=10"]))
    assert not plain.varies and plain.at(9) == StepShape(128, 32, 1) and plain.progress(3) == (3, 10)


def test_batch_ramp_grows_whole_micro_batches_linearly_in_tokens_and_the_lr_follows_tokens():
    cfg = load_config(None, ["train.max_steps=400", "train.batch_size=8", "data.seq_len=128",
                             "train.grad_accum_steps=8", "train.batch_ramp_start_tokens=1024",
                             "train.batch_ramp_tokens=200000"])
    s = BatchSchedule(cfg)
    micro = [s.at(step).micro_batches for step in range(400)]
    assert micro[0] == 1 and micro[-1] == 8 and micro == sorted(micro) and set(micro) == set(range(1, 9))
    seen = 0
    for step in range(400):  # each step is the linear ramp at the tokens before it, rounded to micro-batches
        wanted = 1024 + (8192 - 1024) * min(1.0, seen / 200000)
        assert micro[step] == max(1, min(8, round(wanted / 1024)))
        seen += micro[step] * 1024
    assert s.tokens_before[-1] == seen
    full = micro.index(8)
    assert 180000 <= s.tokens_before[full] <= 200000 + 8192  # full size once the ramp's tokens are seen
    # the LR schedule advances by tokens: a 1-micro-batch step moves it 1/8 of a full step
    pos, total = s.progress(1)
    assert pos == pytest.approx(1 / 8) and total == pytest.approx(seen / 8192)
    assert s.progress(400)[0] == pytest.approx(total)
    assert lr_at(*s.progress(0), cfg.optim) == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_frac)


@pytest.mark.parametrize("overrides, message", [
    (["data.long_seq_len=64"], "must be longer than data.seq_len"),
    (["data.long_seq_len=1024"], "at most model.max_position_embeddings=512"),
    (["data.long_seq_len=512", "train.batch_size=3"], "use a train.batch_size that is a multiple of 4"),
    (["data.long_seq_len=512", "data.short_seq_frac=1"], "data.short_seq_frac=1.0 must be in"),
    (["data.long_seq_len=512", "task.name=classify"], "not for task.name=classify"),
    (["train.batch_ramp_start_tokens=1000"], "needs train.grad_accum_steps >= 2"),
    (["train.batch_ramp_start_tokens=99999", "train.grad_accum_steps=2"], "must be below the full step of 8192"),
    (["train.batch_ramp_start_tokens=0", "train.grad_accum_steps=2"], "must be positive"),
])
def test_schedule_settings_that_cannot_work_are_refused_with_what_to_change(overrides, message):
    # every check a run makes before it starts: the config's, the objective's (classify refuses the
    # sequence-length schedule) and the one that depends on the number of processes (the ramp's start)
    with pytest.raises(LmforgeError, match=message):
        check_environment(make_config(None, overrides), 1)


def test_mlm_trains_short_then_long_and_learns_the_long_positions_only_after_the_switch(tiny_prepared, tmp_path):
    cfg = tiny_config(tiny_prepared, tmp_path, *SEQ_SCHEDULE)
    run_dir, summary = pretrain(cfg)
    records = _train(run_dir)
    assert [r["seq_len"] for r in records] == [16] * 6 + [32] * 6
    assert {r["step_tokens"] for r in records} == {8 * 16}  # 8 x 16, then 4 x 32
    assert summary["tokens_seen"] == 12 * 128

    def positions(step):
        return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")[
            "bert.embeddings.position.weight"]
    start, switch, end = positions(0), positions(6), positions(12)
    # positions 16..31 are only used by the long steps (AdamW's weight decay does not touch
    # embeddings here: optim.decay=linear)
    assert torch.equal(start[16:32], switch[16:32]) and not torch.equal(switch[16:32], end[16:32])
    assert not torch.equal(start[:16], switch[:16]) and torch.equal(start[32:], end[32:])


@pytest.mark.parametrize("at_step", [3, 8])  # stops before the switch (at 6) and after it
def test_resume_across_the_sequence_length_switch_is_bit_exact(tiny_prepared, tmp_path, monkeypatch, at_step):
    full_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "full", *SEQ_SCHEDULE))
    interrupt_during_step(monkeypatch, MaskedLMTask, at_step, signal.SIGINT)
    cut_dir, cut = pretrain(tiny_config(tiny_prepared, tmp_path / "cut", *SEQ_SCHEDULE))
    assert cut["stopped_by"] == "signal" and cut["steps"] == at_step + 1
    monkeypatch.undo()
    resume(cut_dir)
    assert [(r["step"], r["loss"]) for r in _train(cut_dir)] == [(r["step"], r["loss"]) for r in _train(full_dir)]
    a = load_file(full_dir / "checkpoints" / "step_00000012" / "model.safetensors")
    b = load_file(cut_dir / "checkpoints" / "step_00000012" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nsp_pairs_follow_the_sequence_length_schedule(tiny_prepared, tmp_path):
    run_dir, summary = pretrain(tiny_config(tiny_prepared, tmp_path, *SEQ_SCHEDULE, "mlm.nsp=true",
                                            "train.max_steps=4"))
    assert [r["seq_len"] for r in _train(run_dir)] == [16, 16, 32, 32]
    assert "val_nsp_accuracy" in summary


def test_clm_follows_the_sequence_length_schedule_and_resumes_exactly(tiny_prepared, tmp_path, monkeypatch):
    # the BERT-tokenized tiny corpus is fine for a causal LM's mechanics
    gpt = ("model.arch=gpt", "task.name=clm", *SEQ_SCHEDULE)
    full_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "full", *gpt))
    assert [r["seq_len"] for r in _train(full_dir)] == [16] * 6 + [32] * 6
    interrupt_during_step(monkeypatch, CausalLMTask, 4, signal.SIGINT)
    cut_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "cut", *gpt))
    monkeypatch.undo()
    resume(cut_dir)
    assert [r["loss"] for r in _train(cut_dir)] == [r["loss"] for r in _train(full_dir)]


def test_the_loop_follows_the_batch_ramp_and_its_token_clock(tiny_prepared, tmp_path):
    cfg = tiny_config(tiny_prepared, tmp_path, *RAMP)
    run_dir, summary = pretrain(cfg)
    s = BatchSchedule(cfg)
    records = _train(run_dir)
    assert [r["step_tokens"] for r in records] == [s.step_tokens(i) for i in range(12)]
    assert records[0]["step_tokens"] == 128 and records[-1]["step_tokens"] == 512
    assert [r["tokens"] for r in records][-1] == summary["tokens_seen"] == s.tokens_before[-1]
    assert [r["lr"] for r in records] == pytest.approx([lr_at(*s.progress(i), cfg.optim) for i in range(12)])


def test_resume_in_the_middle_of_the_batch_ramp_is_bit_exact(tiny_prepared, tmp_path, monkeypatch):
    full_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "full", *RAMP))
    interrupt_during_step(monkeypatch, MaskedLMTask, 2, signal.SIGTERM)
    cut_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "cut", *RAMP))
    monkeypatch.undo()
    resume(cut_dir)
    assert [(r["loss"], r["lr"]) for r in _train(cut_dir)] == [(r["loss"], r["lr"]) for r in _train(full_dir)]
