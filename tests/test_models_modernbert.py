"""ModernBERT (lmforge/models/modernbert.py): parity with transformers both ways, the unpadded path
against a plain padded reference, the local window's exact reach, the masked-LM fast paths, and
that training learns.

The tiny model has 4 layers with global_every 3 (layers 0 and 3 global, 1 and 2 local) and a local
window of 8 (4 tokens each side) on 24-token rows, so the window cuts; weights start at std 0.1
and the LayerNorm weights and the decoder bias are perturbed, so that a swapped name, a wrong
RoPE base or a window one token too wide or narrow moves the logits by far more than 1e-4.
"""

import copy
import dataclasses

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.family import SpecialIds
from lmforge.models.modernbert import (FAMILY, ModernBertForMaskedLM, ModernBertModel, from_hf_state_dict,
                                       hf_config_from_model, model_config_from_hf, naive_attention,
                                       to_hf_state_dict)
from lmforge.ops.rope import rope_reference

CFG = ModelConfig(arch="modernbert", vocab_size=1000, hidden_size=64, num_layers=4, num_heads=4,
                  intermediate_size=96, max_position_embeddings=64, dropout=0.0, layer_norm_eps=1e-5, init_std=0.1,
                  global_every=3, local_window=8)
SEQ = 24


def _perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial LayerNorm weights and decoder bias (they start as ones and zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _model(cfg: ModelConfig = CFG, seed: int = 0) -> ModernBertForMaskedLM:
    torch.manual_seed(seed)
    return _perturb(ModernBertForMaskedLM(cfg)).eval()


def _batch(seed: int = 0):
    """(ids, mask) of 4 rows: full, right-padded to 17 and to 6, and left-padded (13 real)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, CFG.vocab_size, (4, SEQ), generator=g)
    mask = torch.zeros(4, SEQ, dtype=torch.long)
    mask[0] = 1
    mask[1, :17] = 1
    mask[2, :6] = 1
    mask[3, SEQ - 13:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _hf_model(model: ModernBertForMaskedLM, folder, attn: str) -> transformers.ModernBertForMaskedLM:
    """Our model written as a transformers directory (config.json + model.safetensors, decoder
    tied: not in the file) and read back by transformers."""
    folder.mkdir()
    transformers.ModernBertConfig(**hf_config_from_model(model.cfg, 0, 1, 2, 3)).save_pretrained(folder)
    safetensors.torch.save_file(to_hf_state_dict(model.state_dict()), folder / "model.safetensors")
    ref, info = transformers.ModernBertForMaskedLM.from_pretrained(folder, attn_implementation=attn,
                                                                   output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return ref.eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_lmforge_model_runs_in_transformers_with_the_same_logits(tmp_path, attn):
    ours = _model()
    ref = _hf_model(ours, tmp_path / "hf", attn)
    assert ref.decoder.weight.data_ptr() == ref.model.embeddings.tok_embeddings.weight.data_ptr()
    assert ref.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    ids, mask = _batch()
    real = mask.bool()
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask).logits
        mine = ours(ids, attention_mask=mask).logits
        assert (mine - theirs)[real].abs().max().item() <= 1e-4
        assert (ours(ids).logits - ref(input_ids=ids).logits).abs().max().item() <= 1e-4  # nothing padded
    # the comparison has teeth: the window one token narrower or wider, or the two RoPE bases swapped
    for change in ({"local_window": 6}, {"local_window": 10}, {"rope_theta": 10000.0, "local_rope_theta": 160000.0}):
        other = ModernBertForMaskedLM(dataclasses.replace(CFG, **change)).eval()
        other.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert (other(ids, attention_mask=mask).logits - theirs)[real].abs().max().item() > 1e-2, change


def test_random_transformers_model_loads_with_the_same_logits_and_encoder_states():
    hf_cfg = transformers.ModernBertConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                           num_attention_heads=4, global_attn_every_n_layers=3, local_attention=8,
                                           initializer_range=0.1, pad_token_id=0, bos_token_id=1, cls_token_id=1,
                                           eos_token_id=2, sep_token_id=2, global_rope_theta=50000.0,
                                           attn_implementation="sdpa")
    torch.manual_seed(0)
    ref = _perturb(transformers.ModernBertForMaskedLM(hf_cfg)).eval()
    cfg = model_config_from_hf(hf_cfg.to_dict())
    assert (cfg.arch, cfg.global_every, cfg.local_window, cfg.rope_theta, cfg.local_rope_theta, cfg.layer_norm_eps) == \
        ("modernbert", 3, 8, 50000.0, 10000.0, 1e-5)
    state, ignored = from_hf_state_dict(ref.state_dict())
    assert ignored == ["decoder.weight"]  # tied to the token embedding
    ours = ModernBertForMaskedLM(cfg).eval()
    ours.load_state_dict(state, strict=True)
    ids, mask = _batch(seed=1)
    with torch.no_grad():
        assert (ours(ids, attention_mask=mask).logits - ref(input_ids=ids, attention_mask=mask).logits
                )[mask.bool()].abs().max().item() <= 1e-4
        assert (ours(ids).logits - ref(input_ids=ids).logits).abs().max().item() <= 1e-4
    # an encoder-only ModernBertModel file: names without "model."
    encoder_state, ignored = from_hf_state_dict(ref.model.state_dict())
    assert ignored == [] and set(encoder_state) == {k for k in state if k.startswith("model.")}
    encoder = ModernBertModel(cfg).eval()
    encoder.load_state_dict({k[len("model."):]: v for k, v in encoder_state.items()}, strict=True)
    with torch.no_grad():
        theirs = ref.model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (encoder(ids, attention_mask=mask) - theirs)[mask.bool()].abs().max().item() <= 1e-5
    # and back: the Family's encoder-only export loads strictly into transformers' ModernBertModel
    hf, tensors = FAMILY.to_hf(ours.state_dict(), cfg, SpecialIds(pad=0, cls=1, sep=2, mask=3), True)
    assert hf["architectures"] == ["ModernBertModel"]
    transformers.ModernBertModel(transformers.ModernBertConfig(**hf)).load_state_dict(tensors, strict=True)


def test_config_maps_read_old_and_new_spellings_and_refuse_what_is_not_implemented():
    new = hf_config_from_model(CFG, 0, 1, 2)
    old = {k: v for k, v in new.items() if k not in ("layer_types", "rope_parameters")}  # transformers 4.x keys
    for hf in (new, old, transformers.ModernBertConfig(**new).to_dict()):
        back = model_config_from_hf(hf)
        assert dataclasses.replace(back, rope_theta=None) == dataclasses.replace(CFG, type_vocab_size=1), hf
        assert back.rope_theta == 160000.0
    assert model_config_from_hf({**new, "layer_types": ["full_attention", "sliding_attention"] * 2}).global_every == 2
    refused = [{"hidden_activation": "silu"}, {"norm_bias": True}, {"attention_bias": True}, {"mlp_bias": True},
               {"decoder_bias": False}, {"tie_word_embeddings": False}, {"model_type": "bert"},
               {"layer_types": ["sliding_attention", "full_attention"] * 2},
               {"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0}}}]
    for change in refused:
        with pytest.raises(LmforgeError) as err:
            model_config_from_hf({**new, **change})
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="BERT's only"):
        ModernBertForMaskedLM(dataclasses.replace(CFG, next_sentence_head=True))


def _reference_logits(model: ModernBertForMaskedLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The padded computation written out plainly from the model's weights, with an independent
    RoPE (complex numbers) and attention whose masks `naive_attention` builds itself. mask:
    (batch, seq) padding or (batch, seq, seq) pairwise."""
    cfg, enc, head = model.cfg, model.model, model.mlm_head
    b, t = ids.shape
    h, heads = cfg.hidden_size, cfg.num_heads

    def norm(x, w):
        return F.layer_norm(x, (h,), w, None, cfg.layer_norm_eps)

    x = norm(enc.embeddings.token.weight[ids], enc.embeddings.norm.weight)
    for i, layer in enumerate(enc.layers):
        is_global = i % cfg.global_every == 0
        theta = 160000.0 if is_global else cfg.local_rope_theta
        normed = x if i == 0 else norm(x, layer.attn_norm.weight)
        q, k, v = (normed @ layer.attn.qkv.weight.T).view(b, t, 3, heads, h // heads).permute(2, 0, 3, 1, 4)
        y = naive_attention(rope_reference(q, theta), rope_reference(k, theta), v, mask.bool(),
                            None if is_global else cfg.local_window // 2)
        x = x + y.transpose(1, 2).reshape(b, t, h) @ layer.attn.out.weight.T
        value, gate = (norm(x, layer.mlp_norm.weight) @ layer.mlp.up.weight.T).chunk(2, -1)
        x = x + (F.gelu(value) * gate) @ layer.mlp.down.weight.T
        # a padded query with no real token in its window is NaN here; as a key it is masked out,
        # but its NaN value would still reach the next layer's sums (0 * NaN): zero it
        if mask.dim() == 2:  # a pairwise (batch, seq, seq) mask pads nothing
            x = x.masked_fill(~mask.bool()[..., None], 0.0)
    x = norm(x, enc.final_norm.weight)
    return norm(F.gelu(x @ head.dense.weight.T), head.norm.weight) @ enc.embeddings.token.weight.T + head.bias


def test_unpadded_path_equals_the_plain_padded_reference_and_each_row_alone():
    model = _model()
    ids, mask = _batch()
    real = mask.bool()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        assert (logits - _reference_logits(model, ids, mask))[real].abs().max().item() <= 1e-4
        full = torch.ones_like(mask)
        assert (model(ids).logits - _reference_logits(model, ids, full)).abs().max().item() <= 1e-4
        assert torch.equal(model(ids, attention_mask=full).logits, model(ids).logits)  # all ones: the fast path
        for row, n in ((1, 17), (2, 6)):  # a right-padded row computes as the row alone, unpadded
            alone = model(ids[row:row + 1, :n]).logits[0]
            assert (logits[row, :n] - alone).abs().max().item() <= 1e-4
        hidden = model.model(ids, attention_mask=mask)
    assert torch.all(hidden[~real] == 0)


def test_model_unpad_false_computes_the_padded_positions_too_with_equal_results_at_the_real_ones():
    import dataclasses

    unpadded, padded = _model(), _model(dataclasses.replace(CFG, unpad=False))
    padded.load_state_dict(unpadded.state_dict())
    ids, mask = _batch()
    real = mask.bool()
    with torch.no_grad():
        a, b = unpadded.model(ids, attention_mask=mask), padded.model(ids, attention_mask=mask)
        assert (a - b)[real].abs().max().item() <= 1e-5
        assert torch.all(a[~real] == 0) and b[~real].abs().sum() > 0  # padded: the padding was computed
        selected = real & (torch.arange(SEQ) % 3 == 0)
        assert (unpadded(ids, attention_mask=mask, selected=selected).logits
                - padded(ids, attention_mask=mask, selected=selected).logits).abs().max().item() <= 1e-5


def test_a_local_layer_sees_exactly_local_window_over_2_tokens_each_side():
    cfg = dataclasses.replace(CFG, num_layers=2, global_every=2)
    torch.manual_seed(0)
    encoder = _perturb(ModernBertModel(cfg)).eval()
    assert [layer.is_global for layer in encoder.layers] == [True, False]
    encoder.layers = encoder.layers[1:]  # the local layer alone: every other step is per token
    ids, mask = _batch()
    changed_ids = ids.clone()
    changed_ids[:, 10] = 7
    with torch.no_grad():
        for m in (None, mask):
            diff = (encoder(ids, attention_mask=m) - encoder(changed_ids, attention_mask=m)).abs().amax(-1)
            moved = diff > 1e-6
            for row in range(ids.size(0)):
                real = torch.ones(SEQ, dtype=torch.bool) if m is None else m[row].bool()
                expected = ((torch.arange(SEQ) - 10).abs() <= 4) & real & bool(real[10])
                assert torch.equal(moved[row], expected), (m is None, row, moved[row].nonzero().flatten().tolist())


def test_selected_positions_targets_and_head_loss_agree_with_the_full_logits():
    torch.manual_seed(3)
    model = _model()
    ids, mask = _batch()
    selected = (torch.rand(ids.shape) < 0.3) & mask.bool()
    selected[2, 5] = True  # the last real token of a short row
    targets = torch.randint(0, CFG.vocab_size, (int(selected.sum()),))
    with torch.no_grad():
        for m in (mask, None):
            full = model(ids, attention_mask=m).logits
            at = model(ids, attention_mask=m, selected=selected).logits
            assert at.shape == (int(selected.sum()), CFG.vocab_size)
            assert (at - full[selected]).abs().max().item() <= 1e-4
            out = model(ids, attention_mask=m, selected=selected, targets=targets)
            assert out.logits is None and out.next_sentence_logits is None
            expected = F.cross_entropy(full[selected], targets, reduction="sum")
            assert abs(out.loss_sum.item() - expected.item()) <= 1e-3 * expected.item()
            assert out.correct.item() == int((full[selected].argmax(-1) == targets).sum())
        # targets everywhere, without `selected` (padded positions too: the caller's to leave out)
        everywhere = torch.randint(0, CFG.vocab_size, ids.shape)
        full = model(ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask, targets=everywhere)
        expected = F.cross_entropy(full.flatten(0, 1), everywhere.flatten(), reduction="sum")
        assert abs(out.loss_sum.item() - expected.item()) <= 1e-3 * expected.item()
        # the encoder's `positions`: the full states there, filler positions (padding here) finite
        hidden = model.model(ids, attention_mask=mask)
        positions = torch.tensor([[0, 23, 11], [3, 16, 20], [5, 0, 12], [23, 11, 2]])
        some = model.model(ids, attention_mask=mask, positions=positions)
        assert torch.isfinite(some).all()
        real = mask.bool().gather(1, positions)
        wanted = hidden.gather(1, positions[:, :, None].expand(-1, -1, CFG.hidden_size))
        assert (some - wanted)[real].abs().max().item() <= 1e-5
        # head_loss: the head's input at the selected positions, the tied decoder and the bias
        out = model(ids, attention_mask=mask, selected=selected,
                    head_loss=lambda x, w, b: (F.linear(x, w, b), w is model.decoder, b is model.mlm_head.bias))
        assert out.head[1:] == (True, True) and (out.head[0] - full[selected]).abs().max().item() <= 1e-4
        assert torch.equal(out.hidden, hidden)
    with pytest.raises(ValueError, match="head_loss"):
        model(ids, head_loss=lambda *a: None)


def test_initialisation_matches_transformers_and_a_few_steps_learn():
    cfg = dataclasses.replace(CFG, init_std=0.02, dropout=0.1, num_layers=4)
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(cfg)
    hf_cfg = transformers.ModernBertConfig(**hf_config_from_model(cfg, 0, 1, 2))
    theirs = to_hf_state_dict(model.state_dict())
    ref = transformers.ModernBertForMaskedLM(hf_cfg).state_dict()
    for name, tensor in theirs.items():  # the same spread, tensor by tensor, within sampling error
        if tensor.dim() == 2:
            assert abs(tensor.std().item() / ref[name].std().item() - 1) < 0.1, name
            assert tensor.abs().max().item() <= 2 * cfg.init_std + 1e-6, name  # cut at 2 std
        else:
            assert torch.equal(tensor, ref[name]), name  # LayerNorm ones, zero bias
    # memorise one padded batch of masked tokens: the loss must fall well below its start. With
    # attention dropout on, and a row of padding alone, whose NaN (were it fully masked) would
    # make every weight gradient NaN
    ids, mask = _batch()
    ids, mask = torch.cat([ids, torch.zeros_like(ids[:1])]), torch.cat([mask, torch.zeros_like(mask[:1])])
    selected = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3) & mask.bool()
    inputs = ids.masked_fill(selected, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(inputs, attention_mask=mask, selected=selected, targets=ids[selected]).loss_sum / selected.sum()
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# Packed windows: a pairwise (batch, seq, seq) attention_mask, documents side by side in one row.
# Each row of DOCS lists its documents' lengths; documents of 10 to 14 tokens are wider than the
# local window (4 each side), so the window cuts inside them too; row 3 holds a one-token document.
DOCS = [(10, 14), (3, 12, 9), (24,), (1, 1, 6, 16)]


def _packed():
    """(ids, doc, pairs): doc (batch, seq) int64, the document of each position; pairs (batch, seq,
    seq) bool, True where both positions are in the same document (block-diagonal)."""
    ids, _ = _batch(seed=2)
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(d)), torch.tensor(d)) for d in DOCS])
    return ids, doc, doc[:, :, None] == doc[:, None, :]


def test_a_pairwise_mask_keeps_packed_documents_apart():
    model = _model()
    ids, doc, pairs = _packed()
    with torch.no_grad():
        packed = model(ids, attention_mask=pairs).logits
        assert (packed - _reference_logits(model, ids, pairs)).abs().max().item() <= 1e-4
        # each document equals its row with every other document as padding (the unpadded path,
        # itself tested against transformers): same RoPE positions, same window, only its own keys
        for row, lengths in enumerate(DOCS):
            for d in range(len(lengths)):
                mine = doc[row] == d
                alone = model(ids[row:row + 1], attention_mask=mine[None].long()).logits[0]
                assert (packed[row, mine] - alone[mine]).abs().max().item() <= 1e-4, (row, d)
        # a document at the start of its row is the row cut to its length
        for row in (0, 1):
            n = DOCS[row][0]
            assert (packed[row, :n] - model(ids[row:row + 1, :n]).logits[0]).abs().max().item() <= 1e-4
        # the mask matters: without it the documents see each other (the single-document row not)
        leak = (packed - model(ids).logits).abs().amax(-1)
        assert leak[[0, 1, 3]].amax(-1).min().item() > 1e-2 and leak[2].max().item() <= 1e-4
        # the encoder's states too, and a mask of 0/1 integers reads as bool
        hidden = model.model(ids, attention_mask=pairs)
        assert torch.equal(model.model(ids, attention_mask=pairs.long()), hidden)
    with pytest.raises(ValueError, match="pairwise"):
        model(ids, attention_mask=pairs[:, :, :-1])
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(ids, attention_mask=torch.ones(1, SEQ))


def test_a_pairwise_mask_in_a_local_layer_is_the_window_and_the_documents():
    cfg = dataclasses.replace(CFG, num_layers=2, global_every=2)
    torch.manual_seed(0)
    encoder = _perturb(ModernBertModel(cfg)).eval()
    ids, doc, pairs = _packed()
    for layers in (encoder.layers[:1], encoder.layers[1:]):  # the global layer alone, the local one alone
        single = copy.deepcopy(encoder)
        single.layers = layers
        changed_ids = ids.clone()
        changed_ids[:, 10] = 7
        with torch.no_grad():
            moved = (single(ids, attention_mask=pairs) - single(changed_ids, attention_mask=pairs)).abs().amax(-1) > 1e-6
        near = (torch.arange(SEQ) - 10).abs() <= (SEQ if layers[0].is_global else 4)
        assert torch.equal(moved, near & (doc == doc[:, 10:11])), layers[0].is_global


def test_a_pairwise_mask_with_selected_positions_equals_the_full_path():
    torch.manual_seed(3)
    model = _model()
    ids, doc, pairs = _packed()
    selected = torch.rand(ids.shape) < 0.3
    selected[3, :2] = True  # the one-token documents
    selected[2] = False  # a row with nothing selected: filler positions only
    targets = torch.randint(0, CFG.vocab_size, (int(selected.sum()),))
    with torch.no_grad():
        full = model(ids, attention_mask=pairs).logits
        at = model(ids, attention_mask=pairs, selected=selected).logits
        assert (at - full[selected]).abs().max().item() <= 1e-4
        out = model(ids, attention_mask=pairs, selected=selected, targets=targets)
        expected = F.cross_entropy(full[selected], targets, reduction="sum")
        assert abs(out.loss_sum.item() - expected.item()) <= 1e-3 * expected.item()
        # the encoder's `positions`, including repeated ones, across document boundaries
        hidden = model.model(ids, attention_mask=pairs)
        positions = torch.tensor([[0, 23, 9, 10], [2, 3, 14, 15], [5, 5, 0, 23], [0, 1, 2, 8]])
        some = model.model(ids, attention_mask=pairs, positions=positions)
        wanted = hidden.gather(1, positions[:, :, None].expand(-1, -1, CFG.hidden_size))
        assert (some - wanted).abs().max().item() <= 1e-5
        # with the rows of the wrong queries (the mask not gathered at `positions`) it would differ
        assert (some - model.model(ids, attention_mask=None, positions=positions)).abs().max().item() > 1e-2
        out = model(ids, attention_mask=pairs, selected=selected, head_loss=lambda x, w, b: F.linear(x, w, b))
        assert (out.head - full[selected]).abs().max().item() <= 1e-4 and torch.equal(out.hidden, hidden)


def test_an_all_true_pairwise_mask_equals_no_mask_and_trains():
    model = _model()
    ids, _, pairs = _packed()
    everything = torch.ones(ids.size(0), SEQ, SEQ, dtype=torch.bool)
    with torch.no_grad():
        assert (model(ids, attention_mask=everything).logits - model(ids).logits).abs().max().item() <= 1e-5
        positions = torch.tensor([[0, 23, 11]] * ids.size(0))
        assert (model.model(ids, attention_mask=everything, positions=positions)
                - model.model(ids, positions=positions)).abs().max().item() <= 1e-5
    # with attention dropout on (lmforge's CPU attention path) the gradients are finite and flow
    cfg = dataclasses.replace(CFG, dropout=0.1)
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(cfg).train()
    selected = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    loss = model(ids.masked_fill(selected, 3), attention_mask=pairs, selected=selected,
                 targets=ids[selected]).loss_sum
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
