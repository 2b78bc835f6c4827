"""DeBERTa-v3 (lmforge/models/deberta.py): the disentangled attention against its slow reference,
parity with transformers' DebertaV2ForMaskedLM both ways, the MLM fast paths, the enhanced mask
decoder, and that training learns. Tiny models (hidden 64, 2 layers, 16 position buckets, so
sequences of ~40 exercise the log buckets), fp32."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.deberta import (FAMILY, DebertaForMaskedLM, DebertaModel, _attend, disentangled_bias,
                                    from_hf_state_dict, hf_compatible, hf_config_from_model, log_bucket,
                                    model_config_from_hf, naive_disentangled_scores, reference_log_bucket,
                                    to_hf_state_dict)
from lmforge.models.family import SpecialIds

VOCAB = 1000


def tiny(**overrides) -> ModelConfig:
    base = dict(arch="deberta", vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                max_position_embeddings=64, type_vocab_size=0, dropout=0.0, layer_norm_eps=1e-7, position_buckets=16)
    return ModelConfig(**{**base, **overrides})


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter, LayerNorms and biases included, so a swapped name would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def padded_batch(lengths=(40, 23, 9), seed=0):
    """ids, attention mask and token types of rows of different lengths (padding id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    types = (torch.arange(ids.size(1)) >= ids.size(1) // 2).long().expand_as(ids) * mask
    return ids, mask, types


def packed_mask(*rows) -> torch.Tensor:
    """(len(rows), seq, seq) bool, block-diagonal: each row's documents (their lengths, summing to
    seq) see only themselves, as a packed window's pairwise attention mask."""
    seq = sum(rows[0])
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])
    assert doc.size(1) == seq
    return doc[:, :, None] == doc[:, None, :]


def hf_v3_config(**overrides) -> transformers.DebertaV2Config:
    """A tiny transformers DeBERTa-v3."""
    kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=64, type_vocab_size=0, relative_attention=True, position_buckets=16,
              pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
              position_biased_input=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.DebertaV2Config(**{**kw, **overrides})


def with_tied(state: dict) -> dict:
    """transformers' state dict also lists the tied decoder; strict loading wants it."""
    return {**state, "cls.predictions.decoder.weight": state["deberta.embeddings.word_embeddings.weight"],
            "cls.predictions.decoder.bias": state["cls.predictions.bias"]}


# -- relative positions and disentangled attention ---------------------------------------------

@pytest.mark.parametrize("buckets,max_distance", [(16, 64), (256, 512), (256, 256), (32, 1024)])
def test_log_buckets_equal_transformers(buckets, max_distance):
    relative = torch.arange(-3000, 3001)
    ours = log_bucket(relative, buckets, max_distance)
    assert torch.equal(ours, make_log_bucket_position(relative, buckets, max_distance).long())
    if (buckets, max_distance) != (256, 256):  # there float64 math differs at |d| = 1292: why the fast one is float32
        assert ours.tolist() == [reference_log_bucket(d, buckets, max_distance) for d in relative.tolist()]
    assert ours[3000 + 5] == 5 and ours[3000 - 5] == -5  # short distances keep their own bucket


@pytest.mark.parametrize("pairwise", [False, True])  # a padding mask; a packed window's (batch, seq, seq) mask
@pytest.mark.parametrize("buckets,max_rel", [(16, -1), (0, 10)])  # log buckets; plain distances, clamped beyond 10
def test_fast_disentangled_attention_equals_the_slow_reference(buckets, max_rel, pairwise):
    cfg = tiny(position_buckets=buckets, max_relative_positions=max_rel)
    enc = perturb(DebertaModel(cfg))
    attn = enc.layers[0].attention
    b, t, d = 2, 24, cfg.hidden_size // cfg.num_heads
    x = torch.randn(b, t, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    if pairwise:
        mask = packed_mask([10, 14], [5, 12, 7])
        allowed = mask  # (b, query, key)
    else:
        mask = torch.ones(b, t, dtype=torch.long)
        mask[1, 17:] = 0
        allowed = mask.bool()[:, None, :].expand(b, t, t)
    shared = enc.shared(t, mask, x.device)
    span = enc.relative.span
    assert shared.relative.shape == (2 * span, cfg.hidden_size)

    def heads(proj, inputs):
        return proj(inputs).unflatten(-1, (cfg.num_heads, d)).transpose(-3, -2)

    # the queries: every position, then a few per row at their own positions (the last-layer fast path)
    some = torch.tensor([[0, 3, 9, 20, 23], [2, 5, 11, 12, 16]])
    for query_positions in (torch.arange(t).expand(b, t), some):
        with torch.no_grad():
            queries = x.gather(1, query_positions[:, :, None].expand(-1, -1, cfg.hidden_size))
            index = shared.index if query_positions.size(1) == t else shared.index[query_positions]
            q, k, v = heads(attn.query, queries), heads(attn.key, x), heads(attn.value, x)
            pos_q, pos_k = heads(attn.query, shared.relative), heads(attn.key, shared.relative)
            slow = naive_disentangled_scores(q, k, pos_q, pos_k, query_positions, span, buckets,
                                             enc.relative.max_distance)
            fast = (q @ k.transpose(-1, -2) + disentangled_bias(q, k, pos_q, pos_k, index)) * attn.scale
            assert (fast - slow).abs().max().item() <= 1e-5
            # and the module itself: SDPA with that bias, the keys each query may not see masked
            # (a pairwise mask at the rows of the queries), the output projection
            rows = allowed[torch.arange(b)[:, None], query_positions]  # (b, tq, t)
            probs = slow.masked_fill(~rows[:, None], float("-inf")).softmax(-1)
            expected = attn.out((probs @ v).transpose(1, 2).reshape(queries.shape))
            full = query_positions.size(1) == t
            got = attn(x, shared if full else shared.rows(query_positions), queries, None if full else index)
            assert (got - expected).abs().max().item() <= 1e-5


def test_cpu_dropout_attention_path_equals_sdpa():
    # p so small that lmforge's dropout keeps everything (threshold 0) but still takes its own path
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 4, 9, 9, generator=g, requires_grad=True)
    outs = []
    for p in (0.0, 1e-9):
        y = _attend(q, k, v, bias, 0.1, p)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, 16)).sum(), (q, k, v, bias))
        outs.append((y, *grads))
    for a, b in zip(*outs):
        assert (a - b).abs().max().item() <= 1e-5


# -- transformers parity -------------------------------------------------------------------------

@pytest.mark.parametrize("type_vocab_size", [0, 2])
def test_lmforge_model_loads_in_transformers_with_the_same_logits(type_vocab_size, tmp_path):
    cfg = tiny(type_vocab_size=type_vocab_size)
    torch.manual_seed(0)
    ours = perturb(DebertaForMaskedLM(cfg))
    hf_cfg = hf_config_from_model(cfg, pad_token_id=0)
    assert hf_cfg["architectures"] == ["DebertaV2ForMaskedLM"] and hf_cfg["model_type"] == "deberta-v2"
    tensors = to_hf_state_dict(ours.state_dict())
    ref = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config.from_dict(hf_cfg)).eval()
    ref.load_state_dict(with_tied(tensors), strict=True)
    assert ref.cls.predictions.decoder.weight is ref.deberta.embeddings.word_embeddings.weight  # still tied
    # and from files, as an export writes them: config.json alone makes transformers build this model
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask, types = padded_batch()
    types = types if type_vocab_size else None
    real = mask.bool()
    with torch.no_grad():
        a = ours(ids, types, mask).logits
        for theirs in (ref, loaded):
            b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
            assert (a - b)[real].abs().max().item() <= 1e-4
        unpadded = ids[:1, :40]
        assert (ours(unpadded).logits - ref(input_ids=unpadded).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("legacy", [True, False])  # transformers' default MLM head, and the official DeBERTa names
def test_random_transformers_deberta_loads_with_the_same_logits(legacy):
    torch.manual_seed(0)
    ref = perturb(transformers.DebertaV2ForMaskedLM(hf_v3_config(legacy=legacy, type_vocab_size=2)), seed=1)
    cfg = model_config_from_hf(ref.config.to_dict())
    assert (cfg.arch, cfg.position_buckets, cfg.type_vocab_size, cfg.layer_norm_eps) == ("deberta", 16, 2, 1e-7)
    tensors, ignored = from_hf_state_dict(ref.state_dict())
    assert set(ignored) == ({"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} if legacy else set())
    ours = DebertaForMaskedLM(cfg).eval()
    ours.load_state_dict(tensors, strict=True)
    ids, mask, types = padded_batch(seed=2)
    with torch.no_grad():
        a = ours(ids, types, mask).logits
        b = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert (a - b)[mask.bool()].abs().max().item() <= 1e-4

    # an encoder-only DebertaV2Model file: names without "deberta.", no head
    encoder_tensors, _ = from_hf_state_dict(ref.deberta.state_dict())
    assert set(encoder_tensors) == {k for k in tensors if k.startswith("deberta.")}
    encoder = DebertaModel(cfg).eval()
    encoder.load_state_dict({k[len("deberta."):]: v for k, v in encoder_tensors.items()}, strict=True)
    with torch.no_grad():
        a = encoder(ids, types, mask)
        b = ref.deberta(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert (a - b)[mask.bool()].abs().max().item() <= 1e-4


@pytest.mark.parametrize("change,named", [
    ({"conv_kernel_size": 3}, "conv layers"), ({"position_biased_input": True}, "position_biased_input true"),
    ({"pos_att_type": ["c2p"]}, "pos_att_type"), ({"relative_attention": False}, "relative_attention false"),
    ({"share_att_key": False}, "share_att_key false"), ({"hidden_act": "relu"}, "hidden_act"),
])
def test_unimplemented_variants_are_refused_in_one_line(change, named):
    hf = {**hf_v3_config().to_dict(), **change}
    with pytest.raises(LmforgeError, match=named) as err:
        model_config_from_hf(hf)
    assert "\n" not in str(err.value)
    with pytest.raises(LmforgeError, match="deberta-v2"):
        model_config_from_hf({**hf_v3_config().to_dict(), "model_type": "deberta"})  # v1's layout differs


def test_family_round_trips_and_encoder_only_export():
    cfg = tiny(type_vocab_size=2)
    state = perturb(DebertaForMaskedLM(cfg)).state_dict()
    hf, tensors = FAMILY.to_hf(state, cfg, SpecialIds(pad=3), False)
    assert hf["pad_token_id"] == 3 and hf["legacy"] is True and "cls.predictions.bias" in tensors
    back_cfg, back, ignored = FAMILY.from_hf(hf, tensors)
    assert back_cfg == cfg
    assert set(back) == set(state) and ignored == [] and all(torch.equal(back[k], state[k]) for k in state)
    hf, tensors = FAMILY.to_hf(state, cfg, SpecialIds(pad=0), True)
    assert hf["architectures"] == ["DebertaV2Model"] and not any(k.startswith(("deberta.", "cls.")) for k in tensors)


# -- the MLM fast paths ------------------------------------------------------------------------

@pytest.mark.parametrize("emd", [False, True])
def test_selected_targets_and_head_loss_paths_equal_the_full_logits(emd):
    torch.manual_seed(0)
    model = perturb(DebertaForMaskedLM(tiny(type_vocab_size=2, enhanced_mask_decoder=emd)))
    ids, mask, types = padded_batch()
    g = torch.Generator().manual_seed(3)
    selected = (torch.rand(ids.shape, generator=g) < 0.2) & mask.bool()
    selected[2] = False  # a row with nothing selected
    selected[0, 39] = True
    targets = torch.randint(0, VOCAB, (int(selected.sum()),), generator=g)
    with torch.no_grad():
        full = model(ids, types, mask).logits
        at = model(ids, types, mask, selected=selected).logits
        assert (at - full[selected]).abs().max().item() <= 1e-5
        out = model(ids, types, mask, selected=selected, targets=targets)
        assert out.logits is None and out.next_sentence_logits is None
        expected = F.cross_entropy(full[selected], targets, reduction="sum")
        assert abs(out.loss_sum.item() - expected.item()) <= 1e-4 * expected.item()
        assert out.correct.item() == (full[selected].argmax(-1) == targets).sum().item()
        seen = {}
        hl = model(ids, types, mask, selected=selected,
                   head_loss=lambda x, w, b: seen.setdefault("logits", F.linear(x, w, b)))
        assert hl.head is seen["logits"] and (seen["logits"] - full[selected]).abs().max().item() <= 1e-5
        assert torch.allclose(hl.hidden, model.deberta(ids, types, mask), atol=1e-6)
    with pytest.raises(ValueError, match="head_loss"):
        model(ids, selected=None, head_loss=lambda *a: None)


def test_positions_path_equals_the_full_hidden_states():
    torch.manual_seed(0)
    enc = perturb(DebertaModel(tiny()))
    ids, mask, _ = padded_batch()
    positions = torch.tensor([[0, 7, 39], [1, 8, 22], [0, 4, 8]])
    with torch.no_grad():
        full = enc(ids, attention_mask=mask)
        at = enc(ids, attention_mask=mask, positions=positions)
    assert at.shape == (3, 3, 64)
    assert (at - full.gather(1, positions[:, :, None].expand(-1, -1, 64))).abs().max().item() <= 1e-5


# -- packed windows: a pairwise (batch, seq, seq) attention mask ---------------------------------

@pytest.mark.parametrize("emd", [False, True])
def test_packed_documents_see_only_themselves(emd):
    # row 0: document A (17 tokens) then B (23); row 1 one document. Relative positions only: each
    # document gets exactly its hidden states alone; the EMD's absolute positions only A's.
    torch.manual_seed(0)
    model = perturb(DebertaForMaskedLM(tiny(type_vocab_size=2, enhanced_mask_decoder=emd)))
    ids = torch.randint(5, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = packed_mask([17, 23], [40])
    docs = [(0, 17)] if emd else [(0, 17), (17, 40)]
    with torch.no_grad():
        hidden = model.deberta(ids, attention_mask=mask)
        logits = model(ids, attention_mask=mask).logits
        for start, end in docs:
            alone = ids[:1, start:end]
            assert (hidden[0, start:end] - model.deberta(alone)[0]).abs().max().item() <= 1e-5
            assert (logits[0, start:end] - model(alone).logits[0]).abs().max().item() <= 1e-4
        assert (hidden[1] - model.deberta(ids[1:])[0]).abs().max().item() <= 1e-5  # one document: as unmasked
        # the test can tell: without the mask A sees B
        assert (model.deberta(ids)[0, :17] - hidden[0, :17]).abs().max().item() > 1e-3


@pytest.mark.parametrize("emd", [False, True])
def test_packed_positions_and_selected_paths_equal_the_full_path(emd):
    torch.manual_seed(0)
    model = perturb(DebertaForMaskedLM(tiny(type_vocab_size=2, enhanced_mask_decoder=emd)))
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(5, VOCAB, (3, 40), generator=g)
    types = (torch.arange(40) >= 20).long().expand_as(ids)
    mask = packed_mask([17, 23], [5, 30, 5], [40])
    positions = torch.tensor([[0, 16, 17, 39], [4, 5, 34, 35], [0, 9, 20, 39]])  # both sides of each boundary
    selected = torch.rand(ids.shape, generator=g) < 0.2
    selected[0, [16, 17]] = True
    selected[2] = False  # a row with nothing selected
    targets = torch.randint(0, VOCAB, (int(selected.sum()),), generator=g)
    with torch.no_grad():
        full = model.deberta(ids, types, mask)
        at = model.deberta(ids, types, mask, positions=positions)
        assert (at - full.gather(1, positions[:, :, None].expand(-1, -1, 64))).abs().max().item() <= 1e-5
        logits = model(ids, types, mask).logits
        assert (model(ids, types, mask, selected=selected).logits - logits[selected]).abs().max().item() <= 1e-5
        out = model(ids, types, mask, selected=selected, targets=targets)
        expected = F.cross_entropy(logits[selected], targets, reduction="sum")
        assert abs(out.loss_sum.item() - expected.item()) <= 1e-4 * expected.item()
        hl = model(ids, types, mask, selected=selected, head_loss=lambda x, w, b: F.linear(x, w, b))
        assert (hl.head - logits[selected]).abs().max().item() <= 1e-5
        assert (hl.hidden - full).abs().max().item() <= 1e-6
        # the test can tell: the padding mask's rows are not the pairwise mask's
        assert (model(ids, types, selected=selected).logits - logits[selected]).abs().max().item() > 1e-3


@pytest.mark.parametrize("emd", [False, True])
def test_an_all_true_pairwise_mask_equals_no_mask(emd):
    torch.manual_seed(0)
    model = perturb(DebertaForMaskedLM(tiny(enhanced_mask_decoder=emd)))
    ids, _, _ = padded_batch((40, 40))
    everything = torch.ones(2, 40, 40, dtype=torch.bool)
    positions = torch.tensor([[0, 7, 39], [1, 8, 22]])
    selected = torch.zeros(ids.shape, dtype=torch.bool)
    selected[0, [3, 30]] = selected[1, 11] = True
    with torch.no_grad():
        assert (model.deberta(ids, attention_mask=everything) - model.deberta(ids)).abs().max().item() <= 1e-6
        assert (model.deberta(ids, attention_mask=everything, positions=positions)
                - model.deberta(ids, positions=positions)).abs().max().item() <= 1e-6
        assert (model(ids, attention_mask=everything).logits - model(ids).logits).abs().max().item() <= 1e-5
        assert (model(ids, attention_mask=everything, selected=selected).logits
                - model(ids, selected=selected).logits).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="pairwise"):
        model.deberta(ids, attention_mask=everything[:, :, :39])


# -- enhanced mask decoder, training -----------------------------------------------------------

def _train(model: DebertaForMaskedLM, steps: int) -> list[float]:
    """Steps of the fused MLM loss on one fixed random batch: the per-token losses."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, VOCAB, (4, 32), generator=g)
    selected = torch.rand(ids.shape, generator=g) < 0.25
    inputs = ids.masked_fill(selected, 4)  # 4 = [MASK]
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(steps):
        out = model(inputs, selected=selected, targets=ids[selected])
        loss = out.loss_sum / selected.sum()
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses


def test_enhanced_mask_decoder_changes_only_the_mlm_logits_and_trains():
    cfg, emd_cfg = tiny(), tiny(enhanced_mask_decoder=True)
    assert hf_compatible(cfg) and not hf_compatible(emd_cfg)
    torch.manual_seed(0)
    base = perturb(DebertaForMaskedLM(cfg))
    emd = DebertaForMaskedLM(emd_cfg).eval()
    missing, unexpected = emd.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["emd.position.weight"] and unexpected == []
    ids, mask, _ = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        assert torch.equal(emd.deberta(ids, attention_mask=mask), base.deberta(ids, attention_mask=mask))
        logits = emd(ids, attention_mask=mask).logits
        assert (logits - base(ids, attention_mask=mask).logits)[real].abs().min() > 0
        # the official DeBERTa's EnhancedMaskDecoder.emd_context_layer, written with transformers'
        # modules: the last layer's input H as keys/values, H + P as the first queries, two passes
        hf_cfg = transformers.DebertaV2Config.from_dict(hf_config_from_model(cfg))
        ref = transformers.DebertaV2ForMaskedLM(hf_cfg).eval()
        ref.load_state_dict(with_tied(to_hf_state_dict(base.state_dict())), strict=True)
        encoder = ref.deberta.encoder
        hidden = ref.deberta(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        query = hidden + emd.emd.position.weight[: ids.size(1)]
        for layer in [encoder.layer[-1]] * 2:
            query = layer(hidden, encoder.get_attention_mask(mask), query_states=query,
                          relative_pos=encoder.get_rel_pos(hidden), rel_embeddings=encoder.get_rel_embedding())[0]
        assert (logits - ref.cls(query))[real].abs().max().item() <= 1e-4
    with pytest.raises(LmforgeError, match="enhanced mask decoder"):
        hf_config_from_model(emd_cfg)
    with pytest.raises(LmforgeError, match="enhanced mask decoder"):
        FAMILY.to_hf(emd.state_dict(), emd_cfg, SpecialIds(pad=0), False)
    with pytest.raises(LmforgeError, match="emd.position.weight"):
        to_hf_state_dict(emd.state_dict())
    hf, tensors = FAMILY.to_hf(emd.state_dict(), emd_cfg, SpecialIds(pad=0), True)  # its encoder exports
    assert hf["architectures"] == ["DebertaV2Model"]
    losses = _train(emd, 10)
    assert losses[-1] < 0.75 * losses[0]


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = DebertaForMaskedLM(tiny(dropout=0.1, type_vocab_size=2))  # dropout: the CPU dropout paths too
    losses = _train(model, 10)
    assert losses[0] > 6.0 and losses[-1] < 0.75 * losses[0]


def test_the_next_sentence_head_is_refused():
    with pytest.raises(ValueError, match="next-sentence"):
        DebertaForMaskedLM(tiny(next_sentence_head=True))
