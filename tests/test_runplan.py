"""`lmforge plan --config` (lmforge/runplan.py): parameters equal to transformers' models of the
same shape, FLOPs counted on the real model (and the textbook formula beside them), activations
that scale with the rows, memory shared out as each strategy shards it, and the command's output."""

import json

import pytest


from conftest import tiny_config
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.runplan import (_model_and_config, counted_flops_per_token, flops_per_token, memory_per_rank,
                             parameter_counts, plan_config, saved_bytes)
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


def test_activations_scale_with_the_rows_and_checkpointing_keeps_less(tiny_prepared, tmp_path):
    from lmforge.train.recompute import checkpoint_blocks

    cfg, _ = _model_and_config(tiny_config(tiny_prepared, tmp_path, "model.arch=gpt", "task.name=clm",
                                           "model.num_layers=4"))
    model = registry.objective("clm").build_model(cfg).train()
    one, four = saved_bytes(model, cfg, 1, 32, "fp32"), saved_bytes(model, cfg, 4, 32, "fp32")
    assert four == pytest.approx(4 * one, rel=0.1)
    checkpoint_blocks(model)
    assert saved_bytes(model, cfg, 4, 32, "fp32") < 0.5 * four


def test_each_strategy_shares_out_what_it_shards():
    counts = {"all": 1000, "unpadded": 1000, "hidden_matrices": 600}
    cfg = load_config(None, [])
    m = memory_per_rank(counts, cfg, 4, {"plain": 50.0, "checkpointed": 10.0}, largest_block=100)
    assert (m["ddp"]["weights"], m["ddp"]["gradients"], m["ddp"]["optimizer"]) == (4000, 4000, 8000)
    assert m["ddp"]["gathered_or_buckets"] == 4000  # DDP's gradient buckets
    assert (m["fsdp"]["weights"], m["fsdp"]["optimizer"], m["fsdp"]["gathered_or_buckets"]) == (1000, 2000, 800)
    assert (m["zero1"]["optimizer"], m["zero1"]["gradients"]) == (2000, 4000)
    assert (m["zero2"]["gradients"], m["zero2"]["weights"]) == (1000, 4000)
    assert m["zero3"]["weights"] == 1000
    assert all(v["total"] == sum(x for k, x in v.items() if k != "total") for v in m.values())
    assert all(v["activations"] == 50.0 for v in m.values())
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

