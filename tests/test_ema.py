"""optim.ema_decay: the weight average's formula, that the loop evaluates and hands out the
average while training the raw weights unchanged, and its exact resume."""

import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupt_during_step, tiny_config
from lmforge.distributed import Parallel, make_engine
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.jobs import pretrain, resume
from lmforge.tasks.loading import load_model
from lmforge.tasks.mlm import MaskedLMTask
from lmforge.train.ema import WeightAverage, decay_at
from lmforge.train.log import read_metrics


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(3, 2)
        self.head = torch.nn.Linear(2, 3, bias=False)
        self.head.weight = self.emb.weight  # one parameter under two names
        self.norm = torch.nn.LayerNorm(2)


def test_the_average_follows_its_formula_with_the_warm_up_and_tied_weights_stay_one():
    assert decay_at(0.9, 0) == pytest.approx(0.1) and decay_at(0.9, 1) == pytest.approx(2 / 11)
    assert decay_at(0.9, 1000) == 0.9  # the warm-up term has passed the decay
    model = Tied()
    avg = WeightAverage(model, 0.5)
    expected = model.emb.weight.detach().clone()
    for k in range(4):
        with torch.no_grad():
            model.emb.weight.fill_(float(k + 1))
        avg.update()
        d = min(0.5, (1 + k) / (10 + k))
        expected = d * expected + (1 - d) * (k + 1)
    assert avg.updates == 4
    state = avg.state_dict()
    assert torch.allclose(state["emb.weight"], expected) and torch.equal(state["emb.weight"], state["head.weight"])
    assert torch.equal(model.emb.weight, torch.full((3, 2), 4.0))  # state_dict swapped the model's weights back
    avg.copy_to_model()
    assert torch.allclose(model.head.weight, expected)


def _losses(run_dir, split="train"):
    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == split]


def test_a_run_trains_the_raw_weights_evaluates_the_average_and_hands_it_out(tiny_prepared, tmp_path, monkeypatch):
    plain_dir, plain = pretrain(tiny_config(tiny_prepared, tmp_path / "plain"))
    evaluated = []
    original = MaskedLMTask.evaluate

    def evaluate(self, model, device):  # what the model holds when it is evaluated
        evaluated.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return original(self, model, device)

    monkeypatch.setattr(MaskedLMTask, "evaluate", evaluate)
    ema_dir, ema = pretrain(tiny_config(tiny_prepared, tmp_path / "ema", "optim.ema_decay=0.8"))
    monkeypatch.undo()
    # the optimizer trains the same raw weights: identical training losses, identical model.safetensors
    assert _losses(ema_dir) == _losses(plain_dir)
    last = ema_dir / "checkpoints" / "step_00000012"
    raw, average = load_file(last / "model.safetensors"), load_file(last / "ema.safetensors")
    plain_raw = load_file(plain_dir / "checkpoints" / "step_00000012" / "model.safetensors")
    assert all(torch.equal(raw[k], plain_raw[k]) for k in raw)
    assert set(average) == set(raw) and not all(torch.equal(raw[k], average[k]) for k in raw)
    # every evaluation saw the average, and the final one (at step 12) saw exactly the checkpoint's
    assert len(evaluated) == 2 and all(torch.equal(evaluated[-1][n], average[n]) for n in evaluated[-1])
    assert ema["val_loss"] != plain["val_loss"]
    # readers of the run get the average
    loaded = load_model(ema_dir).model.state_dict()
    assert all(torch.equal(loaded[k], average[k]) for k in average)


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_a_resumed_run_has_the_uninterrupted_runs_average_bit_for_bit(tiny_prepared, tmp_path, monkeypatch, sig):
    overrides = ("optim.ema_decay=0.8", "model.dropout=0.1")
    full_dir, full = pretrain(tiny_config(tiny_prepared, tmp_path / "full", *overrides))
    interrupt_during_step(monkeypatch, MaskedLMTask, 7, sig)
    cut_dir, cut = pretrain(tiny_config(tiny_prepared, tmp_path / "cut", *overrides))
    assert cut["steps"] == 8
    monkeypatch.undo()
    _, resumed = resume(cut_dir)
    assert _losses(cut_dir) == _losses(full_dir) and _losses(cut_dir, "validation") == _losses(full_dir, "validation")
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(full_dir / "checkpoints" / "step_00000012" / name)
        b = load_file(cut_dir / "checkpoints" / "step_00000012" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed["val_loss"] == full["val_loss"]


def test_a_damaged_average_makes_resume_fall_back_to_the_checkpoint_before(tiny_prepared, tmp_path, capsys):
    run_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path, "optim.ema_decay=0.8", "train.keep_checkpoints=3",
                                      "train.max_steps=6", "train.checkpoint_every=3", "train.eval_every=3"))
    (run_dir / "checkpoints" / "step_00000006" / "ema.safetensors").write_bytes(b"not tensors")
    resume(run_dir, ["train.max_steps=9"])
    assert "step_00000006 is damaged: ema.safetensors" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "step_00000009" / "ema.safetensors").is_file()


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_the_average_under_a_sharding_strategy_is_refused_in_one_line(strategy):
    cfg = load_config(None, ["optim.ema_decay=0.99", f"distributed.strategy={strategy}"])
    with pytest.raises(LmforgeError, match=f"optim.ema_decay averages whole parameters on each rank, and "
                                           f"distributed.strategy={strategy} shards them"):
        make_engine(torch.nn.Linear(2, 2), cfg, Parallel(rank=0, world=2), torch.device("cpu"), "fp32",
                    lambda m: pytest.fail("no optimizer is made before the refusal"))


@pytest.mark.parametrize("value", ["1.0", "0", "-0.5"])
def test_a_decay_outside_zero_to_one_is_refused(value):
    with pytest.raises(LmforgeError, match=rf"optim.ema_decay={float(value)} must be in \(0, 1\)"):
        load_config(None, [f"optim.ema_decay={value}"])


def test_two_ddp_ranks_keep_the_average_one_process_keeps(tiny_prepared, tmp_path):
    import os
    import subprocess
    import sys

    from lmforge.config import dump_yaml

    cfg = tiny_config(tiny_prepared, tmp_path, "model.dropout=0", "train.precision=fp32", "train.num_threads=1",
                      "train.max_steps=6", "train.eval_every=6", "train.checkpoint_every=6", "optim.ema_decay=0.8")
    config = tmp_path / "run.yaml"
    config.write_text(dump_yaml(cfg))
    runs = {}
    for name, launcher, batch in (("one", [], 8), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                          "--nproc_per_node=2"], 4)):
        argv = [sys.executable, *launcher, "-m", "lmforge", "pretrain", "--config", str(config),
                f"train.batch_size={batch}", "distributed.strategy=ddp", f"out_dir={tmp_path / name}"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=dict(os.environ))
        assert proc.returncode == 0, proc.stderr[-3000:]
        (runs[name],) = (tmp_path / name).iterdir()
    a, b = (load_file(runs[n] / "checkpoints" / "step_00000006" / "ema.safetensors") for n in ("one", "two"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    val = {n: [r["loss"] for r in read_metrics(runs[n]) if r["split"] == "validation"] for n in runs}
    assert val["two"] == pytest.approx(val["one"], rel=1e-4)
