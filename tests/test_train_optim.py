"""Parameter groups (6·L + 1 decayed tensors) and learning-rate schedule values."""

import pytest
import torch

from lmforge.config import ModelConfig, OptimConfig
from lmforge.models.bert import BertForMaskedLM
from lmforge.train.optim import lr_at, make_optimizer, param_groups


@pytest.mark.parametrize("layers", [1, 3])
def test_weight_decay_on_linear_weights_only_6l_plus_1(layers):
    model = BertForMaskedLM(ModelConfig(vocab_size=50, hidden_size=8, num_layers=layers, num_heads=2,
                                        intermediate_size=16, max_position_embeddings=8))
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert len(decay["params"]) == 6 * layers + 1 and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    everything = [p for g in opt.param_groups for p in g["params"]]
    assert len(everything) == len(set(map(id, everything))) == len(list(model.parameters()))
    assert id(model.bert.embeddings.token.weight) in {id(p) for p in no_decay["params"]}  # not a Linear
    assert len(param_groups(model, 0.1)[0]["params"]) == 6 * layers + 1


def test_linear_schedule_values_at_start_warmup_middle_end():
    cfg = OptimConfig(lr=1e-3, warmup_frac=0.1, schedule="linear")
    assert lr_at(0, 1000, cfg) == pytest.approx(1e-4)
    assert lr_at(50, 1000, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(100, 1000, cfg) == pytest.approx(1e-3)
    assert lr_at(550, 1000, cfg) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(1000, 1000, cfg) == pytest.approx(1e-4)
    assert lr_at(999, 1000, cfg) > 1e-4


def test_cosine_and_constant_schedules():
    cos = OptimConfig(lr=1e-3, warmup_frac=0.1, schedule="cosine")
    assert lr_at(100, 1000, cos) == pytest.approx(1e-3)
    assert lr_at(550, 1000, cos) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(1000, 1000, cos) == pytest.approx(1e-4)
    const = OptimConfig(lr=1e-3, warmup_frac=0.0, schedule="constant")
    assert lr_at(0, 10, const) == lr_at(9, 10, const) == 1e-3


def _bert_adam_reference(params, grads_per_step, lrs, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01):
    """The original BERT optimizer, written out: no bias correction, decoupled weight decay."""
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for grads, lr in zip(grads_per_step, lrs):
        for i, (p, g) in enumerate(zip(params, grads)):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            params[i] = p - lr * (m[i] / (v[i].sqrt() + eps) + weight_decay * p)
    return params


def test_adam_without_bias_correction_is_the_original_bert_optimizer():
    torch.manual_seed(0)
    model = BertForMaskedLM(ModelConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2,
                                        intermediate_size=16, max_position_embeddings=8))
    cfg = OptimConfig(bias_correction=False, weight_decay=0.01, eps=1e-6)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    params = list(model.parameters())
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    start = [p.detach().clone() for p in params]
    grads = [[torch.randn_like(p) * 10 ** -(k % 3) for p in params] for k in range(6)]
    lrs = [1e-3 * (k + 1) for k in range(6)]
    for g, lr in zip(grads, lrs):
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    for i, p in enumerate(params):
        expected = _bert_adam_reference([start[i]], [[g[i]] for g in grads], lrs,
                                        weight_decay=0.01 if id(p) in decayed else 0.0)[0]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
    assert all(group["lr"] == lrs[-1] and group["eps"] == 1e-6 for group in opt.param_groups)  # restored
    # and the first steps differ from bias-corrected AdamW, whose first update is ~lr in size
    torch.manual_seed(0)
    plain = BertForMaskedLM(model.cfg)
    opt2 = make_optimizer(plain, OptimConfig(weight_decay=0.01, eps=1e-6), torch.device("cpu"))
    for p, gp in zip(plain.parameters(), grads[0]):
        p.grad = gp.clone()
    opt2.param_groups[0]["lr"] = opt2.param_groups[1]["lr"] = 1e-3
    opt2.step()
    first_corrected = (plain.bert.embeddings.token.weight - start[0]).abs().mean()
    first_bert = (_bert_adam_reference([start[0]], [[grads[0][0]]], [1e-3], weight_decay=0.0)[0] - start[0]).abs().mean()
    # uncorrected, the first update is m / sqrt(v) = (1 - beta1) / sqrt(1 - beta2) = 3.16 times lr, not
    # lr: the large early steps Zhang et al. blame for unstable fine-tuning
    assert (first_bert / first_corrected).item() == pytest.approx(0.1 / 0.001 ** 0.5, rel=0.01)
