"""`lmforge plan --config` (lmforge/runplan.py): parameters equal to transformers' models of the
same shape, FLOPs counted on the real model (and the textbook formula beside them), activations
that scale with the rows, memory shared out as each strategy shards it, and the command's output."""

import json

import pytest
import torch


from conftest import tiny_config
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.runplan import (_model_and_config, _probe_rows, counted_flops_per_token, flops_per_token,
                             malloc_in_use, memory_per_rank, parameter_counts, plan_config, step_memory)
from lmforge.tasks import registry
from test_layout import ROOT


def test_the_real_size_configs_count_what_transformers_counts():
    bert_cfg, bert = _model_and_config(load_config(ROOT / "configs" / "bert-base.yaml", ["mlm.nsp=false"]))
    assert parameter_counts(bert_cfg, bert)["unpadded"] == 109_514_298  # BertForMaskedLM(bert-base-uncased)
    gpt_cfg, gpt = _model_and_config(load_config(ROOT / "configs" / "gpt2-124m.yaml"))
    counts = parameter_counts(gpt_cfg, gpt)
    assert counts["unpadded"] == 124_439_808 and counts["all"] == 124_439_808 + 47 * 768  # GPT2LMHeadModel
    assert counts["hidden_matrices"] == 12 * (4 * 768 * 768 + 2 * 768 * 3072)  # the blocks' 2-D weights


def test_counted_flops_agree_with_the_formula_where_lmforge_runs_every_position(tiny_prepared, tmp_path):
    gpt_cfg, meta = _model_and_config(tiny_config(tiny_prepared, tmp_path, "model.arch=gpt", "task.name=clm"))
    counted, formula = counted_flops_per_token(gpt_cfg, 32), flops_per_token(gpt_cfg, meta, 32)
    assert counted == pytest.approx(formula, rel=0.05)  # causal attention counts half its scores: a little under
    # a masked LM's vocabulary projection runs on the masked positions only: the counted FLOPs follow the mask
    bert_cfg, _ = _model_and_config(tiny_config(tiny_prepared, tmp_path))
    assert counted_flops_per_token(bert_cfg, 32) < counted_flops_per_token(
        _model_and_config(tiny_config(tiny_prepared, tmp_path, "mlm.mask_prob=0.5"))[0], 32)


needs_glibc = pytest.mark.skipif(malloc_in_use() is None, reason="step_memory reads glibc's mallinfo2")


@needs_glibc
def test_a_steps_working_memory_grows_with_the_rows_and_checkpointing_keeps_less(tiny_prepared, tmp_path):
    cfg, _ = _model_and_config(tiny_config(tiny_prepared, tmp_path, "model.arch=gpt", "task.name=clm",
                                           "model.num_layers=4", "model.hidden_size=64", "model.intermediate_size=256",
                                           "model.vocab_size=512"))
    two, sixteen = (step_memory(cfg, r, 64, "fp32", False)["forward"] for r in (2, 16))
    # a layer keeps at least its input, attention output and MLP hidden state for each token
    per_token = 4 * cfg.model.num_layers * (2 * 64 + 256)
    assert sixteen - two >= 14 * 64 * per_token
    kept = step_memory(cfg, 16, 64, "fp32", True)["forward"]
    assert kept < 0.6 * sixteen  # only the blocks' inputs stay through the forward


@needs_glibc
def test_the_fused_loss_keeps_one_chunk_of_logits_alive_not_two():
    """Under bf16 autocast each chunk's logits are an fp32 copy: the loop must drop one chunk's before
    the next is made, so four chunks need no more than one (a regression here costs a whole chunk:
    vocab x 256 x 4 bytes, 31 MB at this vocabulary)."""
    from lmforge.ops.linear_cross_entropy import DEFAULT_CHUNK_ROWS, linear_cross_entropy
    from lmforge.runplan import _PeakPerPhase

    vocab, hidden = 30000, 16
    weight = torch.randn(vocab, hidden, requires_grad=True)

    def peak(chunks: int) -> int:
        x = torch.randn(chunks * DEFAULT_CHUNK_ROWS, hidden, requires_grad=True)
        t = torch.randint(vocab, (x.size(0),))
        in_use = malloc_in_use()
        mode = _PeakPerPhase(in_use, in_use(), [0])
        with mode, torch.autocast("cpu", dtype=torch.bfloat16):
            linear_cross_entropy(x, weight, None, t)
        return mode.peak["forward"]
    one_chunk = vocab * DEFAULT_CHUNK_ROWS * 4
    assert peak(4) - peak(1) < 0.3 * one_chunk


def test_the_probes_pass_the_loss_chunk_or_are_the_micro_batch_itself(tiny_prepared, tmp_path):
    clm = _model_and_config(tiny_config(tiny_prepared, tmp_path, "model.arch=gpt", "task.name=clm"))[0]
    assert _probe_rows(clm, 3, 128) == (3,)
    assert _probe_rows(clm, 16, 128) == (2, 4)  # 256 predicted tokens fill the chunk at 2 rows
    mlm = _model_and_config(tiny_config(tiny_prepared, tmp_path, "mlm.mask_prob=0.25"))[0]
    assert _probe_rows(mlm, 256, 128) == (8, 16)  # 32 predicted positions a row


def test_each_strategy_shares_out_what_it_shards():
    counts = {"all": 1000, "unpadded": 1000, "hidden_matrices": 600}
    cfg = load_config(None, [])
    phases = {"forward": 9000.0, "backward": 30.0, "optimizer": 5.0}
    m = memory_per_rank(counts, cfg, 4, {"plain": phases, "checkpointed": phases}, largest_block=100)
    assert (m["ddp"]["weights"], m["ddp"]["gradients"], m["ddp"]["optimizer"]) == (4000, 4000, 8000)
    assert m["ddp"]["gathered_or_buckets"] == 4000  # DDP's gradient buckets
    assert (m["fsdp"]["weights"], m["fsdp"]["optimizer"], m["fsdp"]["gathered_or_buckets"]) == (1000, 2000, 800)
    assert (m["zero1"]["optimizer"], m["zero1"]["gradients"]) == (2000, 4000)
    assert (m["zero2"]["gradients"], m["zero2"]["weights"]) == (1000, 4000)
    assert m["zero3"]["weights"] == 1000
    assert all(v["total"] == sum(x for k, x in v.items() if k != "total") for v in m.values())
    # the forward's peak (no gradients yet) is the step's: its excess over the gradients is the rest
    assert m["ddp"]["total"] == 4000 + 8000 + 4000 + 9000 and m["ddp"]["activations"] == 9000 - 4000
    small = {"forward": 100.0, "backward": 30.0, "optimizer": 5.0}
    m = memory_per_rank(counts, cfg, 1, {"plain": small, "checkpointed": small}, largest_block=100)
    assert m["ddp"]["total"] == 4000 + 8000 + 4000 + 30  # the backward, beside every gradient
    accumulating = load_config(None, ["train.grad_accum_steps=2"])
    m = memory_per_rank(counts, accumulating, 1, {"plain": small, "checkpointed": small}, largest_block=100)
    assert m["ddp"]["total"] == 4000 + 8000 + 4000 + 100  # the next micro-batch's forward, beside the gradients
    muon = load_config(None, ["optim.name=muon"])
    assert memory_per_rank(counts, muon, 1, None, 100)["ddp"]["optimizer"] == 4 * 600 + 8 * 400


def test_the_command_plans_a_config_on_a_gpu_and_refuses_bad_input(tiny_prepared, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    from lmforge.config import dump_yaml
    config.write_text(dump_yaml(tiny_config(tiny_prepared, tmp_path, "train.max_steps=1000")))
    assert main(["plan", "--config", str(config), "--gpu", "H100", "--world", "2", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["world"] == 2 and p["steps"] == 1000 and p["step_tokens"] == 2 * 8 * 32
    assert p["hours"] == pytest.approx(p["flops"] / (0.4 * 989e12 * 2) / 3600, rel=1e-9)
    assert set(p["memory_per_rank"]) == {"ddp", "fsdp", "zero1", "zero2", "zero3"}
    assert main(["plan", "--config", str(config), "--gpu", "nope"]) == 2
    assert main(["plan", "--config", str(config), "--hours", "1"]) == 2
    err = capsys.readouterr().err
    assert "--gpu nope: use one of A100" in err and "drop --flops / --hours" in err and "Traceback" not in err
    result = plan_config(load_config(config), gpu="A100")
    assert result["gpu_memory_gib"] == 80 and result["precision"] == "bf16"

