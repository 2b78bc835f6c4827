"""The vocabulary projection and its cross-entropy in one pass, without keeping the logits.

For a language model the last matmul (hidden -> vocabulary logits) and its softmax are the
largest tensors of a step: for GPT-2's 50,304-entry vocabulary and 4,096 positions the logits
alone are 824 MB in fp32, and the plain path (`F.linear` then `F.cross_entropy`) writes them,
reads them for log-softmax, writes the log-probabilities, and in backward allocates, zeroes
and fills a gradient of the same size. Here the rows are processed in chunks: for each chunk
the logits are computed, turned in place into the softmax, and then into the gradient of the
loss with respect to the logits (softmax minus the one-hot target), which is immediately
multiplied back into the gradients of the hidden states, the weight and the bias. Only one
chunk of logits ever exists. Backward then only scales the stored gradients by the incoming
scalar. (The same trick as llm.c's fused classifier and Liger's fused linear cross-entropy.)

With `sample_u` it also draws one token per row from softmax(logits) — ELECTRA's generator
samples the tokens its discriminator must detect — by inverting each row's cumulative
distribution at the row's uniform number, on the same chunk of exponentiated logits (the
materialised path spent more time converting, normalising and sampling (n, vocab) tensors than
on the matmuls).

`reference_linear_cross_entropy` is the plain, obviously-correct path; tests/test_ops.py checks
the loss, the correct-prediction count and every gradient against it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Rows per chunk: big enough that the three matmuls per chunk stay efficient (the weight-gradient
# matmul has the chunk as its inner dimension), small enough that a chunk of logits
# (chunk x vocab floats, 25-50 MB for 30k-50k vocabularies) stays far below the full tensor.
DEFAULT_CHUNK_ROWS = 256


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain path: logits = hidden @ weight.T + bias, then summed cross-entropy.
    hidden (n, h), weight (vocab, h), bias (vocab,) or None, targets (n,) int64.
    Returns (loss_sum, correct): scalar float32 sum of per-row losses, scalar int64 count of rows
    whose arg-max logit is the target (the fused path also counts a target tied for the maximum)."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> None:
    """out = a @ b (or out += a @ b) without a temporary when the dtypes agree (fp32); with bf16
    operands and an fp32 accumulator, through a bf16 product."""
    if a.dtype == out.dtype:
        out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    else:
        out.add_(a @ b) if accumulate else out.copy_(a @ b)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor, block: int = 128) -> torch.Tensor:
    """For each column j of `weights` ((vocab, c), non-negative, unnormalised probabilities): the
    first row whose cumulative weight exceeds u[j] x the column's total. In two levels — sums of
    blocks of `block` rows, their running total to find the block, then a running total inside
    that block alone — because a running total over the whole (vocab, c) chunk along its first
    dimension cost more than the chunk's matmuls (measured: 41 ms a step for 614 x 30,522)."""
    vocab, c = weights.shape
    full = vocab // block * block
    sums = weights[:full].view(-1, block, c).sum(1)
    if full < vocab:
        sums = torch.cat([sums, weights[full:].sum(0, keepdim=True)])
    ends = sums.cumsum(0)  # (blocks, c): cumulative weight at the end of each block
    threshold = u * ends[-1]
    which = (ends < threshold).sum(0).clamp_(max=len(ends) - 1)  # the block holding each column's draw
    before = torch.where(which > 0, ends.gather(0, (which - 1).clamp(min=0)[None])[0], torch.zeros_like(threshold))
    rows = which[None, :] * block + torch.arange(block, device=weights.device)[:, None]  # (block, c)
    inside = torch.where(rows < vocab, weights.gather(0, rows.clamp(max=vocab - 1)), torch.zeros((), dtype=weights.dtype,
                                                                                                   device=weights.device))
    running = before + inside.cumsum(0)
    return (which * block + (running < threshold).sum(0)).clamp_(max=vocab - 1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, sample_u):
        n = hidden.size(0)
        need_grad = any(ctx.needs_input_grad[:3])
        compute_dtype = hidden.dtype
        if torch.is_autocast_enabled(hidden.device.type):  # run the matmuls as autocast would (bf16 on GPU)
            compute_dtype = torch.get_autocast_dtype(hidden.device.type)
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # softmax and sums: fp32 at least
        x_all = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        if need_grad:
            grad_hidden = torch.empty_like(hidden, dtype=acc_dtype)
            grad_weight = torch.empty_like(weight, dtype=acc_dtype)  # the first chunk writes it, later ones add
            grad_bias = None if bias is None else torch.empty_like(bias, dtype=acc_dtype)
        # Logits are computed transposed, (vocab, c): weight @ x.T runs 1.3-1.7x faster than
        # x @ weight.T on CPU BLAS for these shapes (measured: 126-170 against 75-100 GFLOP/s for
        # 256 rows of a 30k vocabulary), and every later matmul reads it in a fast layout too.
        # One buffer serves all chunks: fresh memory for each chunk would be paged in again.
        vocab = weight.size(0)
        buffer = torch.empty(vocab * min(n, chunk_rows), dtype=compute_dtype, device=hidden.device)
        if sample_u is not None:
            samples = torch.empty(n, dtype=torch.int64, device=hidden.device)
        for start in range(0, n, chunk_rows):
            x = x_all[start:start + chunk_rows]
            t = targets[start:start + chunk_rows]
            c = x.size(0)
            out = buffer[:vocab * c].view(vocab, c)
            logits = torch.addmm(b[:, None], w, x.t(), out=out) if b is not None else torch.mm(w, x.t(), out=out)
            logits = logits.to(acc_dtype)  # (vocab, c): column j holds row j's logits
            top = logits.amax(0)  # values only: a max with indices along dim 0 is ~5x slower
            columns = torch.arange(c, device=t.device)
            target_logit = logits[t, columns]
            correct += (target_logit >= top).sum()  # the target is (one of) the most likely
            logits.sub_(top).exp_()  # in place: exp(logit - max), numerically safe
            total = logits.sum(0)
            loss_sum += (top + total.log() - target_logit).sum()  # logsumexp - target logit
            if sample_u is not None:
                samples[start:start + c] = _inverse_cdf(logits, sample_u[start:start + c].to(acc_dtype))
            if need_grad:
                probs = logits.div_(total)  # softmax, in place
                probs[t, columns] -= 1.0  # d loss / d logits, (vocab, c)
                g = probs.to(compute_dtype)
                _matmul_into(grad_hidden[start:start + c], g.t(), w)
                first = start == 0
                _matmul_into(grad_weight, g, x, accumulate=not first)  # (vocab, c) @ (c, h), summed over chunks
                if grad_bias is not None:
                    torch.sum(probs, 1, out=grad_bias) if first else grad_bias.add_(probs.sum(1))
            # Under autocast `logits` is an fp32 copy and `g` a bf16 one, (vocab, c) each: dropped
            # here, not when the next chunk rebinds them, or two chunks' worth are alive at once
            # (measured: +42 MB at GPT-2's vocabulary, tests/test_runplan.py)
            logits = probs = g = None
        # Kept as plain attributes, not save_for_backward: backward hands them over and drops its
        # own reference, so autograd can adopt each as the parameter's .grad without a copy.
        ctx.grads = (grad_hidden, grad_weight, grad_bias) if need_grad else None
        ctx.has_bias = bias is not None
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        if sample_u is None:
            return loss_sum, correct
        ctx.mark_non_differentiable(samples)
        return loss_sum, correct, samples

    @staticmethod
    def backward(ctx, grad_loss, *unused):  # the counts and samples have no gradient
        return (*hand_over_grads(ctx, grad_loss, "linear_cross_entropy"), None, None, None)


def hand_over_grads(ctx, grad_loss: torch.Tensor, op: str) -> list[Optional[torch.Tensor]]:
    """Backward of a fused op that computed its gradients in forward (ctx.grads: hidden, weight,
    bias): scale them by the incoming scalar and hand them over, once."""
    if ctx.grads is None:
        raise RuntimeError(f"{op}: backward called twice (its gradients are handed over once)")
    grad_hidden, grad_weight, grad_bias = ctx.grads
    ctx.grads = None
    outs = [None, None, None]
    # Scaled in place: these buffers belong to this call alone, and a new 30-50 MB weight
    # gradient would cost another round of page faults.
    if ctx.needs_input_grad[0]:
        outs[0] = grad_hidden.mul_(grad_loss).to(ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        outs[1] = grad_weight.mul_(grad_loss).to(ctx.dtypes[1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        outs[2] = grad_bias.mul_(grad_loss).to(ctx.dtypes[2])
    return outs


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                         sample_u: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """Fused, chunked `reference_linear_cross_entropy`: same arguments, same results (to float
    rounding), same gradients, but the (n, vocab) logits never exist at once.
    hidden (n, h), weight (vocab, h), bias (vocab,) or None, targets (n,) int64 in [0, vocab).
    Returns (loss_sum, correct) as scalars; only loss_sum is differentiable. With `sample_u`
    ((n,) uniforms in [0, 1)), also (n,) int64 tokens drawn from each row's softmax (as
    `reference_sample` does from the logits)."""
    if hidden.size(0) == 0:
        zero = (hidden.sum() + weight.sum() * 0.0).float() * 0.0
        none = torch.zeros((), dtype=torch.int64, device=hidden.device)
        return (zero, none) if sample_u is None else (zero, none, torch.zeros(0, dtype=torch.int64, device=hidden.device))
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, sample_u)


def reference_sample(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Plain path for `sample_u`: (n, vocab) logits and (n,) uniforms -> (n,) tokens, the first
    whose cumulative softmax probability exceeds u."""
    probs = logits.float().softmax(-1)
    cdf = probs.cumsum(-1)
    return (cdf < u.float()[:, None] * cdf[:, -1:]).sum(-1).clamp_(max=logits.size(-1) - 1)
