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


def _llama():
    from lmforge.models.llama import Llama

    torch.manual_seed(0)
    return Llama(ModelConfig(arch="llama", vocab_size=100, hidden_size=16, num_layers=2, num_heads=2,
                             intermediate_size=32, max_position_embeddings=16, tie_embeddings=False, dropout=0.0))


def test_muon_steps_the_blocks_matrices_and_adamw_everything_else():
    from lmforge.train.optim import MuonWithAdamW, hidden_matrices

    for model, per_layer in ((BertForMaskedLM(ModelConfig(vocab_size=50, hidden_size=8, num_layers=2, num_heads=2,
                                                           intermediate_size=16, max_position_embeddings=8)), 6),
                             (_llama(), 7)):  # q, k, v, out, ffn in/out (+ the gate of SwiGLU)
        hidden = {id(p) for p in hidden_matrices(model)}
        assert len(hidden) == 2 * per_layer and all(p.dim() == 2 for p in hidden_matrices(model))
        opt = MuonWithAdamW(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02), torch.device("cpu"))
        muon = {id(p) for p in opt.param_groups[0]["params"]}
        adam = {id(p) for g in opt.param_groups[1:] for p in g["params"]}
        assert muon == hidden and not muon & adam and muon | adam == {id(p) for p in model.parameters()}
        assert opt.param_groups[0]["lr_scale"] == pytest.approx(20.0)  # 0.02 / 1e-3
    head = model.head.weight  # an untied LM head is a matrix, but not a hidden one
    assert id(head) in adam and id(model.token.weight) in adam


def _train(model, opt, steps, seed=0):
    from lmforge.train.optim import set_lr

    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        set_lr(opt, 1e-3 * (1 + step % 3))  # a schedule that moves: lr_scale must follow it
        ids = torch.randint(0, 100, (4, 12), generator=g)
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss_sum / ids[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_muon_with_adamw_equals_torchs_two_optimizers_stepped_side_by_side():
    from lmforge.train.optim import MuonWithAdamW, hidden_matrices, make_adamw

    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1, decay="2d")
    a, b = _llama(), _llama()
    ours = MuonWithAdamW(a, cfg, torch.device("cpu"))
    hidden = hidden_matrices(b)
    muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    adamw = make_adamw(b, cfg, torch.device("cpu"), exclude=frozenset(map(id, hidden)))
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        lr = 1e-3 * (1 + step % 3)
        for group in ours.param_groups:
            group["lr"] = lr * group["lr_scale"]
        muon.param_groups[0]["lr"], adamw.param_groups[0]["lr"], adamw.param_groups[1]["lr"] = 20 * lr, lr, lr
        ids = torch.randint(0, 100, (4, 12), generator=g)
        for model, opts in ((a, [ours]), (b, [muon, adamw])):
            loss = model(ids[:, :-1], targets=ids[:, 1:]).loss_sum
            loss.backward()
            for o in opts:
                o.step()
                o.zero_grad()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.blocks[0].attn.q.weight, _llama().blocks[0].attn.q.weight)  # it moved


def test_muon_state_round_trips_through_a_checkpoint_for_an_exact_resume():
    from lmforge.runs.checkpoint import optimizer_tensors, restore_optimizer
    from lmforge.train.optim import make_optimizer

    cfg = OptimConfig(name="muon", lr=1e-3)
    full_model = _llama()
    full = make_optimizer(full_model, cfg, torch.device("cpu"))
    losses = _train(full_model, full, 6)
    cut_model = _llama()
    cut = make_optimizer(cut_model, cfg, torch.device("cpu"))
    first = _train(cut_model, cut, 3)
    tensors, meta = optimizer_tensors(cut.state_dict())
    assert any(k.endswith("momentum_buffer") for k in tensors) and any(k.endswith("exp_avg_sq") for k in tensors)
    resumed_model = _llama()
    resumed_model.load_state_dict(cut_model.state_dict())
    resumed = make_optimizer(resumed_model, cfg, torch.device("cpu"))
    restore_optimizer(resumed, tensors, meta)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # the same batches the full run saw in its first 3 steps, then its next 3
        torch.randint(0, 100, (4, 12), generator=g)
    rest = []
    from lmforge.train.optim import set_lr
    for step in range(3, 6):
        set_lr(resumed, 1e-3 * (1 + step % 3))
        ids = torch.randint(0, 100, (4, 12), generator=g)
        loss = resumed_model(ids[:, :-1], targets=ids[:, 1:]).loss_sum / ids[:, 1:].numel()
        resumed.zero_grad()
        loss.backward()
        resumed.step()
        rest.append(loss.item())
    assert first + rest == losses
    for pa, pb in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_muon_under_a_strategy_that_shards_matrices_is_refused_in_one_line(strategy):
    from lmforge.config import load_config
    from lmforge.distributed import Parallel, make_engine
    from lmforge.errors import LmforgeError

    cfg = load_config(None, ["optim.name=muon", f"distributed.strategy={strategy}"])
    with pytest.raises(LmforgeError, match=f"optim.name=muon needs every rank to hold whole matrices, and "
                                           f"distributed.strategy={strategy} shards them"):
        make_engine(_llama(), cfg, Parallel(rank=0, world=2), torch.device("cpu"), "fp32",
                    lambda m: pytest.fail("no optimizer is made before the refusal"))
