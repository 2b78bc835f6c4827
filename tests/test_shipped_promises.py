"""Promises that held only on paths the CPU tests never reached (issue 17): fp16 loss scaling
under an engine that scales the loss itself (DeepSpeed), one precision rule for `auto` and for
the refusal when a run starts, and keys that are either acted on or refused, never silently overwritten."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import interrupt_during_step, tiny_config
from lmforge.config import load_config
from lmforge.distributed.engine import Engine
from lmforge.errors import LmforgeError
from lmforge.jobs import pretrain, resume
from lmforge.tasks.mlm import MaskedLMTask
from lmforge.train import loop
from lmforge.train.machine import check_environment, resolve_precision


# -- fp16: the scaler the engine really uses ----------------------------------------------------

class SelfScalingEngine(Engine):
    """A one-process engine that, like DeepSpeed, scales the fp16 loss itself: the loop must not
    add torch's GradScaler, and the checkpoint must carry this engine's scale state."""

    loaded: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = {"cur_scale": 1024.0, "cur_iter": 0}

    def make_grad_scaler(self, precision, device):
        return None

    def step(self, max_norm, loss_sum, scaler=None):
        assert scaler is None
        self.scale["cur_iter"] += 1
        return super().step(max_norm, loss_sum, None)

    def loss_scale_state(self, scaler):
        return dict(self.scale)

    def load_loss_scale_state(self, scaler, state):
        SelfScalingEngine.loaded.append(state)
        self.scale = dict(state)

    def loss_scale(self, scaler):
        return self.scale["cur_scale"]


def test_fp16_resume_uses_the_engines_own_loss_scaler_and_restores_its_state(tiny_prepared, tmp_path, monkeypatch):
    def make_engine(model, cfg, par, device, precision, make_optimizer):
        return SelfScalingEngine(model, make_optimizer(model))

    monkeypatch.setattr(loop, "make_engine", make_engine)

    def no_grad_scaler(*args, **kwargs):
        raise AssertionError("the loop made torch's GradScaler beside an engine that scales the loss itself")

    monkeypatch.setattr(torch.amp, "GradScaler", no_grad_scaler)
    interrupt_during_step(monkeypatch, MaskedLMTask, 3)
    cfg = tiny_config(tiny_prepared, tmp_path, "train.precision=fp16", "train.max_steps=6")
    run_dir, summary = pretrain(cfg)
    assert summary["stopped_by"] == "signal"
    SelfScalingEngine.loaded.clear()
    monkeypatch.undo()  # no more SIGINT
    monkeypatch.setattr(loop, "make_engine", make_engine)
    monkeypatch.setattr(torch.amp, "GradScaler", no_grad_scaler)
    resume(run_dir)  # old code: GradScaler on resume, the loss scaled twice
    assert SelfScalingEngine.loaded == [{"cur_scale": 1024.0, "cur_iter": 4}]  # the state saved after step 4


def _fake_deepspeed_engine(fp16: bool):
    from lmforge.distributed.zero import DeepSpeedEngine

    engine = object.__new__(DeepSpeedEngine)
    scaler = SimpleNamespace(cur_scale=2.0 ** 16, cur_iter=7, last_overflow_iter=3, cur_hysteresis=2)
    engine.ds = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=scaler), fp16_enabled=lambda: fp16)
    return engine, scaler


def test_deepspeed_fp16_keeps_its_own_loss_scale_and_it_round_trips_through_the_checkpoint_state():
    engine, scaler = _fake_deepspeed_engine(fp16=True)
    assert engine.make_grad_scaler("fp16", torch.device("cpu")) is None  # no second scaler
    state = engine.loss_scale_state(None)
    assert state == {"cur_scale": 65536.0, "cur_iter": 7, "last_overflow_iter": 3, "cur_hysteresis": 2}
    fresh, fresh_scaler = _fake_deepspeed_engine(fp16=True)
    fresh_scaler.cur_scale, fresh_scaler.cur_iter = 1.0, 0
    fresh.load_loss_scale_state(None, state)
    assert (fresh_scaler.cur_scale, fresh_scaler.cur_iter, fresh_scaler.last_overflow_iter) == (65536.0, 7, 3)
    assert fresh.loss_scale(None) == 65536.0
    # a GradScaler's state (a run started under another strategy) carries its scale over
    fresh.load_loss_scale_state(None, {"scale": 512.0, "growth_factor": 2.0})
    assert fresh_scaler.cur_scale == 512.0
    bf16, _ = _fake_deepspeed_engine(fp16=False)
    assert bf16.loss_scale_state(None) is None and bf16.loss_scale(None) is None


def test_a_plain_engine_in_fp16_uses_torchs_grad_scaler_and_takes_a_deepspeed_scale_over():
    model = torch.nn.Linear(2, 2)
    engine = Engine(model, torch.optim.AdamW(model.parameters()))
    assert engine.make_grad_scaler("fp32", torch.device("cpu")) is None
    scaler = engine.make_grad_scaler("fp16", torch.device("cpu"))
    assert isinstance(scaler, torch.amp.GradScaler)
    engine.load_loss_scale_state(scaler, {"cur_scale": 256.0, "cur_iter": 9})
    assert scaler.get_scale() == 256.0 and engine.loss_scale_state(scaler)["scale"] == 256.0


# -- one precision rule ---------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
@pytest.mark.parametrize("bf16", [True, False])
def test_auto_precision_never_picks_what_a_run_start_refuses(monkeypatch, strategy, bf16):
    # the refusal depends on the launcher's processes: a run-start check (check_environment), not
    # config validation, which holds on any machine
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    chosen = resolve_precision(torch.device("cuda"), "auto", strategy, 2)
    assert chosen == ("bf16" if bf16 else "fp32" if strategy == "fsdp" else "fp16")
    check_environment(load_config(None, [f"distributed.strategy={strategy}", f"train.precision={chosen}"]), 2)
    fsdp_fp16 = load_config(None, ["distributed.strategy=fsdp", "train.precision=fp16"])  # fine in one process
    check_environment(fsdp_fp16, 1)
    if strategy == "fsdp":
        with pytest.raises(LmforgeError, match="fp16 with distributed.strategy=fsdp"):
            check_environment(fsdp_fp16, 2)


# -- keys act or are refused ----------------------------------------------------------------------

def test_grad_accum_steps_that_disagree_with_tokens_per_step_are_refused_not_overwritten(tmp_path):
    with pytest.raises(LmforgeError, match="train.grad_accum_steps=3 but train.tokens_per_step=4096"):
        load_config(None, ["data.seq_len=128", "train.batch_size=16", "train.tokens_per_step=4096",
                           "train.grad_accum_steps=3"])
    agreed = load_config(None, ["data.seq_len=128", "train.batch_size=16", "train.tokens_per_step=4096",
                                "train.grad_accum_steps=2"])
    assert agreed.train.grad_accum_steps == 2
    assert load_config(None, ["data.seq_len=128", "train.batch_size=8", "train.tokens_per_step=4096"]
                       ).train.grad_accum_steps == 4
    # a saved run config holds the derived value; an override of batch_size derives it again
    saved = tmp_path / "config.yaml"
    saved.write_text("data:\n  seq_len: 128\ntrain:\n  batch_size: 16\n  tokens_per_step: 4096\n  grad_accum_steps: 2\n")
    assert load_config(saved, ["train.batch_size=8"]).train.grad_accum_steps == 4
    saved.write_text("data:\n  seq_len: 128\ntrain:\n  batch_size: 16\n  tokens_per_step: 4096\n  grad_accum_steps: 5\n")
    with pytest.raises(LmforgeError, match="set one of the two"):
        load_config(saved)


def test_a_next_sentence_head_that_disagrees_with_mlm_nsp_is_refused():
    with pytest.raises(LmforgeError, match="model.next_sentence_head=true but mlm.nsp=false"):
        load_config(None, ["model.next_sentence_head=true"])
    with pytest.raises(LmforgeError, match="model.next_sentence_head=false but mlm.nsp=true"):
        load_config(None, ["mlm.nsp=true", "model.next_sentence_head=false"])
    assert load_config(None, ["mlm.nsp=true"]).model.next_sentence_head is True
    assert load_config(None, ["mlm.nsp=true", "model.next_sentence_head=true"]).model.next_sentence_head is True


def test_eval_batch_size_acts_for_masked_and_causal_lm_without_changing_the_result(tiny_prepared, tmp_path):
    """train.eval_batch_size was read by classification alone: now every task's evaluation reads
    its validation set that many rows at a time, and the set and its masks do not depend on it."""
    from lmforge.jobs import build_model
    from lmforge.data.prepared import fill_vocab_size

    results = {}
    for size in ("null", "3", "16"):
        cfg = fill_vocab_size(tiny_config(tiny_prepared, tmp_path, "model.dropout=0", f"train.eval_batch_size={size}"),
                              tiny_prepared.tokenizer)
        torch.manual_seed(0)
        task = MaskedLMTask(cfg, tiny_prepared, build_model(cfg))
        batches = task.eval_batches()
        assert sum(b.tensors["input_ids"].size(0) for b in batches) == 16  # eval_batches=2 x batch 8
        results[size] = (len(batches), task.evaluate(task.model, torch.device("cpu")).metrics)
    assert [n for n, _ in results.values()] == [2, 6, 1]
    for _, metrics in results.values():
        assert metrics["masked_tokens"] == results["null"][1]["masked_tokens"]
        assert metrics["loss"] == pytest.approx(results["null"][1]["loss"], rel=1e-5)
