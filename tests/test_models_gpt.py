"""GPT: causal attention against the slow reference, KV cache, sampling filters, init, decay groups."""

import math

import pytest
import torch

from lmforge.config import ModelConfig, OptimConfig
from lmforge.eval.generate import generate, next_token_distribution
from lmforge.models.gpt import GPT, naive_causal_attention, padded_vocab_size
from lmforge.train.optim import make_optimizer


def _gpt(vocab=1000, layers=2, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", vocab_size=vocab, hidden_size=64, num_layers=layers, num_heads=4,
                      intermediate_size=256, max_position_embeddings=64, dropout=0.0, layer_norm_eps=1e-5, **kw)
    return GPT(cfg).eval()


def test_causal_sdpa_matches_the_naive_reference_with_and_without_a_cache_offset():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    fast = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(fast, naive_causal_attention(q, k, v), atol=1e-6)
    model = _gpt()
    ids = torch.randint(0, 1000, (2, 12))
    full = model(ids).logits
    cache = model(ids[:, :8], return_cache=True).cache
    rest = model(ids[:, 8:], past=cache).logits  # 4 new tokens after an 8-token cache: offset causal mask
    assert torch.allclose(rest, full[:, 8:], atol=1e-5)


def test_kv_cached_generation_gives_the_same_logits_and_greedy_tokens_as_uncached():
    model = _gpt()
    ids = torch.randint(0, 1000, (1, 5))
    out = model(ids, return_cache=True)
    logits, cache = out.logits, out.cache
    step_logits = [logits[:, -1]]
    seq = ids
    for _ in range(6):
        nxt = step_logits[-1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        out = model(nxt, past=cache, return_cache=True)
        cache = out.cache
        step_logits.append(out.logits[:, -1])
        assert torch.allclose(out.logits[:, -1], model(seq).logits[:, -1], atol=1e-5)
    prompt = ids[0].tolist()
    cached = generate(model, prompt, max_new_tokens=10, temperature=0, use_cache=True)
    uncached = generate(model, prompt, max_new_tokens=10, temperature=0, use_cache=False)
    assert cached == uncached and len(cached[0]) == 10


def test_padded_vocabulary_slots_are_never_generated():
    model = _gpt(vocab=1000)
    assert model.token.weight.shape[0] == padded_vocab_size(1000) == 1024
    with torch.no_grad():
        model.token.weight[1000:] = 5.0  # make padding logits dominant
    samples = generate(model, [1, 2, 3], max_new_tokens=20, temperature=1.0, num_samples=4, seed=1)
    assert all(t < 1000 for s in samples for t in s)
    greedy = generate(model, [1, 2, 3], max_new_tokens=5, temperature=0)
    assert all(t < 1000 for t in greedy[0])


def test_generation_stops_at_end_of_text_and_is_seeded():
    model = _gpt()
    a = generate(model, [1, 2], max_new_tokens=15, temperature=1.0, top_k=50, seed=3, num_samples=3)
    b = generate(model, [1, 2], max_new_tokens=15, temperature=1.0, top_k=50, seed=3, num_samples=3)
    assert a == b
    eot = a[0][0]  # pretend the first sampled token ends the text
    c = generate(model, [1, 2], max_new_tokens=15, temperature=1.0, top_k=50, seed=3, num_samples=3, eot_id=eot)
    assert c[0] == []


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, 9.0]])  # last slot is vocabulary padding
    p = next_token_distribution(logits, vocab_size=5, temperature=1.0, top_k=2, top_p=None)
    assert p[0, 5] == 0 and (p[0, 2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    p = next_token_distribution(logits, vocab_size=5, temperature=1.0, top_k=None, top_p=0.7)
    assert p[0, 0] > 0 and p[0, 1] > 0 and (p[0, 2:] == 0).all()  # 0.64 + 0.24 covers 0.7


def test_init_scales_residual_projections_and_starts_near_ln_vocab():
    model = _gpt(vocab=4000, layers=4)
    std = model.blocks[0].mlp.down.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(8)) < 0.001
    assert abs(model.blocks[0].mlp.up.weight.std().item() - 0.02) < 0.001
    ids = torch.randint(0, 4000, (4, 32))
    loss = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 4032), ids[:, 1:].reshape(-1))
    assert abs(loss.item() - math.log(4000)) < 0.1


@pytest.mark.parametrize("layers", [1, 3])
def test_2d_decay_rule_decays_matmul_weights_and_embeddings_only(layers):
    model = _gpt(layers=layers)
    decay, no_decay = make_optimizer(model, OptimConfig(weight_decay=0.1, decay="2d"), torch.device("cpu")).param_groups
    assert len(decay["params"]) == 4 * layers + 2  # qkv, out, up, down per block + token, position
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    decayed = {id(p) for p in decay["params"]}
    assert id(model.token.weight) in decayed and id(model.position.weight) in decayed


def test_transformers_gpt2_loads_with_identical_logits_and_exports_back(tmp_path):
    import transformers

    from lmforge.data.tokenizers import load_tokenizer
    from lmforge.export import export_hf
    from lmforge.tasks.loading import load_model

    cfg = transformers.GPT2Config(vocab_size=50257, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm/bias values, so a swapped or untransposed name shows
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref.save_pretrained(tmp_path / "hf")
    load_tokenizer("gpt2").save(tmp_path / "hf" / "tokenizer.json")
    loaded = load_model(tmp_path / "hf")
    assert loaded.config.arch == "gpt" and loaded.config.intermediate_size == 256
    ids = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        theirs = ref(input_ids=ids).logits
        ours = loaded.model(ids).logits[..., :50257]
    assert (ours - theirs).abs().max().item() <= 1e-4

    out = export_hf(tmp_path / "hf", tmp_path / "back")
    again = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        assert (again(input_ids=ids).logits - theirs).abs().max().item() <= 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello world")["input_ids"] == [15496, 995]


def test_fused_head_and_loss_matches_logits_then_cross_entropy_with_gradients():
    model = _gpt()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    logits = model(ids).logits
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = model(ids, targets=targets)
    fused, correct = out.loss_sum, out.correct
    fused.backward()
    assert torch.allclose(fused, plain, rtol=1e-5)
    assert int(correct) == int((logits.argmax(-1) == targets).sum())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, plain_grads[name], rtol=1e-4, atol=1e-6), name
