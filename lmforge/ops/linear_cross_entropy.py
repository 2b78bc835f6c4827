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
    whose arg-max logit is the target."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
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
            grad_weight = torch.zeros_like(weight, dtype=acc_dtype)
            grad_bias = None if bias is None else torch.zeros_like(bias, dtype=acc_dtype)
        for start in range(0, n, chunk_rows):
            x = x_all[start:start + chunk_rows]
            t = targets[start:start + chunk_rows]
            logits = (torch.addmm(b, x, w.t()) if b is not None else x @ w.t()).to(acc_dtype)  # (c, vocab)
            top, predicted = logits.max(-1)
            correct += (predicted == t).sum()
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            logits.sub_(top[:, None]).exp_()  # in place: exp(logit - max), numerically safe
            total = logits.sum(-1)
            loss_sum += (top + total.log() - target_logit).sum()  # logsumexp - target logit
            if need_grad:
                probs = logits.div_(total[:, None])  # softmax, in place
                probs[torch.arange(t.numel(), device=t.device), t] -= 1.0  # d loss / d logits
                g = probs.to(compute_dtype)
                grad_hidden[start:start + chunk_rows] = g @ w
                grad_weight.addmm_(g.t(), x.to(acc_dtype))  # (vocab, c) @ (c, h), summed over chunks
                if grad_bias is not None:
                    grad_bias += probs.sum(0)
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias if grad_bias is not None else grad_hidden.new_empty(0))
        ctx.has_bias = bias is not None
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        outs = [None, None, None]
        if ctx.needs_input_grad[0]:
            outs[0] = (grad_hidden * grad_loss).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            outs[1] = (grad_weight * grad_loss).to(ctx.dtypes[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            outs[2] = (grad_bias * grad_loss).to(ctx.dtypes[2])
        return outs[0], outs[1], outs[2], None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused, chunked `reference_linear_cross_entropy`: same arguments, same results (to float
    rounding), same gradients, but the (n, vocab) logits never exist at once.
    hidden (n, h), weight (vocab, h), bias (vocab,) or None, targets (n,) int64 in [0, vocab).
    Returns (loss_sum, correct) as scalars; only loss_sum is differentiable."""
    if hidden.size(0) == 0:
        zero = (hidden.sum() + weight.sum() * 0.0).float() * 0.0
        return zero, torch.zeros((), dtype=torch.int64, device=hidden.device)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows)
