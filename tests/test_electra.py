"""ELECTRA (task.name=electra): the generator/discriminator model, its loss at initialisation,
that no gradient crosses the sampling, seeded sampling, training, resume, fine-tuning from the
discriminator and its export as transformers' ElectraForPreTraining."""

import math
import signal

import pytest
import torch
import transformers

from conftest import interrupt_during_step, tiny_config
from lmforge.config import load_config
from lmforge.export import export_hf
from lmforge.models.bert import BertModel
from lmforge.models.electra import Electra, generator_config, row_uniforms
from lmforge.ops.linear_cross_entropy import linear_cross_entropy, reference_sample
from lmforge.tasks.loading import load_model
from lmforge.jobs import pretrain, resume
from lmforge.tasks.electra import ElectraTask, electra_loss
from lmforge.train.log import read_metrics

ELECTRA = ("task.name=electra", "mlm.mask_token_frac=1.0", "mlm.random_token_frac=0.0")


def _model(**overrides):
    cfg = load_config(None, ["task.name=electra", "model.vocab_size=500", "model.hidden_size=64",
                             "model.num_heads=4", "model.intermediate_size=128", "model.dropout=0",
                             *[f"{k}={v}" for k, v in overrides.items()]])
    torch.manual_seed(0)
    return cfg, Electra(cfg.model, cfg.electra.generator_frac, cfg.electra.share_embeddings)


def _batch(vocab=500, rows=4, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, seq), generator=g)
    selected = torch.rand(rows, seq, generator=g) < 0.15
    selected[:, 1] = True
    masked = ids.masked_fill(selected, 3)
    return {"input_ids": ids, "masked_ids": masked, "selected": selected,
            "sample_seeds": torch.arange(rows, dtype=torch.int64) + 100 * seed}


def test_generator_is_a_quarter_of_the_width_and_shares_the_embeddings():
    cfg, model = _model()
    gen = generator_config(cfg.model, 0.25)
    assert (gen.hidden_size, gen.num_heads, gen.intermediate_size, gen.num_layers) == (16, 1, 32, 2)
    names = list(model.state_dict())
    assert not any(n.startswith("generator.") and "embeddings" in n for n in names)  # one embedding table
    assert model.generator.project.in_features == 64 and model.generator.head_dense.out_features == 64
    # the discriminator's encoder has exactly a BERT encoder's tensors
    _, unshared = _model(**{"electra.share_embeddings": "false"})  # the generator's own embedding layer
    assert unshared.gen_embeddings is unshared.generator_embeddings is not unshared.bert.embeddings
    assert unshared(**{k: v for k, v in _batch().items()}).discriminator_logits.shape == (4, 24)
    bert = BertModel(cfg.model).state_dict()
    assert {k[len("bert."):]: v.shape for k, v in model.state_dict().items() if k.startswith("bert.")} == \
        {k: v.shape for k, v in bert.items()}


def test_shapes_and_loss_at_initialisation_are_uniform_guesses():
    cfg, model = _model()
    t = _batch()
    out = model(t["masked_ids"], t["input_ids"], t["selected"], t["sample_seeds"])
    n = int(t["selected"].sum())
    assert model.generator_logits(t["masked_ids"], t["selected"]).shape == (n, 500) and out.sampled.shape == (n,)
    assert out.discriminator_logits.shape == (4, 24) and out.replaced.shape == (4, 24)
    assert not out.replaced[~t["selected"]].any()  # only masked positions can be replaced
    loss = electra_loss(model, t, rtd_weight=50.0)
    tokens = t["input_ids"].numel()  # no padding: every token is a real one
    assert loss.per["rtd_loss"] == "real_tokens" and set(loss.terms) == {"real_tokens"}
    mlm, rtd = loss.sums["mlm_loss"] / n, loss.sums["rtd_loss"] / tokens
    assert mlm.item() == pytest.approx(math.log(500), abs=0.05)  # a uniform guess over the vocabulary
    assert rtd.item() == pytest.approx(math.log(2), abs=0.01)  # a coin: replaced or not
    # the loop's loss: the MLM sum over the masked tokens, the RTD term over the real tokens
    total = loss.loss_sum / n + loss.terms["real_tokens"] / tokens
    assert total.item() == pytest.approx(mlm.item() + 50 * rtd.item(), rel=1e-5)


def test_the_discriminator_loss_sends_no_gradient_into_the_generator():
    cfg, model = _model()
    t = _batch()
    out = model(t["masked_ids"], t["input_ids"], t["selected"], t["sample_seeds"])
    rtd = torch.nn.functional.binary_cross_entropy_with_logits(out.discriminator_logits, out.replaced)
    rtd.backward()
    for name, p in model.named_parameters():
        if name.startswith("generator."):
            assert p.grad is None or not p.grad.any(), name
    assert model.bert.embeddings.token.weight.grad.abs().sum() > 0  # the shared embeddings learn from both
    assert model.rtd_dense.weight.grad.abs().sum() > 0
    model.zero_grad()
    out.mlm_loss_sum.backward()
    assert model.generator.head_dense.weight.grad.abs().sum() > 0
    assert model.rtd_dense.weight.grad is None or not model.rtd_dense.weight.grad.any()


def test_fused_generator_loss_and_sampling_match_the_plain_path():
    cfg, model = _model()
    t = _batch(rows=6, seq=40)
    fused = model(t["masked_ids"], t["input_ids"], t["selected"], t["sample_seeds"])
    plain = model(t["masked_ids"], t["input_ids"], t["selected"], t["sample_seeds"], fused=False)
    torch.testing.assert_close(fused.mlm_loss_sum, plain.mlm_loss_sum, rtol=1e-5, atol=1e-4)
    assert fused.correct == plain.correct
    assert torch.equal(fused.sampled, plain.sampled)  # the same draw from the same uniforms
    grads = []
    for out in (fused, plain):
        model.zero_grad()
        out.mlm_loss_sum.backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_sampling_follows_the_softmax_and_each_row_draws_the_same_whatever_the_batch():
    weight = torch.randn(300, 16)
    hidden = torch.randn(4, 16).repeat(5000, 1)  # 4 distinct rows, 5,000 draws each
    u = torch.rand(20000, generator=torch.Generator().manual_seed(3))
    _, _, draws = linear_cross_entropy(hidden, weight, None, torch.zeros(20000, dtype=torch.int64), sample_u=u)
    probs = (hidden[:4] @ weight.t()).softmax(-1)
    for r in range(4):
        freq = torch.bincount(draws[r::4], minlength=300).float() / 5000
        assert (freq - probs[r]).abs().max() < 0.02
    assert torch.equal(draws, reference_sample(hidden @ weight.t(), u))
    seeds = torch.tensor([11, 12])
    together = row_uniforms(torch.tensor([4, 5]), seeds)
    assert torch.equal(together[4:], row_uniforms(torch.tensor([5]), seeds[1:]))  # a row's draw ignores the others
    assert not torch.equal(row_uniforms(torch.tensor([9]), torch.tensor([1])), row_uniforms(torch.tensor([9]), torch.tensor([2])))


def test_electra_trains_the_discriminator_and_resumes_exactly(tiny_prepared, tmp_path, monkeypatch):
    overrides = (*ELECTRA, "train.max_steps=12", "model.dropout=0.1")
    full_dir, summary = pretrain(tiny_config(tiny_prepared, tmp_path / "full", *overrides, "train.max_steps=40",
                                             "train.eval_every=20", "train.checkpoint_every=20", "optim.lr=3e-3"))
    val = [r for r in read_metrics(full_dir) if r["split"] == "validation"]
    # both parts learn (at this size and budget not yet beyond the unigram baseline and the share of
    # replaced tokens: see the README on ELECTRA at small budgets)
    assert val[-1]["rtd_loss"] < val[0]["rtd_loss"] < math.log(2) and val[-1]["loss"] < val[0]["loss"]
    assert 0.05 < val[-1]["replaced_share"] < 0.15  # most masked positions get another token than the original
    train = [r for r in read_metrics(full_dir) if r["split"] == "train"]
    assert {"mlm_loss", "rtd_loss", "rtd_accuracy"} <= set(train[0])
    assert "discriminator input" in (full_dir / "samples.md").read_text()

    a_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "a", *overrides))
    interrupt_during_step(monkeypatch, ElectraTask, 7, signal.SIGINT)
    cut_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "cut", *overrides))
    monkeypatch.undo()
    resume(cut_dir)
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if r["split"] == "train"]  # noqa: E731
    assert losses(cut_dir) == losses(a_dir)


def test_discriminator_loads_for_fine_tuning_and_exports_as_electra_for_pretraining(tiny_prepared, tmp_path):
    run_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path, *ELECTRA, "train.max_steps=3"))
    loaded = load_model(run_dir, mlm_head_required=False)
    assert loaded.electra is not None and loaded.notes
    ours = loaded.electra
    for k, v in loaded.model.state_dict().items():  # the encoder fine-tuning starts from: the discriminator's
        if k.startswith("bert."):
            assert torch.equal(v, ours.state_dict()[k]), k
    out = export_hf(run_dir, tmp_path / "hf")
    theirs = transformers.ElectraForPreTraining.from_pretrained(out).eval()
    ids = torch.randint(5, loaded.config.vocab_size, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours.discriminator_logits(ids, mask)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-4)
