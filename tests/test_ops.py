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
