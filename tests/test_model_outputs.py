"""Every model family's forward returns its output dataclass, the same type whatever the
arguments, with the documented fields set and the others None; each dataclass is a pytree node
(FSDP2, DDP and torch.compile find the tensors inside)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree

from lmforge.config import ModelConfig
from lmforge.models.bert import BertForMaskedLM, MaskedLMOutput
from lmforge.models.classifier import Classifier, ClassifierOutput
from lmforge.models.electra import Electra, ElectraOutput
from lmforge.models.gpt import GPT, CausalLMOutput

VOCAB = 97


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                       max_position_embeddings=32, dropout=0.0, **kw)


def _set(out) -> set[str]:
    """The names of the fields that are not None."""
    return {f.name for f in dataclasses.fields(out) if getattr(out, f.name) is not None}


def _inputs(rows: int = 3, seq: int = 12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (rows, seq), generator=g)
    selected = torch.rand(rows, seq, generator=g) < 0.3
    selected[:, 0] = False  # [CLS]
    selected[:, 1] = True  # every row has one
    return ids, selected


def _head_loss(x, weight, bias):  # stands in for distillation's fused loss: anything the caller wants back
    logits = torch.nn.functional.linear(x, weight, bias)
    return logits.sum(), logits.argmax(-1)


@pytest.mark.parametrize("nsp", [False, True], ids=["mlm", "mlm-nsp"])
def test_masked_lm_sets_the_documented_fields_for_each_argument_combination(nsp):
    torch.manual_seed(0)
    model = BertForMaskedLM(_cfg(next_sentence_head=nsp)).eval()
    ids, selected = _inputs()
    n = int(selected.sum())
    also = {"next_sentence_logits"} if nsp else set()
    full = model(ids)
    fast = model(ids, selected=selected)
    fused = model(ids, selected=selected, targets=ids[selected])
    dense = model(ids, targets=ids)
    head = model(ids, selected=selected, head_loss=_head_loss)
    for out in (full, fast, fused, dense, head):
        assert type(out) is MaskedLMOutput
    assert _set(full) == {"logits"} | also and full.logits.shape == (3, 12, VOCAB)
    assert _set(fast) == {"logits"} | also and fast.logits.shape == (n, VOCAB)
    assert _set(fused) == {"loss_sum", "correct"} | also and fused.loss_sum.shape == ()
    assert _set(dense) == {"loss_sum", "correct"} | also
    assert _set(head) == {"hidden", "head"} | also and head.hidden.shape == (3, 12, 32)
    torch.testing.assert_close(head.head[0], fast.logits.sum(), rtol=1e-5, atol=1e-4)
    if nsp:
        for out in (fast, fused, dense, head):
            assert out.next_sentence_logits.shape == (3, 2)
            torch.testing.assert_close(out.next_sentence_logits, full.next_sentence_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="head_loss"):
        model(ids, head_loss=_head_loss)
    with pytest.raises(ValueError, match="head_loss"):
        model(ids, selected=selected, targets=ids[selected], head_loss=_head_loss)


def test_a_next_sentence_model_reads_a_selected_cls_position_too():
    # the NSP path adds [CLS] to the positions the last layer computes; a caller that selects
    # [CLS] itself still gets logits at exactly its selected positions
    torch.manual_seed(0)
    model = BertForMaskedLM(_cfg(next_sentence_head=True)).eval()
    ids, selected = _inputs()
    selected[1, 0] = True
    torch.testing.assert_close(model(ids, selected=selected).logits, model(ids).logits[selected],
                               rtol=1e-5, atol=1e-5)


def test_causal_lm_sets_logits_or_the_loss_and_the_cache_when_asked():
    torch.manual_seed(0)
    model = GPT(_cfg(arch="gpt")).eval()
    ids, _ = _inputs()
    plain = model(ids)
    fused = model(ids, targets=ids)
    cached = model(ids, return_cache=True)
    for out in (plain, fused, cached):
        assert type(out) is CausalLMOutput
    assert _set(plain) == {"logits"} and plain.logits.shape == (3, 12, 128)  # the vocabulary padded to 128
    assert _set(fused) == {"loss_sum", "correct"}
    assert _set(cached) == {"logits", "cache"} and len(cached.cache) == 2
    assert cached.cache[0][0].shape == (3, 2, 12, 16)  # keys: (batch, heads, seq, head_dim)
    step = model(ids[:, -1:], past=model(ids[:, :-1], return_cache=True).cache)
    torch.testing.assert_close(step.logits[:, -1], plain.logits[:, -1], rtol=1e-5, atol=1e-5)


def test_electra_and_the_classifiers_set_every_field_they_document():
    torch.manual_seed(0)
    ids, selected = _inputs()
    masked = ids.masked_fill(selected, 4)
    out = Electra(_cfg())(masked, ids, selected, torch.arange(3))
    assert type(out) is ElectraOutput and _set(out) == {f.name for f in dataclasses.fields(ElectraOutput)}
    assert out.sampled.shape == (int(selected.sum()),) and out.discriminator_logits.shape == (3, 12)
    rated = Classifier(_cfg(), 2, (-4.0, 4.0)).eval()(ids)
    unrated = Classifier(_cfg(), 3).eval()(ids)
    pooled = Classifier(_cfg(classifier_pooling="pooler"), 2).eval()(ids)  # a transformers classifier's shape
    for out in (rated, unrated, pooled):
        assert type(out) is ClassifierOutput and out.cls.shape == (3, 32)
    assert _set(rated) == {"logits", "rating", "cls"} and rated.rating.shape == (3,)
    assert _set(unrated) == _set(pooled) == {"logits", "cls"} and unrated.logits.shape == (3, 3)


def _outputs() -> list:
    torch.manual_seed(0)
    ids, selected = _inputs()
    bert = BertForMaskedLM(_cfg(next_sentence_head=True))
    return [bert(ids, selected=selected, targets=ids[selected]), bert(ids, selected=selected, head_loss=_head_loss),
            GPT(_cfg(arch="gpt"))(ids, return_cache=True),
            Electra(_cfg())(ids.masked_fill(selected, 4), ids, selected, torch.arange(3)),
            Classifier(_cfg(), 2, (-4.0, 4.0))(ids), Classifier(_cfg(classifier_pooling="pooler"), 2)(ids)]


def test_outputs_are_pytree_nodes_whose_leaves_are_the_tensors_inside():
    for out in _outputs():
        leaves, spec = pytree.tree_flatten(out)
        assert leaves and all(isinstance(leaf, torch.Tensor) for leaf in leaves), type(out)
        expected = [leaf for f in dataclasses.fields(out) if getattr(out, f.name) is not None
                    for leaf in pytree.tree_leaves(getattr(out, f.name))]  # None fields are not leaves
        assert len(leaves) == len(expected) and all(a is b for a, b in zip(leaves, expected))
        again = pytree.tree_unflatten(leaves, spec)
        assert type(again) is type(out) and _set(again) == _set(out)
        doubled = pytree.tree_map(lambda t: t * 2, out)  # what a wrapper does to the tensors, field by field
        assert type(doubled) is type(out) and all(torch.equal(a * 2, b) for a, b in
                                                  zip(leaves, pytree.tree_leaves(doubled)))


def test_a_compiled_model_returns_its_output_dataclass_with_the_same_numbers():
    torch.manual_seed(0)
    model = BertForMaskedLM(_cfg())
    ids, selected = _inputs()
    eager = model(ids, targets=ids)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(ids, targets=ids)
    assert type(compiled) is MaskedLMOutput and _set(compiled) == {"loss_sum", "correct"}
    torch.testing.assert_close(compiled.loss_sum, eager.loss_sum)
    assert compiled.loss_sum.requires_grad and int(compiled.correct) == int(eager.correct)
