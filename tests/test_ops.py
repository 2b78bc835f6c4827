"""Every fast path in lmforge/ops against its plain reference (llm.c's habit)."""

import pytest
import torch

from lmforge.ops.linear_cross_entropy import linear_cross_entropy, reference_linear_cross_entropy


def _inputs(n, vocab, hidden, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    b = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    return x, w, b, t


def _grads(fn, x, w, b, t, scale):
    for p in (x, w, b):
        if p is not None:
            p.grad = None
    loss, correct = fn(x, w, b, t)
    (loss * scale).backward()
    return loss.detach(), int(correct), [p.grad.clone() for p in (x, w, b) if p is not None]


@pytest.mark.parametrize("n,chunk", [(37, 8), (64, 64), (5, 256), (130, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_cross_entropy_matches_reference_loss_count_and_grads(n, chunk, bias):
    x, w, b, t = _inputs(n, 97, 16, bias)
    t[:3] = (x[:3].detach() @ w.detach().t()).argmax(-1)  # a few rows right, so `correct` is tested
    ref = _grads(reference_linear_cross_entropy, x, w, b, t, 0.37)
    fused = _grads(lambda *a: linear_cross_entropy(*a, chunk_rows=chunk), x, w, b, t, 0.37)
    assert torch.allclose(fused[0].double(), ref[0].double(), rtol=1e-6)
    assert fused[1] == ref[1] >= 3
    for got, want in zip(fused[2], ref[2]):
        assert got.dtype == want.dtype
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)


def test_fused_linear_cross_entropy_float32_matches_reference():
    x, w, b, t = (v.float().detach().requires_grad_() if v.is_floating_point() else v for v in _inputs(300, 1000, 32))
    ref = _grads(reference_linear_cross_entropy, x, w, b, t, 1 / 300)
    fused = _grads(lambda *a: linear_cross_entropy(*a, chunk_rows=64), x, w, b, t, 1 / 300)
    assert torch.allclose(fused[0], ref[0], rtol=1e-5)
    for got, want in zip(fused[2], ref[2]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_fused_linear_cross_entropy_without_grad_and_with_no_rows():
    x, w, b, t = _inputs(20, 50, 8)
    with torch.no_grad():
        loss, correct = linear_cross_entropy(x, w, b, t, chunk_rows=6)
    ref, ref_correct = reference_linear_cross_entropy(x.detach(), w.detach(), b.detach(), t)
    assert torch.allclose(loss.double(), ref.double()) and int(correct) == int(ref_correct)
    loss, correct = linear_cross_entropy(x[:0], w, b, t[:0])
    assert float(loss.detach()) == 0.0 and int(correct) == 0
    loss.backward()  # an empty batch still gives (zero) gradients, not an error
    assert float(w.grad.abs().sum()) == 0.0


# -- dropout ---------------------------------------------------------------------------------------
from lmforge.ops.attention import attention  # noqa: E402
from lmforge.ops.dropout import dropout, drop_threshold, keep_mask, reference_dropout  # noqa: E402


@pytest.mark.parametrize("p", [0.1, 0.5, 0.02])
def test_dropout_drops_at_rate_p_within_binomial_spread_and_keeps_the_mean(p):
    torch.manual_seed(0)
    n = 400_000
    x = torch.ones(n)
    y = dropout(x, p, training=True)
    dropped = float((y == 0).float().mean())
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(dropped - p) < 5 * sd
    assert abs(float(y.mean()) - 1.0) < 5 * sd / (1 - p)  # kept values are scaled by 1/(1 - rate)
    assert abs(drop_threshold(p) / 65536 - p) <= 1 / 65536


def test_dropout_matches_the_reference_given_the_same_mask_forward_and_backward():
    x = torch.randn(3, 5, 7, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.3, training=True)
    y.backward(torch.arange(105.0).view(3, 5, 7))
    torch.manual_seed(1)
    keep = keep_mask(x.shape, 0.3, x.device)  # the same draws, in the same order
    xr = x.detach().clone().requires_grad_()
    yr = reference_dropout(xr, keep, 0.3)
    yr.backward(torch.arange(105.0).view(3, 5, 7))
    assert torch.allclose(y, yr) and torch.allclose(x.grad, xr.grad)
    assert 0 < int(keep.sum()) < 105


def test_dropout_is_reproducible_under_a_seed_and_identity_in_eval():
    x = torch.randn(64, 64)
    torch.manual_seed(5)
    a = dropout(x, 0.1, True)
    torch.manual_seed(5)
    assert torch.equal(a, dropout(x, 0.1, True))
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x


def test_attention_without_dropout_is_sdpa_and_with_dropout_matches_the_reference_math():
    from lmforge.models.bert import naive_attention
    from lmforge.models.gpt import naive_causal_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, 5:] = False
    assert torch.allclose(attention(q, k, v, key_mask[:, None, None, :]), naive_attention(q, k, v, key_mask), atol=1e-6)
    assert torch.allclose(attention(q, k, v, is_causal=True), naive_causal_attention(q, k, v), atol=1e-6)
    for causal in (False, True):
        torch.manual_seed(2)
        got = attention(q, k, v, None if causal else key_mask[:, None, None, :], dropout_p=0.2, is_causal=causal)
        torch.manual_seed(2)
        keep = keep_mask((2, 3, 9, 9), 0.2, q.device)
        scores = (q @ k.transpose(-2, -1)) / 8 ** 0.5
        allowed = torch.ones(9, 9, dtype=torch.bool).tril() if causal else key_mask[:, None, None, :]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        assert torch.allclose(got, reference_dropout(probs, keep, 0.2) @ v, atol=1e-6)


def test_fused_linear_cross_entropy_under_bf16_autocast_is_close_to_the_reference():
    x, w, b, t = (v.float().detach().requires_grad_() if v.is_floating_point() else v for v in _inputs(70, 300, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(reference_linear_cross_entropy, x, w, b, t, 1 / 70)
        fused = _grads(lambda *a: linear_cross_entropy(*a, chunk_rows=32), x, w, b, t, 1 / 70)
    assert abs(float(fused[0]) - float(ref[0])) < 0.02 * abs(float(ref[0]))
    for got, want in zip(fused[2], ref[2]):
        assert got.dtype == want.dtype == torch.float32
        assert (got - want).abs().max() < 0.05 * want.abs().max()


from lmforge.ops.linear_distill import linear_distill, reference_linear_distill  # noqa: E402


def _distill_grads(fn, x, w, b, tx, tw, tb, t, temperature, scale):
    for p in (x, w, b):
        if p is not None:
            p.grad = None
    loss, soft, hard, correct, agreement = fn(x, w, b, tx, tw, tb, t, temperature, 5.0, 2.0)
    (loss * scale).backward()
    return ([loss.detach(), soft, hard], (int(correct), int(agreement)),
            [p.grad.clone() for p in (x, w, b) if p is not None])


@pytest.mark.parametrize("n,chunk", [(37, 8), (64, 64), (130, 7)])
@pytest.mark.parametrize("bias,temperature", [(True, 2.0), (False, 1.0), (True, 3.5)])
def test_fused_linear_distill_matches_reference_losses_counts_and_grads(n, chunk, bias, temperature):
    x, w, b, t = _inputs(n, 97, 16, bias)
    tx, tw, tb, _ = _inputs(n, 97, 24, bias, seed=1)  # a teacher of another width
    t[:3] = (x[:3].detach() @ w.detach().t()).argmax(-1)  # a few rows right, so `correct` is tested
    tx.data[3:6] = 0.0
    if tb is not None:  # and a few rows where the teacher's top token is the student's
        tb.data.copy_(b.detach())
    tw.data[:, :16] = w.detach()
    tx.data[:6, :16] = x.detach()[:6]
    ref = _distill_grads(reference_linear_distill, x, w, b, tx, tw, tb, t, temperature, 0.37)
    fused = _distill_grads(lambda *a: linear_distill(*a, chunk_rows=chunk), x, w, b, tx, tw, tb, t, temperature, 0.37)
    for got, want in zip(fused[0], ref[0]):
        assert torch.allclose(got.double(), want.double(), rtol=1e-6, atol=1e-9)
    assert fused[1] == ref[1] and ref[1][0] >= 3 and ref[1][1] >= 3
    for got, want in zip(fused[2], ref[2]):
        assert got.dtype == want.dtype
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)
    assert tw.grad is None and tx.grad is None  # the teacher learns nothing


def test_fused_linear_distill_of_a_student_equal_to_its_teacher_has_zero_soft_loss_and_edge_cases():
    x, w, b, t = _inputs(20, 50, 8)
    loss, soft, hard, correct, agreement = linear_distill(x, w, b, x, w, b, t, 2.0, 5.0, 0.0, chunk_rows=6)
    assert abs(float(soft)) < 1e-9 and int(agreement) == 20 and float(loss.detach()) == 5.0 * float(soft)
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-9  # the soft term's gradient vanishes at the teacher
    with torch.no_grad():
        out = linear_distill(x, w, b, x, w, b, t, 2.0, 5.0, 2.0, chunk_rows=6)
    ref = reference_linear_distill(x.detach(), w.detach(), b.detach(), x, w, b, t, 2.0, 5.0, 2.0)
    assert all(torch.allclose(a.double(), r.double()) for a, r in zip(out, ref))
    empty = linear_distill(x[:0], w, b, x[:0], w, b, t[:0], 2.0, 5.0, 2.0)
    assert float(empty[0].detach()) == 0.0 and int(empty[3]) == int(empty[4]) == 0
    empty[0].backward()


def test_fused_linear_distill_float32_and_bf16_autocast_are_close_to_the_reference():
    f32 = lambda vs: [v.float().detach().requires_grad_() if v is not None and v.is_floating_point() else v  # noqa: E731
                      for v in vs]
    x, w, b, t = f32(_inputs(300, 1000, 32))
    tx, tw, tb, _ = f32(_inputs(300, 1000, 48, seed=1))
    ref = _distill_grads(reference_linear_distill, x, w, b, tx, tw, tb, t, 2.0, 1 / 300)
    fused = _distill_grads(lambda *a: linear_distill(*a, chunk_rows=64), x, w, b, tx, tw, tb, t, 2.0, 1 / 300)
    for got, want in zip(fused[0], ref[0]):
        assert torch.allclose(got, want, rtol=1e-5)
    for got, want in zip(fused[2], ref[2]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _distill_grads(reference_linear_distill, x, w, b, tx, tw, tb, t, 2.0, 1 / 300)
        fused = _distill_grads(lambda *a: linear_distill(*a, chunk_rows=64), x, w, b, tx, tw, tb, t, 2.0, 1 / 300)
    for got, want in zip(fused[0], ref[0]):
        assert abs(float(got) - float(want)) < 0.02 * abs(float(want))
    for got, want in zip(fused[2], ref[2]):
        assert got.dtype == want.dtype == torch.float32
        assert (got - want).abs().max() < 0.05 * want.abs().max()
