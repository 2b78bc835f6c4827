"""train.activation_checkpointing: the same losses and weights as without it, in every family,
with dropout on; far fewer bytes kept for the backward; and checkpoints named as without it."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from lmforge.config import ModelConfig
from lmforge.jobs import pretrain
from lmforge.models.registry import build_model
from lmforge.train.log import read_metrics
from lmforge.train import recompute
from lmforge.train.recompute import checkpoint, checkpoint_blocks

FAMILY = {
    "bert": [],
    "gpt": ["task.name=clm"],
    "llama": ["task.name=clm", "model.num_kv_heads=1", "model.layer_norm_eps=1e-6"],
    "modernbert": ["model.local_window=8", "model.global_every=2", "model.layer_norm_eps=1e-5"],
    "deberta": ["model.position_buckets=8", "model.max_relative_positions=16", "model.layer_norm_eps=1e-7"],
}


@pytest.mark.parametrize("arch", FAMILY)
def test_a_run_with_it_trains_exactly_as_one_without(tiny_prepared, tmp_path, monkeypatch, arch):
    calls = []
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))

    def run(name, *more):
        run_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / name, f"model.arch={arch}", *FAMILY[arch],
                                          "model.dropout=0.1", "train.max_steps=4", "train.eval_every=4",
                                          "train.checkpoint_every=4", "train.precision=fp32", *more))
        losses = [r["loss"] for r in read_metrics(run_dir) if r["split"] in ("train", "validation")]
        return losses, load_file(run_dir / "checkpoints" / "step_00000004" / "model.safetensors")

    plain_losses, plain = run("plain")
    assert not calls
    ckpt_losses, ckpt = run("ckpt", "train.activation_checkpointing=true")
    assert len(calls) == 4 * 2  # every training step recomputes both blocks; evaluation none
    assert ckpt_losses == plain_losses  # dropout masks replayed: exactly the same steps
    assert set(ckpt) == set(plain) and all(torch.equal(ckpt[k], plain[k]) for k in plain)


def test_blocks_keep_only_their_inputs_for_the_backward():
    cfg = ModelConfig(vocab_size=100, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=128,
                      max_position_embeddings=64, dropout=0.0)
    ids = torch.randint(5, 100, (4, 64))

    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model.bert(ids)
        out.sum().backward()
        return total

    torch.manual_seed(0)
    plain = saved_bytes(build_model(cfg))
    torch.manual_seed(0)
    model = build_model(cfg)
    assert checkpoint_blocks(model) == 4
    kept = saved_bytes(model)
    assert kept < 0.3 * plain, (kept, plain)
