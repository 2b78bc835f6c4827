"""model.arch=llama: the modern decoder against transformers (Llama, Qwen3, Arcee), both ways, with
greedy generation, the KV cache, grouped-query attention and the export of a trained run."""

import pytest
import torch
import transformers

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.eval.generate import generate
from lmforge.models.family import SpecialIds
from lmforge.models.llama import Llama, from_hf, naive_llama_attention, to_hf
from lmforge.ops.rope import apply_rope, rope_reference, rope_tables

VOCAB = 1000
VARIANTS = {  # name -> (model.mlp, model.qk_norm, model.num_kv_heads, model.tie_embeddings, transformers class)
    "llama-gqa-tied": ("swiglu", False, 2, True, "LlamaForCausalLM"),
    "qwen3-qknorm-untied": ("swiglu", True, None, False, "Qwen3ForCausalLM"),
    "arcee-relu2": ("relu2", False, 4, True, "ArceeForCausalLM"),
}


def _cfg(mlp="swiglu", qk_norm=False, kv=None, tie=True, **kw):
    base = dict(arch="llama", vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=kv,
                intermediate_size=96, max_position_embeddings=64, dropout=0.0, layer_norm_eps=1e-6, mlp=mlp,
                qk_norm=qk_norm, tie_embeddings=tie, rope_theta=500.0)
    return ModelConfig(**{**base, **kw})


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = Llama(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm name shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _transformers_model(hf_cfg, tensors):
    config = transformers.CONFIG_MAPPING[hf_cfg["model_type"]](
        **{k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")})
    ref = getattr(transformers, hf_cfg["architectures"][0])(config).eval()
    missing, unexpected = ref.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head is the embedding
    return ref


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_transformers_both_ways(variant):
    mlp, qk_norm, kv, tie, cls = VARIANTS[variant]
    cfg = _cfg(mlp, qk_norm, kv, tie)
    ours = _model(cfg)
    hf_cfg, tensors = to_hf(ours.state_dict(), cfg, SpecialIds(eot=5), False)
    assert hf_cfg["architectures"] == [cls]
    ref = _transformers_model(hf_cfg, tensors)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = ref(ids).logits
        assert (ours(ids).logits[..., :VOCAB] - theirs).abs().max().item() <= 1e-4
        cfg_back, back, _ = from_hf(hf_cfg, dict(ref.state_dict()))
        again = Llama(cfg_back).eval()
        again.load_state_dict(back, strict=True)
        assert (cfg_back.mlp, cfg_back.qk_norm, cfg_back.tie_embeddings) == (mlp, qk_norm, tie)
        assert (again(ids).logits[..., :VOCAB] - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_equals_transformers_generate(variant):
    mlp, qk_norm, kv, tie, _ = VARIANTS[variant]
    cfg = _cfg(mlp, qk_norm, kv, tie, init_std=0.5)  # large weights: greedy paths that change from token to token
    ours = _model(cfg, seed=3)
    ref = _transformers_model(*to_hf(ours.state_dict(), cfg, SpecialIds(eot=None), False))
    prompt = [11, 503, 77, 402, 9]
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    cached = generate(ours, prompt, max_new_tokens=20, temperature=0)[0]
    uncached = generate(ours, prompt, max_new_tokens=20, temperature=0, use_cache=False)[0]
    assert cached == theirs == uncached
    assert len(set(theirs)) > 3  # not one token repeated: the comparison means something


def test_kv_cache_logits_equal_the_full_forward_with_grouped_query_attention():
    model = _model(_cfg(kv=2))
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :12], return_cache=True)
        assert first.cache[0][0].shape == (3, 2, 12, 16)  # 2 key/value heads are cached, not 4
        rest = model(ids[:, 12:15], past=first.cache, return_cache=True)
        last = model(ids[:, 15:], past=rest.cache)
    stitched = torch.cat([first.logits, rest.logits, last.logits], dim=1)
    assert (stitched - full).abs().max().item() <= 1e-5


def test_fast_attention_equals_the_naive_grouped_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    fast = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True)
    assert (fast - naive_llama_attention(q, k, v)).abs().max().item() <= 1e-5
    # and the rotation equals the complex-number reference, positions restarting per row too
    x = torch.randn(2, 3, 10, 8, generator=g)
    cos, sin = rope_tables(8, 16, 500.0)
    assert (apply_rope(x, cos[:10], sin[:10]) - rope_reference(x, 500.0)).abs().max().item() <= 1e-5
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]] * 2)
    by_row = apply_rope(x, cos[pos], sin[pos])
    assert (by_row - rope_reference(x, 500.0, pos[0])).abs().max().item() <= 1e-5


def test_rope_makes_scores_depend_on_relative_position_only():
    cfg = _cfg()
    cos, sin = rope_tables(16, 64, cfg.rope_theta)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(i, j):
        return (apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum().item()

    assert score(3, 1) == pytest.approx(score(40, 38), abs=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_qk_norm_and_relu2_have_no_transformers_twin_and_export_refuses_it():
    from lmforge.models.llama import export_refusal

    assert export_refusal(_cfg("relu2", True)) is not None
    assert all(export_refusal(_cfg(m, q)) is None for m, q in (("swiglu", False), ("swiglu", True), ("relu2", False)))
    with pytest.raises(LmforgeError, match="hidden_act"):
        from_hf({"model_type": "llama", "hidden_act": "gelu"}, {})


def test_untied_head_is_its_own_matrix_and_no_biases_exist():
    tied, untied = Llama(_cfg()), Llama(_cfg(tie=False))
    assert tied.head_weight is tied.token.weight
    assert untied.head_weight is untied.head.weight and untied.head.weight is not untied.token.weight
    assert not [n for n, _ in untied.named_parameters() if n.endswith(".bias")]
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 1024 * 64


def test_a_llama_run_trains_resumes_exactly_and_exports_to_transformers(tiny_corpus, tmp_path, monkeypatch):
    from conftest import interrupt_during_step
    from lmforge.export import export_hf
    from lmforge.jobs import pretrain, resume
    from lmforge.config import load_config
    from lmforge.tasks.clm import CausalLMTask
    from lmforge.train.log import read_metrics

    base = ["model.arch=llama", "task.name=clm", f"data.corpus={tiny_corpus}", "data.tokenizer=gpt2",
            "data.seq_len=32", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
            "model.num_kv_heads=2", "model.intermediate_size=64", "model.max_position_embeddings=64",
            "model.dropout=0", "model.layer_norm_eps=1e-6", "model.qk_norm=true", "model.tie_embeddings=false",
            "train.batch_size=4", "train.eval_every=6", "train.eval_batches=2", "train.log_every=1",
            "train.checkpoint_every=6", "train.progress=false", "optim.lr=3e-3", "clm.sample_tokens=4",
            "data.val_frac=0.2"]
    full_dir, summary = pretrain(load_config(None, base + [f"out_dir={tmp_path / 'full'}", "train.max_steps=12"]))
    val = [r["loss"] for r in read_metrics(full_dir) if r["split"] == "validation"]
    assert len(val) == 2 and val[1] < val[0] < 10.8  # it learns (ln 50,304 = 10.83 at the start)
    interrupt_during_step(monkeypatch, CausalLMTask, 8)  # SIGINT in step 8: it stops at its step-6 checkpoint
    cut_dir, summary = pretrain(load_config(None, base + [f"out_dir={tmp_path / 'cut'}", "train.max_steps=12"]))
    assert summary["stopped_by"] == "signal"
    monkeypatch.undo()
    resume(cut_dir)
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if r["split"] == "train"]  # noqa: E731
    assert losses(full_dir) == losses(cut_dir) and len(losses(full_dir)) == 12

    out = export_hf(full_dir, tmp_path / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(ref).__name__ == "Qwen3ForCausalLM"
    from lmforge.tasks.loading import load_model

    loaded = load_model(full_dir)
    ids = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert (loaded.model(ids).logits[..., :50257] - ref(ids).logits).abs().max().item() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tok("the cat")["input_ids"]
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(prompt):]
    assert generate(loaded.model, prompt, max_new_tokens=8, temperature=0)[0] == theirs.tolist()
