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
    """A ClassifyTask on texts of many lengths (1 to 12 words)."""
    path = tmp_path / "lengths.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{' '.join(['good'] * (1 + i % 12))} film\t{i % 2}\n"
                                              for i in range(400)))
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
