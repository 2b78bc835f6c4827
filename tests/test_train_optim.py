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
