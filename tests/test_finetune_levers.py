"""The fine-tuning levers issue 20 measures: layer-wise lr decay, label smoothing, R-Drop, and
BERT's pooler as the pooled state."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig, OptimConfig, load_config
from lmforge.errors import LmforgeError
from lmforge.models.classifier import Classifier
from lmforge.tasks.classify import ClassifyTask
from lmforge.train.optim import make_optimizer, set_lr

SMALL = dict(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32,
             max_position_embeddings=16)


def test_layer_lr_decay_scales_each_layer_by_its_depth_and_the_heads_not_at_all():
    model = Classifier(ModelConfig(**SMALL), 2, (-4.0, 4.0))
    opt = make_optimizer(model, OptimConfig(layer_lr_decay=0.5), torch.device("cpu"))
    set_lr(opt, 1e-3)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every parameter in exactly one group
    names = dict(model.named_parameters())
    for name, p in names.items():
        if name.startswith("bert.embeddings."):
            expected = 0.5 ** 4  # below the 3 layers
        elif name.startswith("bert.layers."):
            expected = 0.5 ** (3 - int(name.split(".")[2]))
        else:  # heads
            expected = 1.0
        assert lr_of[id(p)] == pytest.approx(1e-3 * expected), name
    # weight decay still follows optim.decay within each part
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay_of[id(names["polarity.weight"])] > 0 and decay_of[id(names["polarity.bias"])] == 0
    plain = make_optimizer(model, OptimConfig(), torch.device("cpu"))
    assert len(plain.param_groups) == 2
    with pytest.raises(LmforgeError, match="does not combine with optim.name=muon"):
        load_config(None, ["optim.name=muon", "optim.layer_lr_decay=0.9"])


def _task(tmp_path, *overrides):
    """A ClassifyTask on a tiny file, without a run: to call its loss directly."""
    path = tmp_path / "r.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{w} film\t{y}\n" for w, y in [("good", 1), ("bad", 0)] * 20))
    cfg = load_config(None, ["task.name=classify", f"data.dataset={path}", "data.tokenizer=bert-base-uncased",
                             "data.seq_len=16", "model.hidden_size=16", "model.num_layers=1", "model.num_heads=2",
                             "model.intermediate_size=32", "model.max_position_embeddings=16", *overrides])
    torch.manual_seed(0)
    return ClassifyTask.create(cfg)


def test_label_smoothing_and_rdrop_change_the_loss_as_their_formulas_say(tmp_path):
    plain = _task(tmp_path, "model.dropout=0")
    batch = plain.collate(list(range(8)))
    model = plain.model.train()
    with torch.no_grad():
        logits = model(batch.tensors["input_ids"]).logits.float()
        base = plain.loss(model, batch)
        labels = batch.tensors["labels"]
        assert float(base.sums["ce"]) == pytest.approx(float(F.cross_entropy(logits, labels, reduction="sum")),
                                                              rel=1e-5)
        smooth = _task(tmp_path, "model.dropout=0", "classify.label_smoothing=0.2")
        smooth.model.load_state_dict(model.state_dict())
        log_p = logits.log_softmax(-1)
        by_hand = -(0.8 * log_p.gather(1, labels[:, None]).squeeze(1) + 0.2 * log_p.mean(-1)).sum()
        assert float(smooth.loss(smooth.model.train(), batch).sums["ce"]) == pytest.approx(float(by_hand),
                                                                                               rel=1e-5)
        # R-Drop without dropout: both passes agree, the KL term is 0 and the loss is the plain one
        same = _task(tmp_path, "model.dropout=0", "classify.rdrop=1.0")
        same.model.load_state_dict(model.state_dict())
        out = same.loss(same.model.train(), batch)
        assert float(out.sums["rdrop_kl"]) == pytest.approx(0.0, abs=1e-6)
        assert float(out.loss_sum) == pytest.approx(float(base.loss_sum), rel=1e-5)
        # with dropout the two passes differ, and the term is their symmetric KL, weighted
        noisy = _task(tmp_path, "model.dropout=0.3", "classify.rdrop=2.0")
        torch.manual_seed(1)
        out = noisy.loss(noisy.model.train(), batch)
        assert float(out.sums["rdrop_kl"]) > 0
        assert float(out.loss_sum) == pytest.approx(
            float(out.sums["ce"] + 2.0 * out.sums["rdrop_kl"]
                  + noisy.cfg.classify.rating_weight * out.sums.get("rating_abs_error", 0.0)), rel=1e-5)


def test_pooler_pooling_is_tanh_of_a_dense_layer_on_the_cls_state():
    torch.manual_seed(0)
    model = Classifier(ModelConfig(**SMALL, classifier_pooling="pooler", dropout=0.0), 3).eval()
    ids = torch.randint(5, 50, (2, 7))
    with torch.no_grad():
        out = model(ids)
        cls = model.bert(ids)[:, 0]
        expected = model.polarity(torch.tanh(model.pooler(cls)))
    assert torch.allclose(out.logits, expected, atol=1e-6) and out.logits.shape == (2, 3) and out.rating is None
    assert not math.isnan(float(out.logits.sum()))


def _varied_task(tmp_path, *overrides):
    """A ClassifyTask on texts of many lengths (1 to 12 words), with ratings."""
    path = tmp_path / "lengths.tsv"
    path.write_text("text\tlabel\trating\n" + "".join(
        f"{' '.join(['good'] * (1 + i % 12))} film\t{i % 2}\t{(i % 7 - 3) * 0.5 + (i % 2)}\n" for i in range(400)))
    cfg = load_config(None, ["task.name=classify", f"data.dataset={path}", "data.tokenizer=bert-base-uncased",
                             "data.seq_len=16", "model.hidden_size=16", "model.num_layers=1", "model.num_heads=2",
                             "model.intermediate_size=32", "model.max_position_embeddings=16",
                             "train.batch_size=8", *overrides])
    return ClassifyTask.create(cfg)


def test_length_buckets_off_is_the_plain_seeded_shuffle_and_pads_more(tmp_path):
    import random

    from lmforge.rng import derive_seed

    bucketed, plain = _varied_task(tmp_path), _varied_task(tmp_path, "classify.length_buckets=false")
    order = list(plain.split["train"])
    random.Random(derive_seed(0, "classify-epoch", 0)).shuffle(order)
    assert plain._order_of_epoch(0) == order
    assert sorted(bucketed._order_of_epoch(0)) == sorted(order) != bucketed._order_of_epoch(0)

    def padding(task):
        batches = [task.train_batch(step, 0) for step in range(task.steps_per_epoch())]
        return 1 - sum(b.num_tokens for b in batches) / sum(b.tensors["input_ids"].numel() for b in batches)

    assert padding(bucketed) < 0.5 * padding(plain)


def test_token_noise_replaces_text_tokens_by_random_ordinary_ones_afresh_each_epoch(tmp_path):
    clean = _varied_task(tmp_path)
    task = _varied_task(tmp_path, "classify.token_noise=0.3")
    again = _varied_task(tmp_path, "classify.token_noise=0.3")
    special = set(map(int, task.tokenizer.special_mask.nonzero()[0]))
    changed = total = 0
    for i in task.split["train"]:
        ids, noisy = task.ids[i], task.noisy_ids(i, 0)
        assert clean.noisy_ids(i, 0) == ids  # off: the example as it is
        assert len(noisy) == len(ids) and noisy[0] == ids[0] and noisy[-1] == ids[-1]  # [CLS] ... [SEP] kept
        assert noisy == again.noisy_ids(i, 0)  # the seed, epoch and example decide it
        replaced = [b for a, b in zip(ids[1:-1], noisy[1:-1]) if a != b]
        assert not special & set(replaced)
        changed, total = changed + len(replaced), total + len(ids) - 2
    assert 0.25 < changed / total < 0.35  # ~30% (a replacement can draw the same token: rarely)
    i = task.split["train"][0]
    assert any(task.noisy_ids(i, 0) != task.noisy_ids(i, e) for e in (1, 2, 3))  # a fresh draw each epoch
    # training batches are noisy, evaluation's are not
    step = task.train_batch(0, 0)
    rows = {int(k): r[:len(task.ids[int(k)])].tolist() for k, r in zip(step.tensors["index"], step.tensors["input_ids"])}
    assert rows == {k: task.noisy_ids(k, 0) for k in rows}
    assert task.collate(list(rows)).tensors["input_ids"].tolist() == clean.collate(list(rows)).tensors["input_ids"].tolist()


def test_token_noise_depends_on_the_global_batch_not_its_micro_batches(tmp_path):
    def rows_of_step(task, step, micro_batches):
        out = {}
        for micro in range(micro_batches):
            b = task.train_batch(step, micro)
            out.update({int(k): r.tolist()[:len(task.ids[int(k)])]
                        for k, r in zip(b.tensors["index"], b.tensors["input_ids"])})
        return out

    whole = _varied_task(tmp_path, "classify.token_noise=0.3")
    split = _varied_task(tmp_path, "classify.token_noise=0.3", "train.batch_size=4", "train.grad_accum_steps=2")
    for step in range(whole.steps_per_epoch() + 3):  # into the second epoch
        assert rows_of_step(whole, step, 1) == rows_of_step(split, step, 2)


def test_probe_first_fits_the_heads_to_the_frozen_encoder_and_nothing_else(tmp_path):
    from lmforge.tasks.classify import PROBE_L2

    plain = _varied_task(tmp_path, "model.dropout=0.1")
    probed = _varied_task(tmp_path, "model.dropout=0.1", "classify.probe_first=true")
    a, b = plain.model.state_dict(), probed.model.state_dict()
    heads = {"polarity.weight", "polarity.bias", "rating.weight", "rating.bias"}
    assert all(torch.equal(a[k], b[k]) for k in a if k not in heads)  # the encoder is untouched
    assert not any(torch.equal(a[k], b[k]) for k in heads)
    train = probed.split["train"]
    x, y = probed.pooled_features(train), probed.labels[torch.tensor(train)]
    # the polarity head is the regularised logistic regression's optimum: its gradient is ~0
    w = probed.model.polarity.weight.detach().clone().requires_grad_()
    c = probed.model.polarity.bias.detach().clone().requires_grad_()
    loss = F.cross_entropy(x @ w.T + c, y) + PROBE_L2 * w.pow(2).sum()
    gw, gc = torch.autograd.grad(loss, (w, c))
    assert gw.abs().max() < 1e-4 and gc.abs().max() < 1e-4
    untrained = F.cross_entropy(plain.model.polarity(x), y)
    assert F.cross_entropy(probed.model.polarity(x), y) < untrained
    # the rating head solves the ridge regression's normal equations
    m = probed.model
    target = (probed.ratings[torch.tensor(train)] - m.rating_centre) / m.rating_half_width
    residual = (m.rating(x).squeeze(1) - target).detach()
    assert abs(float(residual.mean())) < 1e-4  # the (unshrunk) bias: residuals sum to zero
    normal = x.T @ residual + PROBE_L2 * len(x) * m.rating.weight.detach().squeeze(0)
    assert normal.abs().max() < 1e-4 * (x.T @ target).abs().max()  # ~0 against the equations' scale
    # the features are the model's own pooled state, in example order, without dropout
    assert probed.model.training == plain.model.training
    ids, mask = probed.collate(train[:5]).tensors["input_ids"], probed.collate(train[:5]).tensors["attention_mask"]
    probed.model.eval()
    assert torch.allclose(probed.model.pool(ids, attention_mask=mask)[0], x[:5], atol=1e-5)
