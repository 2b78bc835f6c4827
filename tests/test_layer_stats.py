"""log.layer_stats (lmforge/train/layerstats.py): per block, at each logging step, the gradient norm,
the update-to-weight ratio and the output RMS, equal to what they mean; training itself unchanged;
a non-finite loss names the block it was born in; report.png gains a row for them."""

import math

import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_config
from lmforge.errors import LmforgeError
from lmforge.jobs import pretrain
from lmforge.tasks.mlm import MaskedLMTask
from lmforge.train.layerstats import LayerStats, first_nonfinite
from lmforge.train.log import read_metrics

BLOCKS = ("bert.layers.0", "bert.layers.1")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_the_statistics_are_the_norms_they_name():
    model = Toy()
    stats = LayerStats(model)
    assert [n for n, _ in stats.blocks] == ["layers.0", "layers.1"]
    x = torch.randn(3, 4)
    with stats.watching():
        out = model(x)
    out.sum().backward()
    grads = stats.grad_norms()
    expected = torch.cat([p.grad.flatten() for p in model.layers[1].parameters()]).norm()
    assert float(grads["layers.1"]) == pytest.approx(float(expected), rel=1e-6)
    stats.before_update()
    before = torch.cat([p.detach().flatten() for p in model.layers[0].parameters()]).clone()
    with torch.no_grad():
        model.layers[0].weight.add_(0.01)
    after = torch.cat([p.detach().flatten() for p in model.layers[0].parameters()])
    record = stats.record(grads, stats.update_ratios())
    assert record["layers.0/update_ratio"] == pytest.approx(float((after - before).norm() / before.norm()), rel=1e-5)
    assert record["layers.1/update_ratio"] == 0.0  # untouched
    assert record["layers.1/act_rms"] == pytest.approx(float(out.detach().pow(2).mean().sqrt()), rel=1e-6)
    assert not model.layers[0]._forward_hooks  # the hooks are gone after the logging step


def test_a_run_logs_them_each_logging_step_without_changing_training(tiny_prepared, tmp_path):
    args = ("train.max_steps=6", "train.log_every=2", "train.checkpoint_every=1", "train.keep_checkpoints=10")
    plain_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "plain", *args))
    run_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "stats", *args, "log.layer_stats=true"))
    train = [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert train == [r["loss"] for r in read_metrics(plain_dir) if r["split"] == "train"]  # bit for bit
    layers = [r for r in read_metrics(run_dir) if r["split"] == "layers"]
    assert [r["step"] for r in layers] == [2, 4, 6]
    for block in BLOCKS:
        assert all(r[f"{block}/grad_norm"] > 0 and r[f"{block}/act_rms"] > 0 for r in layers)
    # the update ratio of step 4 is the change between the checkpoints of steps 3 and 4
    w3, w4 = (load_file(str(run_dir / "checkpoints" / f"step_0000000{k}" / "model.safetensors")) for k in (3, 4))
    names = [n for n in w3 if n.startswith("bert.layers.1.")]
    delta = torch.cat([(w4[n] - w3[n]).flatten() for n in names]).norm()
    ratio = float(delta / torch.cat([w3[n].flatten() for n in names]).norm())
    assert layers[1]["bert.layers.1/update_ratio"] == pytest.approx(ratio, rel=1e-4)
    # report.png gains its second row
    assert Image.open(run_dir / "report.png").size[1] > 1.8 * Image.open(plain_dir / "report.png").size[1]


def test_a_non_finite_loss_names_the_block_it_started_in(tiny_prepared, tmp_path, monkeypatch, capsys):
    create = MaskedLMTask.create.__func__

    def poisoned(cls, cfg):
        task = create(cls, cfg)
        with torch.no_grad():  # one weight of the second block: its output is the first non-finite one
            task.model.bert.layers[1].attention.query.weight[0, 0] = math.inf
        return task
    monkeypatch.setattr(MaskedLMTask, "create", classmethod(poisoned))
    cfg = tiny_config(tiny_prepared, tmp_path, "log.layer_stats=true", "train.max_nonfinite_steps=2")
    with pytest.raises(LmforgeError, match="not finite for 2 steps"):
        pretrain(cfg)
    said = capsys.readouterr()
    assert "the first block whose numbers left the finite range: bert.layers.1 (its output)" in said.out + said.err
    run_dir = next(tmp_path.glob("mlm.*"))
    assert [r["nonfinite_block"] for r in read_metrics(run_dir) if "nonfinite_block" in r] == \
        ["bert.layers.1 (its output)"] * 2


def test_first_nonfinite_says_none_when_every_block_is_finite_and_finds_a_backward_nan():
    model = Toy()
    stats = LayerStats(model)
    assert first_nonfinite(stats, lambda: model(torch.randn(2, 4)).sum()) is None
    model.zero_grad()
    # a NaN born in the backward of the top block: its output is finite, its gradient is not
    model.layers[1].weight.register_hook(lambda g: g * float("nan"))
    assert first_nonfinite(stats, lambda: model(torch.randn(2, 4)).sum()) == "layers.1 (its gradient)"
    model.zero_grad()
    assert first_nonfinite(stats, lambda: model(torch.randn(2, 4)).sum() * float("nan")) is None  # the loss's own
