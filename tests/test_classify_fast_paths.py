"""Fine-tuning and inference fast paths give the plain path's results (llm.c's habit): the [CLS]-only
last layer, no attention mask on unpadded batches, length-sorted batching in classify and fill-mask."""

import dataclasses

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.tokenizers import train_wordpiece
from lmforge.eval.classify import classify_texts
from lmforge.eval.predict import fill_mask
from lmforge.models.bert import BertForMaskedLM
from lmforge.models.classifier import Classifier

CFG = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
           max_position_embeddings=64, dropout=0.0)
TEXTS = ["the cat sees the hill", "a dog", "the old farmer follows the long road to the city",
         "my sister likes a red apple", "the river", "a small bird finds the bright moon again and again",
         "the president remembers", "the cat"]


def _padded_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (4, 11), generator=g)
    mask = torch.ones(4, 11, dtype=torch.bool)
    mask[1, 7:] = mask[3, 3:] = False
    return ids.masked_fill(~mask, 0), mask


def _classifier():
    torch.manual_seed(0)
    return Classifier(ModelConfig(**CFG), 2, (-4.0, 4.0)).eval()


def _tokenizer():
    return train_wordpiece(iter(TEXTS * 5), vocab_size=300)


def test_first_position_only_encoder_output_equals_the_full_outputs_first_position_with_padding():
    model = _classifier()
    ids, mask = _padded_batch()
    full = model.bert(ids, attention_mask=mask)
    first = model.bert(ids, attention_mask=mask, positions=ids.new_zeros(ids.size(0), 1))
    assert first.shape == (4, 1, 32)
    assert torch.allclose(first, full[:, :1], atol=1e-5)


def test_classifier_matches_the_plain_full_encoder_path_in_outputs_and_gradients():
    model = _classifier()
    ids, mask = _padded_batch()
    out = model(ids, attention_mask=mask)
    logits, rating = out.logits, out.rating
    cls = model.bert(ids, attention_mask=mask)[:, 0]  # the plain path: every position, then [CLS]
    assert torch.allclose(out.cls, cls, atol=1e-5)
    assert torch.allclose(logits, model.polarity(cls), atol=1e-5)
    assert torch.allclose(rating, model.rating_centre + model.rating_half_width * model.rating(cls).squeeze(-1),
                          atol=1e-5)
    params = list(model.parameters())
    fast = torch.autograd.grad(model(ids, attention_mask=mask).logits.sum(), params, allow_unused=True)
    plain = torch.autograd.grad(model.polarity(model.bert(ids, attention_mask=mask)[:, 0]).sum(), params,
                                allow_unused=True)
    for p, a, b in zip(params, fast, plain):  # the last layer's unused query rows get zero gradient either way
        zero = torch.zeros_like(p)
        assert torch.allclose(zero if a is None else a, zero if b is None else b, atol=1e-5)


def test_no_mask_on_an_unpadded_batch_equals_an_all_true_mask():
    model = _classifier()
    ids, _ = _padded_batch()
    with_mask = model(ids, attention_mask=torch.ones_like(ids, dtype=torch.bool))
    without = model(ids, attention_mask=None)
    for field in ("logits", "rating", "cls"):
        assert torch.allclose(getattr(with_mask, field), getattr(without, field), atol=1e-6)


def test_classify_texts_gives_the_same_results_in_any_batching():
    model, tokenizer = _classifier(), _tokenizer()
    one_by_one = classify_texts(model, tokenizer, TEXTS, max_len=16, batch_size=1)
    batched = classify_texts(model, tokenizer, TEXTS, max_len=16, batch_size=3)
    assert [r["label"] for r in one_by_one] == [r["label"] for r in batched]
    for a, b in zip(one_by_one, batched):
        assert abs(a["probability"] - b["probability"]) < 1e-5 and abs(a["rating"] - b["rating"]) < 1e-3


def test_fill_mask_gives_the_same_results_in_any_batching():
    torch.manual_seed(0)
    model, tokenizer = BertForMaskedLM(ModelConfig(**CFG)).eval(), _tokenizer()
    texts = [t.replace(" ", " [MASK] ", 1) for t in TEXTS] + ["[MASK] cat [MASK]"]
    one_by_one = [fill_mask(model, tokenizer, [t], top_k=3)[0] for t in texts]
    all_in_one = fill_mask(model, tokenizer, texts, top_k=3, batch_size=len(texts))  # the former single batch
    sorted_batches = fill_mask(model, tokenizer, texts, top_k=3, batch_size=2)
    for results in (all_in_one, sorted_batches):
        assert [[[c["id"] for c in m] for m in r] for r in results] == \
               [[[c["id"] for c in m] for m in r] for r in one_by_one]
        for r, ref in zip(results, one_by_one):
            for m, m_ref in zip(r, ref):
                assert all(abs(c["prob"] - c_ref["prob"]) < 1e-5 for c, c_ref in zip(m, m_ref))
    assert [len(r) for r in sorted_batches] == [1] * len(TEXTS) + [2]


@pytest.mark.parametrize("arch", ["bert", "modernbert", "deberta"])
def test_mean_pooling_reads_the_real_tokens_only(arch):
    """model.classifier_pooling=mean: the heads read the mean of the real tokens' final states;
    a padded row gives what it gives alone, and the result is the mean computed by hand."""
    from lmforge.config import ModelConfig
    from lmforge.models.classifier import Classifier

    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                      max_position_embeddings=32, dropout=0.0, classifier_pooling="mean",
                      type_vocab_size=0 if arch == "deberta" else 2)
    model = Classifier(cfg, 3).eval()
    short = torch.tensor([[1, 7, 8, 9, 2]])
    padded = torch.tensor([[1, 7, 8, 9, 2, 0, 0], [1, 5, 6, 7, 8, 9, 2]])
    mask = torch.tensor([[1] * 5 + [0, 0], [1] * 7])
    with torch.no_grad():
        alone = model(short).logits
        both = model(padded, attention_mask=mask).logits
        states = model.encoder(short, None, None)
        by_hand = model.polarity(states.mean(1))
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, by_hand, atol=1e-6, rtol=1e-6)
    cls_model = Classifier(dataclasses.replace(cfg, classifier_pooling="cls"), 3).eval()
    cls_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(cls_model(short).logits, alone)  # the pooling is what changed
