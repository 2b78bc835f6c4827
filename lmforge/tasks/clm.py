"""Causal-language-model pretraining as a task: GPT + contiguous windows + next-token loss.

The prepared token stream (documents joined by <|endoftext|>) is cut into non-overlapping
windows of seq_len + 1 tokens, visited in a seeded random order (a fresh permutation per
epoch); a window gives inputs w[:-1] and targets w[1:]. Evaluation uses a fixed, evenly spread
set of validation windows: loss, perplexity, next-token accuracy, and the unigram baseline on the
same targets. At each evaluation a few samples from fixed prompts go to samples.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lmforge.config import Config
from lmforge.data.shards import PreparedData
from lmforge.data.windows import document_mask
from lmforge.eval.generate import generate
from lmforge.tasks.base import Batch, EvalResult, LossOutput, Table
from lmforge.tasks.corpus import CorpusTask
from lmforge.tasks.registry import register
from lmforge.tasks.mlm import unigram_log_probs


def clm_loss(model: nn.Module, tensors: dict[str, torch.Tensor]) -> LossOutput:
    """Summed next-token cross-entropy and correct-prediction count of one batch.
    tensors: "input_ids" and "targets", both (batch, seq) int64. The model fuses its vocabulary
    projection with the loss (lmforge/ops/linear_cross_entropy.py): no logits are kept."""
    out = model(tensors["input_ids"], targets=tensors["targets"], attention_mask=tensors.get("attention_mask"))
    return LossOutput(out.loss_sum, {"accuracy": out.correct})


@register
class CausalLMTask(CorpusTask):
    name = "clm"
    window_extra = 1  # inputs w[:-1], targets w[1:]

    kind, loss_name = "decoder", "causal-LM"  # GPT-2 or Llama

    def __init__(self, cfg: Config, data: PreparedData, model: nn.Module):
        super().__init__(cfg, data, model)
        self.setup_windows()
        self.unigram_logp = unigram_log_probs(data.unigram_counts())
        self._eval_windows = None

    def _batch(self, windows) -> Batch:
        w = torch.from_numpy(windows)
        tensors = {"input_ids": w[:, :-1], "targets": w[:, 1:]}
        if self.cfg.data.packing == "documents":  # attention within each document (data.packing)
            documents = document_mask(tensors["input_ids"], self.tokenizer.doc_separator_id)
            if documents is not None:
                tensors["attention_mask"] = documents
        return Batch(tensors, num_targets=w[:, 1:].numel(), num_tokens=w[:, 1:].numel())

    def train_batch(self, step: int, micro: int) -> Batch:
        shape = self.step_shape(step)
        total, rows = self.global_rows(shape.rows)
        return self._batch(self.samplers[shape.seq_len].next(total, rows))

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        return clm_loss(model, batch.tensors)

    @torch.no_grad()  # not inference_mode: sharded engines (ZeRO-3) keep tensors gathered here for training
    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult:
        n, b = self.eval_sizes()  # the same set at any split of the global batch
        if self._eval_windows is None:
            picks = self.val_windows.spread(n)
            self._eval_windows = self.val_windows.get(picks)
        was_training = model.training
        model.eval()
        loss_sum = unigram_sum = correct = 0.0
        count = 0
        logp = self.unigram_logp.to(device)
        for start in range(0, len(self._eval_windows), b):
            t = {k: v.to(device) for k, v in self._batch(self._eval_windows[start:start + b]).tensors.items()}
            out = model(t["input_ids"], targets=t["targets"], attention_mask=t.get("attention_mask"))  # fused
            targets = t["targets"].reshape(-1)
            loss_sum += out.loss_sum.item()
            correct += out.correct.item()
            unigram_sum += -logp[targets].sum().item()
            count += targets.numel()
        model.train(was_training)
        loss = loss_sum / count
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / count,
                   "unigram_loss": unigram_sum / count, "tokens_evaluated": count}
        table = self.samples(model)
        return EvalResult(metrics, "".join(f"- **{prompt}**{text}\n" for prompt, text in table.rows), table)

    def samples(self, model: nn.Module) -> Table:
        """A few continuations of the configured prompts (top-k 40, temperature 0.8, seed 0)."""
        table = Table(["prompt", "continuation"], [])
        base = getattr(model, "_orig_mod", model)  # generation runs the plain model (variable shapes)
        for prompt in [p for p in self.cfg.clm.sample_prompts.split("|") if p.strip()]:
            ids = self.tokenizer.encode(prompt)
            new = generate(base, ids, max_new_tokens=self.cfg.clm.sample_tokens, temperature=0.8, top_k=40,
                           seed=0, eot_id=self.tokenizer.eot_id)[0]
            table.rows.append([prompt, self.tokenizer.decode(new).replace("\n", " ")])
        return table

    def decode_batch(self, model: nn.Module, batch: Batch, rows: int = 4, max_tokens: int = 24) -> Table:
        """A training batch as the overfit test shows it: each row's first input tokens, the next
        tokens it should predict, and the model's predictions (greedy, position by position)."""
        t = batch.tensors
        logits = model(t["input_ids"], attention_mask=t.get("attention_mask")).logits
        predicted = logits.argmax(-1).cpu()
        table = Table(["input", "targets (next tokens)", "predicted"], [])
        for r in range(min(rows, t["input_ids"].size(0))):
            show = [self.tokenizer.decode([i]) for i in t["input_ids"][r, :max_tokens].tolist()]
            targets = [self.tokenizer.decode([i]) for i in t["targets"][r, :max_tokens].tolist()]
            preds = [self.tokenizer.decode([i]) for i in predicted[r, :max_tokens].tolist()]
            table.rows.append(["|".join(show), "|".join(targets), "|".join(preds)])
        return table

    def summary(self, last_eval: dict[str, float]) -> dict[str, float]:
        return {"val_loss": last_eval["loss"], "val_perplexity": last_eval["perplexity"],
                "unigram_val_loss": last_eval["unigram_loss"], "val_accuracy": last_eval["accuracy"]}
