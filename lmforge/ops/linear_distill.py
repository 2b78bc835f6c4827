"""Distillation's vocabulary-sized losses in one chunked pass, without keeping any logits.

General distillation (DistilBERT) compares, at every masked position, the student's softmax over
the whole vocabulary with the teacher's, at temperature T, and adds the student's cross-entropy
with the true token. Written plainly (`reference_linear_distill`) that is two (n, vocab) logit
matrices, three log-softmaxes, a KL and a cross-entropy with their backward passes: some twenty
passes over vocabulary-sized tensors, which took ~70% of a bert-tiny-sized distillation step
here, far more than the matmuls. Here, as in linear_cross_entropy.py, rows go in chunks: each
chunk's student and teacher logits are computed, the losses taken, and the gradient with respect
to the student's logits,

    hard_weight x (softmax(z) - onehot(target)) + soft_weight x T x (softmax(z / T) - softmax(z_t / T)),

(the T^2 on the KL term times d/dz of its 1/T-scaled logits) is multiplied straight back into
the gradients of the student's hidden states, decoder weight and bias. Backward only scales them.

Returned: the weighted loss (soft_weight x soft + hard_weight x hard, the only differentiable
output), soft = T^2 x summed KL(teacher || student), hard = summed cross-entropy, the number of
rows whose most likely token is the target, and of rows where the student's most likely token is
the teacher's (a tie for the student's maximum counts, as `correct` does).
tests/test_ops.py checks all of them and every gradient against the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lmforge.ops.linear_cross_entropy import _matmul_into, hand_over_grads

DEFAULT_CHUNK_ROWS = 128  # three (vocab x chunk) fp32 work buffers: 47 MB for a 30k vocabulary


def reference_linear_distill(hidden, weight, bias, t_hidden, t_weight, t_bias, targets, temperature: float,
                             soft_weight: float, hard_weight: float) -> tuple[torch.Tensor, ...]:
    """Plain path. hidden / t_hidden (n, h) student / teacher inputs of the vocabulary projection,
    weight / t_weight (vocab, h), bias / t_bias (vocab,) or None, targets (n,) int64.
    Returns (loss, soft, hard, correct, agreement), see the module docstring."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    with torch.no_grad():
        t_logits = F.linear(t_hidden, t_weight, t_bias).to(logits.dtype)
    soft = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                    log_target=True, reduction="sum") * temperature ** 2
    hard = F.cross_entropy(logits, targets, reduction="sum")
    predicted = logits.argmax(-1)
    return (soft_weight * soft + hard_weight * hard, soft.detach(), hard.detach(), (predicted == targets).sum(),
            (predicted == t_logits.argmax(-1)).sum())


def _logits_into(out: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor,
                 raw: Optional[torch.Tensor]) -> None:
    """(vocab, c) logits, transposed (linear_cross_entropy.py says why), into the fp32 `out`;
    through `raw`, a buffer of the matmuls' dtype, when that is not fp32 (bf16 autocast)."""
    dest = out if raw is None else raw[:out.numel()].view(out.shape)
    torch.addmm(bias[:, None], weight, x.t(), out=dest) if bias is not None else torch.mm(weight, x.t(), out=dest)
    if raw is not None:
        out.copy_(dest)


class _LinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, targets, temperature, soft_weight,
                hard_weight, chunk_rows):
        n, vocab = hidden.size(0), weight.size(0)
        need_grad = any(ctx.needs_input_grad[:3])
        compute = hidden.dtype
        if torch.is_autocast_enabled(hidden.device.type):
            compute = torch.get_autocast_dtype(hidden.device.type)
        acc = torch.promote_types(compute, torch.float32)
        x_all, w = hidden.to(compute), weight.to(compute)
        b = None if bias is None else bias.to(compute)
        tx_all, tw = t_hidden.to(compute), t_weight.to(compute)
        tb = None if t_bias is None else t_bias.to(compute)
        zero = lambda dtype: torch.zeros((), dtype=dtype, device=hidden.device)  # noqa: E731
        soft_sum, hard_sum, correct, agreement = zero(acc), zero(acc), zero(torch.int64), zero(torch.int64)
        if need_grad:
            grad_hidden = torch.empty_like(hidden, dtype=acc)
            grad_weight = torch.empty_like(weight, dtype=acc)
            grad_bias = None if bias is None else torch.empty_like(bias, dtype=acc)
        # Three fp32 work buffers of (vocab, chunk), reused by every chunk; every step below is in
        # place or reduces along dim 0 (a column sum over contiguous rows, which is fast).
        rows = min(n, chunk_rows)
        bufs = [torch.empty(vocab * rows, dtype=acc, device=hidden.device) for _ in range(3)]
        raw = torch.empty(vocab * rows, dtype=compute, device=hidden.device) if compute != acc else None
        inv_t = 1.0 / temperature
        for start in range(0, n, chunk_rows):
            x, t = x_all[start:start + chunk_rows], targets[start:start + chunk_rows]
            c = x.size(0)
            cols = torch.arange(c, device=t.device)
            z, zt, p_t = (buf[:vocab * c].view(vocab, c) for buf in bufs)
            _logits_into(z, w, b, x, raw)  # student, (vocab, c): column j holds row j's logits
            _logits_into(zt, tw, tb, tx_all[start:start + c], raw)  # teacher
            top = z.amax(0)
            target_logit = z[t, cols]
            correct += (target_logit >= top).sum()
            t_best = zt.argmax(0)
            agreement += (z[t_best, cols] >= top).sum()
            # teacher at T: L = (z_t - max) / T, p_t = exp(L) / total_t, sum(p_t log p_t) = <exp L, L> / total_t - log total_t
            logit_t = zt.sub_(zt[t_best, cols]).mul_(inv_t)
            torch.exp(logit_t, out=p_t)
            total_t = p_t.sum(0)
            plogp = logit_t.mul_(p_t).sum(0) / total_t - total_t.log()
            p_t.div_(total_t)
            # student at T: S = (z - max) / T; KL = sum(p_t log p_t) - <p_t, S> + log sum(exp S), where
            # <p_t, S> = (<p_t, z> - max) / T since p_t sums to 1
            cross = (torch.mul(p_t, z, out=zt).sum(0) - top) * inv_t
            q = torch.sub(z, top, out=zt).mul_(inv_t).exp_()
            total_q = q.sum(0)
            soft_sum += (plogp - cross + total_q.log()).sum() * temperature ** 2
            # cross-entropy at T = 1, in the student's logits
            e = z.sub_(top).exp_()
            total = e.sum(0)
            hard_sum += (top + total.log() - target_logit).sum()
            if need_grad:
                g = e.div_(total)
                g[t, cols] -= 1.0
                g.mul_(hard_weight).add_(q.div_(total_q), alpha=soft_weight * temperature)
                g.sub_(p_t, alpha=soft_weight * temperature)
                first = start == 0
                if grad_bias is not None:  # summed before the cast: in fp32 under bf16 autocast too
                    torch.sum(g, 1, out=grad_bias) if first else grad_bias.add_(g.sum(1))
                g = g.to(compute)
                _matmul_into(grad_hidden[start:start + c], g.t(), w)
                _matmul_into(grad_weight, g, x, accumulate=not first)
        ctx.grads = (grad_hidden, grad_weight, grad_bias) if need_grad else None
        ctx.has_bias = bias is not None
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(soft_sum, hard_sum, correct, agreement)  # one call: each call replaces the set
        loss = soft_sum * soft_weight + hard_sum * hard_weight
        return loss, soft_sum, hard_sum, correct, agreement

    @staticmethod
    def backward(ctx, grad_loss, *unused):  # the sums and counts have no gradient
        return (*hand_over_grads(ctx, grad_loss, "linear_distill"), None, None, None, None, None, None, None, None)


def linear_distill(hidden, weight, bias, t_hidden, t_weight, t_bias, targets, temperature: float,
                   soft_weight: float, hard_weight: float,
                   chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[torch.Tensor, ...]:
    """Fused, chunked `reference_linear_distill`: the same arguments and results (to float
    rounding) and gradients for hidden, weight and bias; the teacher's tensors get none."""
    if hidden.size(0) == 0:
        zero = (hidden.sum() + weight.sum() * 0.0).float() * 0.0
        none = torch.zeros((), dtype=torch.int64, device=hidden.device)
        return zero, zero.detach(), zero.detach(), none, none
    return _LinearDistill.apply(hidden, weight, bias, t_hidden.detach(), t_weight.detach(),
                                None if t_bias is None else t_bias.detach(), targets, temperature, soft_weight,
                                hard_weight, chunk_rows)
