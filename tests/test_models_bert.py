"""BERT: the fused attention path against the slow reference, padding, init loss, the selected head."""

import math

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.models.bert import BertForMaskedLM, naive_attention


def _model(vocab=1000, dropout=0.0, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                      max_position_embeddings=64, dropout=dropout, **kw)
    return BertForMaskedLM(cfg).eval()


def test_sdpa_attention_matches_the_naive_reference_with_padding():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 10, 16, generator=g) for _ in range(3))
    key_mask = torch.ones(3, 10, dtype=torch.bool)
    key_mask[1, 6:] = False
    fast = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    assert torch.allclose(fast, naive_attention(q, k, v, key_mask), atol=1e-6)


def test_padding_does_not_change_the_outputs_of_real_tokens():
    model = _model()
    ids = torch.randint(5, 1000, (1, 12))
    alone = model.bert(ids)
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 7)], dim=1)
    with_pad = model.bert(padded, attention_mask=mask)
    assert torch.allclose(alone, with_pad[:, :12], atol=1e-5)


def test_loss_at_initialisation_is_about_ln_vocab():
    vocab = 5000
    model = _model(vocab=vocab)
    ids = torch.randint(5, vocab, (8, 32))
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab), ids.view(-1))
    assert abs(loss.item() - math.log(vocab)) < 0.05


def test_head_on_selected_positions_equals_full_logits_gathered():
    model = _model()
    ids = torch.randint(5, 1000, (4, 16))
    selected = torch.rand(4, 16) < 0.2
    assert torch.allclose(model(ids, selected=selected).logits, model(ids).logits[selected], atol=1e-5)


def test_decoder_is_tied_to_token_embeddings_and_stored_once():
    model = _model()
    names = list(model.state_dict())
    assert "bert.embeddings.token.weight" in names
    assert not any("decoder" in n or "token_embedding" in n for n in names)
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in model.state_dict().values())


def test_initialisation_is_normal_with_std_0_02():
    model = _model(vocab=30000)
    w = model.bert.embeddings.token.weight
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.all(model.bert.layers[0].ffn_in.bias == 0)


def test_fused_head_and_loss_matches_logits_then_cross_entropy_with_gradients():
    model = _model(dropout=0.1).train()  # dropout on: the same seed must give the same masks
    ids = torch.randint(5, 1000, (3, 16), generator=torch.Generator().manual_seed(1))
    selected = torch.rand(3, 16, generator=torch.Generator().manual_seed(2)) < 0.3
    targets = ids[selected]

    def grads_of(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(3)
    plain = torch.nn.functional.cross_entropy(model(ids, selected=selected).logits, targets, reduction="sum")
    plain_grads = grads_of(plain)
    torch.manual_seed(3)  # same dropout masks
    fused = model(ids, selected=selected, targets=targets).loss_sum
    fused_grads = grads_of(fused)
    assert torch.allclose(fused, plain, rtol=1e-5)
    model.eval()
    correct = model(ids, selected=selected, targets=targets).correct
    assert int(correct) == int((model(ids, selected=selected).logits.argmax(-1) == targets).sum())
    assert plain_grads.keys() == fused_grads.keys()
    for name in plain_grads:
        assert torch.allclose(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6), name


def test_selected_positions_lists_each_rows_selected_positions_in_order():
    from lmforge.models.bert import selected_positions

    selected = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    positions, valid = selected_positions(selected)
    assert positions.shape == (3, 3)
    assert positions[0].tolist() == [1, 3, 4] and positions[1, 0].item() == 0
    assert valid.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    rows = torch.arange(3)[:, None].expand(-1, 3)
    assert torch.equal(rows[valid] * 5 + positions[valid], selected.flatten().nonzero()[:, 0])


@pytest.mark.parametrize("padded", [False, True])
def test_last_layer_on_selected_positions_only_matches_the_full_encoder(padded):
    # Fast path: the last layer computes only the masked positions. Its logits, loss and every
    # gradient must equal the plain path's (full encoder, then pick the selected rows).
    from lmforge.ops.linear_cross_entropy import reference_linear_cross_entropy

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position_embeddings=32, dropout=0.0)
    model = BertForMaskedLM(cfg)
    ids = torch.randint(5, 97, (4, 16))
    mask = torch.ones(4, 16, dtype=torch.bool)
    if padded:
        mask[1, 10:] = False
        mask[3, 5:] = False
    selected = (torch.rand(4, 16) < 0.3) & mask
    selected[0, 2] = True
    targets = ids[selected]
    attention = mask if padded else None

    model.eval()
    with torch.no_grad():
        full = model.mlm_head(model.bert(ids, attention_mask=attention), model.bert.embeddings.token.weight)
        fast = model(ids, attention_mask=attention, selected=selected).logits
    assert torch.allclose(fast, full[selected], atol=1e-5)

    model.train()
    loss_fast = model(ids, attention_mask=attention, selected=selected, targets=targets).loss_sum
    loss_fast.backward()
    grads_fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden = model.mlm_head.transform(model.bert(ids, attention_mask=attention)[selected])
    loss_plain, _ = reference_linear_cross_entropy(hidden, model.bert.embeddings.token.weight,
                                                   model.mlm_head.bias, targets)
    loss_plain.backward()
    assert torch.allclose(loss_fast, loss_plain, atol=1e-4)
    for name, p in model.named_parameters():
        assert torch.allclose(grads_fast[name], p.grad, atol=1e-5), name
