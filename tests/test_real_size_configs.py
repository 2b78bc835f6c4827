"""configs/bert-base.yaml and configs/gpt2-124m.yaml, the real-size recipes: they pass the config
checks, build the models of the papers (parameter for parameter against transformers' own, on
the meta device: no memory), and hold the recipe their headers state."""

import pytest
import torch
import transformers

from lmforge.config import load_config
from lmforge.jobs import build_model
from test_layout import ROOT


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_bert_base_is_bert_base_uncased_with_the_papers_recipe():
    cfg = load_config(ROOT / "configs" / "bert-base.yaml", [])
    with torch.device("meta"):
        pretraining = build_model(cfg)  # with the pooler and NSP head (mlm.nsp)
        masked_lm = build_model(load_config(ROOT / "configs" / "bert-base.yaml", ["mlm.nsp=false"]))
        hf_config = transformers.BertConfig()  # bert-base-uncased's shape
        assert count(masked_lm) == count(transformers.BertForMaskedLM(hf_config)) == 109_514_298
        assert count(pretraining) == count(transformers.BertForPreTraining(hf_config))
    t, o, d = cfg.train, cfg.optim, cfg.data
    assert (t.batch_size * t.grad_accum_steps, t.max_steps, o.lr, round(o.warmup_frac * t.max_steps)) == \
        (256, 1_000_000, 1e-4, 10_000)
    assert (d.seq_len, d.long_seq_len, d.short_seq_frac, cfg.mlm.mask_prob, cfg.mlm.nsp) == (128, 512, 0.9, 0.15, True)


def test_gpt2_124m_is_gpt2_small_with_the_llm_c_recipe():
    cfg = load_config(ROOT / "configs" / "gpt2-124m.yaml", [])
    with torch.device("meta"):
        model = build_model(cfg)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    padding_rows = (50_304 - 50_257) * 768  # the embedding padded to a multiple of 64
    assert count(model) - padding_rows == count(hf) == 124_439_808
    t, o = cfg.train, cfg.optim
    assert (t.tokens_per_step, t.max_steps, o.lr, round(o.warmup_frac * t.max_steps)) == (524_288, 19_073, 6e-4, 700)
    assert t.tokens_per_step * t.max_steps == pytest.approx(10e9, rel=0.001)  # 10B tokens
    assert (o.beta2, o.weight_decay, o.decay, o.schedule, cfg.data.seq_len) == (0.95, 0.1, "2d", "cosine", 1024)
