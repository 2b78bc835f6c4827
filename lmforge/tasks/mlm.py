"""Masked-language-model pretraining as a task: an encoder + masked windows + loss on selected tokens.

Examples are non-overlapping windows of `seq_len - 2` tokens cut from the prepared token stream
(documents back to back, separated by [SEP]) and framed as [CLS] window [SEP], so no example
needs padding. The train windows are visited in a seeded random order, a fresh permutation each
epoch; masking is drawn when a batch is made, each row with a generator seeded by (seed, step,
row of the step's global batch), so the same step always sees the same masks — in a resumed run
too, and however the step is cut into micro-batches and processes.

With mlm.nsp the examples are sentence pairs instead (lmforge/data/nsp.py): [CLS] A [SEP] B
[SEP], B the true continuation of A half the time, masked the same way; next-sentence prediction
is trained beside MLM and evaluated on a fixed set of validation pairs (nsp_accuracy).

Evaluation uses a fixed set of validation windows with fixed masks (15%, 80/10/10, token by token:
EVAL_MASKING, whatever mlm.* trains with), so numbers from different steps, runs and recipes
are comparable. Next to the model's loss it reports the unigram baseline: the
loss of always predicting the train-split token frequencies, on the same masked positions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import Config
from lmforge.data.mlm import cross_entropy_selected, random_mask
from lmforge.data.nsp import Documents, PairBatches
from lmforge.data.shards import PreparedData
from lmforge.data.windows import document_mask
from lmforge.errors import LmforgeError
from lmforge.rng import generator_for
from lmforge.tasks.base import Batch, EvalResult, LossOutput, Table
from lmforge.tasks.corpus import CorpusTask
from lmforge.tasks.registry import register


# Validation masks: BERT's 15% of tokens, 80% of them [MASK], 10% random, 10% kept, token by
# token (no whole words), whatever mlm.* trains with. A run that trains masking 40% (Wettig et al.
# 2023) or whole words is then scored on the very positions a 15% run is, at the same unigram
# baseline: equal-time comparisons of recipes compare models, not tests.
EVAL_MASKING = dict(mask_prob=0.15, mask_token_frac=0.8, random_token_frac=0.1)


def unigram_log_probs(counts: np.ndarray) -> torch.Tensor:
    """(vocab,) float32 log-probabilities of the train-split token frequencies, add-one smoothed
    so that a token never seen in training has a finite loss."""
    counts = torch.as_tensor(counts, dtype=torch.float64) + 1.0
    return (counts / counts.sum()).log().float()


def mlm_loss(model: nn.Module, tensors: dict[str, torch.Tensor]) -> LossOutput:
    """Summed cross-entropy over the selected positions and their correct-prediction count.
    tensors: "masked_ids" (the model's input), "input_ids" (the original tokens) and "selected",
    all (batch, seq). The vocabulary projection runs on the selected positions only, fused with
    the loss (lmforge/ops/linear_cross_entropy.py).

    With next-sentence pairs (mlm.nsp: also "token_type_ids", "next_sentence_label" and, when
    padded, "attention_mask") the NSP cross-entropy is added, as the paper adds the two means:
    the NSP sum is a loss term over "examples" (Batch.counts), which the loop divides by the
    step's example count: the mean over the step's examples. Metrics: the MLM and NSP losses
    apart and the NSP accuracy (per example)."""
    selected = tensors["selected"]
    targets = tensors["input_ids"][selected]
    out = model(tensors["masked_ids"], token_type_ids=tensors.get("token_type_ids"),
                attention_mask=tensors.get("attention_mask"), selected=selected, targets=targets)
    if "next_sentence_label" not in tensors:
        return LossOutput(out.loss_sum, {"accuracy": out.correct})
    labels = tensors["next_sentence_label"]
    loss_sum, nsp = out.loss_sum, out.next_sentence_logits
    nsp_sum = F.cross_entropy(nsp.float(), labels, reduction="sum")
    nsp_correct = (nsp.argmax(-1) == labels).sum()
    return LossOutput(loss_sum, {"accuracy": out.correct, "mlm_loss": loss_sum.detach(), "nsp_loss": nsp_sum.detach(),
                                 "nsp_accuracy": nsp_correct},
                      terms={"examples": nsp_sum}, per={"nsp_loss": "examples", "nsp_accuracy": "examples"})


@register
class MaskedLMTask(CorpusTask):
    name = "mlm"
    window_extra = -2  # [CLS] window [SEP]

    kind, loss_name = "encoder", "MLM"  # BERT, ModernBERT, DeBERTa

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.data.packing == "documents" and cfg.mlm.nsp:
            raise LmforgeError("data.packing=documents masks attention inside windows of the token stream; "
                               "mlm.nsp's sentence pairs are cut from whole documents already: drop one of the two")
        if cfg.data.packing == "documents" and cls.name != "mlm":
            raise LmforgeError(f"data.packing=documents is for task.name=mlm and clm, not task.name={cls.name}")
        if cfg.mlm.nsp and cfg.model.arch != "bert":
            raise LmforgeError(f"mlm.nsp (next-sentence prediction) is BERT's; model.arch={cfg.model.arch} has no "
                               f"NSP head (ModernBERT and DeBERTa drop it: it does not help)")

    def __init__(self, cfg: Config, data: PreparedData, model: nn.Module):
        super().__init__(cfg, data, model)
        tok = data.tokenizer
        tok.require_bert(f"task.name={self.name}")
        self.special_mask = torch.as_tensor(tok.special_mask)
        if len(self.special_mask) < cfg.model.vocab_size:  # vocabulary padded beyond the tokenizer
            pad = torch.ones(cfg.model.vocab_size - len(self.special_mask), dtype=torch.bool)
            self.special_mask = torch.cat([self.special_mask, pad])
        # the sequence-length schedule's long steps read their own windows, in their own order
        # (NSP pairs are cut from whole documents at any length instead)
        self.setup_windows(long_windows=not cfg.mlm.nsp)
        long = cfg.data.long_seq_len
        self.unigram_logp = unigram_log_probs(data.unigram_counts())
        self.word_continuation = None  # ids of WordPiece continuation pieces ('##ing'), for whole-word masking
        if cfg.mlm.whole_word_mask:
            self.word_continuation = torch.zeros(len(self.special_mask), dtype=torch.bool)
            self.word_continuation[:tok.vocab_size] = torch.tensor(
                [tok.id_to_token(i).startswith("##") for i in range(tok.vocab_size)])
        self.pairs: dict[str, PairBatches] = {}  # mlm.nsp: pair makers for train and validation
        self.long_pairs = None  # and for the long steps of the sequence-length schedule
        if cfg.mlm.nsp:
            ends = [i for text in (".", "?", "!") for i in tok.encode(text)[:1]]
            for split in ("train", "validation"):
                docs = Documents(data.shards(split), tok.sep_id, ends)
                self.pairs[split] = PairBatches(docs, cfg.data.seq_len, cfg.train.seed, tok.cls_id, tok.sep_id,
                                                tok.pad_id)
            if long is not None:
                self.long_pairs = PairBatches(self.pairs["train"].docs, long, cfg.train.seed, tok.cls_id,
                                              tok.sep_id, tok.pad_id)
        self._eval_batches: list[Batch] | None = None

    # -- batches ---------------------------------------------------------------------------------
    def _frame(self, windows: np.ndarray) -> torch.Tensor:
        """[CLS] window [SEP] -> (batch, seq_len) int64."""
        ids = torch.from_numpy(windows)
        b = ids.size(0)
        cls = torch.full((b, 1), self.tokenizer.cls_id, dtype=torch.int64)
        sep = torch.full((b, 1), self.tokenizer.sep_id, dtype=torch.int64)
        return torch.cat([cls, ids, sep], dim=1)

    def row_generators(self, *key: object, rows: range) -> list[torch.Generator]:
        """One masking generator per row, seeded by (seed, *key, row): a row's mask is then the
        same in any batch that holds it."""
        return [generator_for(self.cfg.train.seed, *key, g) for g in rows]

    def _mask(self, input_ids: torch.Tensor, generators: list[torch.Generator],
              pairs: dict[str, torch.Tensor] | None = None, validation: bool = False) -> Batch:
        """Mask `input_ids`, row r with generators[r], by the mlm section's recipe, or with
        `validation` by the fixed one (EVAL_MASKING); with NSP `pairs` (PairBatches.rows) their
        segment ids, labels and, when a row is padded, the attention mask come along."""
        k = self.cfg.mlm
        recipe = EVAL_MASKING if validation else dict(mask_prob=k.mask_prob, mask_token_frac=k.mask_token_frac,
                                                       random_token_frac=k.random_token_frac)
        masked, selected = random_mask(input_ids, mask_id=self.tokenizer.mask_id, special_mask=self.special_mask,
                                       generator=generators, **recipe,
                                       word_continuation=None if validation else self.word_continuation)
        tensors = {"input_ids": input_ids, "masked_ids": masked, "selected": selected}
        if self.cfg.data.packing == "documents" and pairs is None:  # attention within each document
            documents = document_mask(input_ids, self.tokenizer.doc_separator_id)
            if documents is not None:
                tensors["attention_mask"] = documents
        num_tokens = input_ids.numel()
        if pairs is not None:
            tensors.update(token_type_ids=pairs["token_type_ids"], next_sentence_label=pairs["next_sentence_label"])
            num_tokens = int(pairs["attention_mask"].sum())
            if num_tokens < input_ids.numel():  # no mask at all when nothing is padded: the fast path
                tensors["attention_mask"] = pairs["attention_mask"]
        counts = {"examples": input_ids.size(0)} if pairs is not None else {}
        return Batch(tensors, num_targets=int(selected.sum()), num_tokens=num_tokens, counts=counts)

    def train_batch(self, step: int, micro: int) -> Batch:
        shape = self.step_shape(step)
        total, (lo, hi) = self.global_rows(shape.rows)
        rows = self.step_rows(micro, shape.rows)  # this batch's rows of the step's global batch
        masks = self.row_generators("mask", step, rows=rows)
        if self.pairs:  # NSP: pairs are a function of (seed, step, row of the step's global batch)
            maker = self.long_pairs if shape.seq_len != self.cfg.data.seq_len else self.pairs["train"]
            pairs = maker.rows([("train", step, g) for g in rows])
            return self._mask(pairs["input_ids"], masks, pairs=pairs)
        input_ids = self._frame(self.samplers[shape.seq_len].next(total, (lo, hi)))
        return self._mask(input_ids, masks)

    # -- loss ------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        return mlm_loss(model, batch.tensors)

    # -- evaluation ------------------------------------------------------------------------------
    def eval_batches(self) -> list[Batch]:
        """The fixed validation set (`eval_sizes`): windows spread evenly over the split, or with
        NSP pairs drawn once, each row masked by its own fixed seed with EVAL_MASKING, whatever
        the training recipe masks."""
        if self._eval_batches is None:
            n, b = self.eval_sizes()
            if self.pairs:  # NSP: a fixed set of validation pairs
                chunks = [range(i, min(i + b, n)) for i in range(0, n, b)]
                made = [(self.pairs["validation"].rows([("validation", i) for i in rows]), rows) for rows in chunks]
                self._eval_batches = [self._mask(pairs["input_ids"], self.row_generators("eval-masks", rows=rows),
                                                 pairs=pairs, validation=True) for pairs, rows in made]
            else:
                picks = self.val_windows.spread(n)
                self._eval_batches = [
                    self._mask(self._frame(self.val_windows.get(picks[i:i + b])),
                               self.row_generators("eval-masks", rows=range(i, min(i + b, len(picks)))),
                               validation=True)
                    for i in range(0, len(picks), b)]
        return self._eval_batches

    @torch.no_grad()  # not inference_mode: sharded engines (ZeRO-3) keep tensors gathered here for training
    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult:
        was_training = model.training
        model.eval()
        loss_sum = unigram_sum = correct = entropy_sum = nsp_loss = nsp_correct = 0.0
        count = pairs = 0
        first = None
        predicted_counts = torch.zeros(self.cfg.model.vocab_size, dtype=torch.long)
        for batch in self.eval_batches():
            t = {k: v.to(device) for k, v in batch.tensors.items()}
            out = model(t["masked_ids"], token_type_ids=t.get("token_type_ids"),
                        attention_mask=t.get("attention_mask"), selected=t["selected"])
            if self.pairs:
                nsp, labels = out.next_sentence_logits, t["next_sentence_label"]
                nsp_loss += F.cross_entropy(nsp.float(), labels, reduction="sum").item()
                nsp_correct += (nsp.argmax(-1) == labels).sum().item()
                pairs += len(labels)
            logits = out.logits.float()
            targets = t["input_ids"][t["selected"]]
            loss_sum += cross_entropy_selected(logits, t["input_ids"], t["selected"], reduction="sum").item()
            predicted = logits.argmax(-1)
            correct += (predicted == targets).sum().item()
            unigram_sum += -self.unigram_logp.to(device)[targets].sum().item()
            logp = logits.log_softmax(-1)
            entropy_sum += -(logp.exp() * logp).sum().item()
            predicted_counts += torch.bincount(predicted.cpu(), minlength=len(predicted_counts))[:len(predicted_counts)]
            count += len(targets)
            if first is None:
                first = (batch, predicted.cpu())
        model.train(was_training)
        count = max(count, 1)
        top = int(predicted_counts.argmax())
        # Learning-curve diagnostics (Chiang et al. 2020, "Characterizing Learning Curves During
        # Language Model Pre-Training"): early on a model predicts one frequent token ('.', 'the')
        # everywhere — a high top_prediction_share — before it learns to use the context; the
        # entropy of its predicted distribution falls as it commits to answers.
        metrics = {"loss": loss_sum / count, "accuracy": correct / count, "unigram_loss": unigram_sum / count,
                   "masked_tokens": count, "prediction_entropy": entropy_sum / count,
                   "top_prediction_share": int(predicted_counts[top]) / count}
        if pairs:
            metrics.update(nsp_loss=nsp_loss / pairs, nsp_accuracy=nsp_correct / pairs)
        share = f"{metrics['top_prediction_share']:.0%}"
        table = self.decoded_table(*first)
        text = (f"Most common prediction: `{self.tokenizer.id_to_token(top)}` ({share} of masked positions); "
                f"mean entropy of the predicted distribution {metrics['prediction_entropy']:.2f} nats.\n\n"
                + table.markdown())
        return EvalResult(metrics, text, table)

    def decoded_table(self, batch: Batch, predicted: torch.Tensor, rows: int = 4, max_tokens: int = 40) -> Table:
        """input tokens (as the model saw them, the selected ones in bold) | target tokens |
        predicted tokens, for the first `rows` validation examples (their first `max_tokens` tokens)."""
        t = batch.tensors
        tok = self.tokenizer
        table = Table(["input", "targets", "predicted"], [])
        offset = 0
        for r in range(min(rows, t["input_ids"].size(0))):
            sel = t["selected"][r]
            n_sel = int(sel.sum())
            preds = predicted[offset:offset + n_sel].tolist()
            offset += n_sel
            shown = sel[:max_tokens]
            k = int(shown.sum())
            words = []
            for i, token_id in enumerate(t["masked_ids"][r, :max_tokens].tolist()):
                word = tok.id_to_token(token_id)
                words.append(f"**{word}**" if shown[i] else word)
            targets = [tok.id_to_token(i) for i in t["input_ids"][r, :max_tokens][shown].tolist()]
            predictions = [tok.id_to_token(i) for i in preds[:k]]
            table.rows.append([" ".join(words), " ".join(targets), " ".join(predictions)])
        return table

    def decode_batch(self, model: nn.Module, batch: Batch) -> Table:
        """A training batch as the overfit test shows it (lmforge/train/overfit.py): input (the
        selected tokens in bold) | targets | the model's predictions there."""
        t = batch.tensors
        out = model(t["masked_ids"], token_type_ids=t.get("token_type_ids"), attention_mask=t.get("attention_mask"),
                    selected=t["selected"])
        return self.decoded_table(batch, out.logits.argmax(-1).cpu())

    def summary(self, last_eval: dict[str, float]) -> dict[str, float]:
        out = {"val_loss": last_eval["loss"], "unigram_val_loss": last_eval["unigram_loss"],
               "val_accuracy": last_eval["accuracy"]}
        if "nsp_accuracy" in last_eval:
            out["val_nsp_accuracy"] = last_eval["nsp_accuracy"]
        return out

