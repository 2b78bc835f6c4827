"""Text generation for GPT models: temperature, top-k, top-p sampling with a KV cache.

The prompt is run once through the model, keeping every layer's keys and values; each new token
then costs a single position's forward pass. `use_cache=False` recomputes the whole sequence at
every step (the slow reference the tests compare against). Logits of the vocabulary's padding
slots (beyond the tokenizer's real tokens) are set to -inf, so they are never produced.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from lmforge.errors import LmforgeError
from lmforge.rng import derive_seed


def next_token_distribution(logits: torch.Tensor, vocab_size: int, temperature: float, top_k: Optional[int],
                            top_p: Optional[float]) -> torch.Tensor:
    """(batch, padded_vocab) logits -> (batch, padded_vocab) probabilities after masking padding,
    temperature, top-k and top-p (nucleus) filtering."""
    logits = logits.float().clone()
    logits[:, vocab_size:] = float("-inf")
    logits = logits / temperature
    if top_k is not None and top_k < vocab_size:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already cover top_p
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def check_sampling(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float],
                   num_samples: int) -> None:
    """Raise LmforgeError naming the first setting `generate` cannot use (called before a model loads)."""
    checks = [
        (max_new_tokens >= 1, f"--max-new-tokens={max_new_tokens} must be at least 1"),
        (temperature >= 0, f"--temperature={temperature} must be at least 0 (0 = greedy)"),
        (top_k is None or top_k >= 1, f"--top-k={top_k} must be at least 1"),
        (top_p is None or 0 < top_p <= 1, f"--top-p={top_p} must be in (0, 1]; leave it out to sample from all"),
        (num_samples >= 1, f"--num-samples={num_samples} must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise LmforgeError(message)


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt_ids: list[int], *, max_new_tokens: int = 50, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, num_samples: int = 1, seed: int = 0,
             eot_id: Optional[int] = None, use_cache: bool = True) -> list[list[int]]:
    """Continue `prompt_ids` `num_samples` times. temperature 0 = greedy. A sample stops at the
    end-of-text token (not included) or after `max_new_tokens`, or when the model's position
    table is full. Returns the new token ids of each sample."""
    if not prompt_ids:
        raise LmforgeError("the prompt is empty; give at least one token of text")
    check_sampling(max_new_tokens, temperature, top_k, top_p, num_samples)
    max_pos = model.cfg.max_position_embeddings
    if len(prompt_ids) >= max_pos:
        print(f"warning: the prompt has {len(prompt_ids)} tokens; keeping its last {max_pos - 1} "
              f"(the model has {max_pos} positions)", file=sys.stderr)
        prompt_ids = prompt_ids[-(max_pos - 1):]  # keep the end of a too-long prompt
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "generate"))
    ids = torch.tensor([prompt_ids] * num_samples, device=device)
    out = [[] for _ in range(num_samples)]
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    cache = None
    step_input = ids
    for _ in range(max_new_tokens):
        if ids.size(1) >= max_pos:
            break
        if use_cache:
            step = model(step_input, past=cache, return_cache=True)
            logits, cache = step.logits, step.cache
        else:
            logits = model(ids).logits
        last = logits[:, -1]
        if temperature == 0:
            masked = last.float().clone()
            masked[:, model.vocab_size:] = float("-inf")
            token = masked.argmax(-1)
        else:
            probs = next_token_distribution(last, model.vocab_size, temperature, top_k, top_p)
            token = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        for i, t in enumerate(token.tolist()):
            if not done[i]:
                if eot_id is not None and t == eot_id:
                    done[i] = True
                else:
                    out[i].append(t)
        if done.all():
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        step_input = token[:, None]
    model.train(was_training)
    return out
