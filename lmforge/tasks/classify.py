"""Sentence classification as a task: Classifier + padded batches + CE (+ weighted L1 rating).

Examples are tokenized once as [CLS] text [SEP] (truncated to data.seq_len). Batches are padded
only to their longest member, and members have similar lengths: each epoch's seeded shuffle is
cut into chunks of 50 global batches (one optimizer step's examples: train.batch_size x
grad_accum_steps x processes), each chunk sorted by length and cut into global batches, and the
batch order shuffled again (classify.length_buckets=false: the shuffle alone). A step's examples, and so its loss, therefore depend only on the
global batch size, not on how it is cut into micro-batches and processes. On short texts like
movie-review snippets (~28 tokens, max ~90) this does several times less work than padding every
example to 128. A batch with no padding at all goes
to the model without an attention mask (the same result, less work).

The loss per example is cross-entropy on the polarity plus `classify.rating_weight` x |rating error|
(when the data has ratings); the loop averages it over the examples of a step. Validation gives
accuracy, F1 (positive class), rating MAE; `finish` evaluates the test split once at the end
and writes errors.md (the most confidently wrong test examples) and confusion.png; with
classify.wise_alpha < 1 it first interpolates the weights back toward the run's start (WiSE-FT).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmforge.config import Config, DataConfig, load_config
from lmforge.data.padding import mask_if_padded, pad_rows
from lmforge.data.prepared import fill_vocab_size
from lmforge.data.sentiment import (EVALUATION_ONLY, LABELS, LabeledData, load_labeled, stratified_split,
                                    stratified_subset)
from lmforge.data.tokenizers import TextTokenizer, load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.eval.evaluate import evaluate_examples, plot_confusion, write_evaluation
from lmforge.eval.metrics import confusion_matrix, expected_calibration_error, f1_per_class, fit_temperature
from lmforge.files import atomic_path, write_text_atomic
from lmforge.models.classifier import Classifier
from lmforge.models.registry import check_family, family, model_class
from lmforge.rng import derive_seed
from lmforge.runs.checkpoint import checkpoints_newest_first, load_newest_good
from lmforge.runs.readers import (LoadedModel, check_tokenizer_fits, load_checkpoint_weights, load_run_tokenizer,
                                  read_hf_dir)
from lmforge.tasks import registry
from lmforge.tasks.base import Batch, EvalResult, LossOutput, Table, Task
from lmforge.tasks.loading import load_model, same_vocabulary, source_path, take_source_shape
from lmforge.tasks.registry import register
from lmforge.train.loop import autocast_for

CHUNK_BATCHES = 50  # batches per length-sorted chunk


@register
class ClassifyTask(Task):
    name = "classify"
    verb = "finetune"
    wrong_verb_hint = "use `lmforge finetune` for classify"
    run_record = "dataset.json"
    loads_as = "classifier"
    rows_are = "examples"

    # -- a run of it ------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: Config) -> None:
        check_trainable(cfg)
        if cfg.model.init_from is None:  # else the family is the source's, read when the run starts
            check_family(cls.name, cfg.model.arch, "encoder")
        if cfg.data.long_seq_len is not None:  # examples are padded to data.seq_len; no windows to lengthen
            raise LmforgeError(f"data.long_seq_len is a pretraining schedule (task.name=mlm, clm or electra), not "
                               f"for task.name={cls.name}")

    @classmethod
    def create(cls, cfg: Config) -> "ClassifyTask":
        data = load_training_data(cfg)
        split = split_examples(cfg, data)
        torch.manual_seed(cfg.train.seed)  # head (and, without init_from, encoder) initialisation
        tokenizer, encoder = init_source(cfg)
        model = Classifier(cfg.model, len(data.labels), rating_head_range(cfg, data))
        if encoder is not None:
            missing, unexpected = model.load_state_dict(encoder, strict=False)
            lacking = [k for k in missing if k.startswith(model.encoder_attr + ".")]
            if unexpected or lacking:
                raise LmforgeError(f"model.init_from={cfg.model.init_from} is not a whole {cfg.model.arch} encoder "
                                   f"for this classifier ({', '.join((unexpected + lacking)[:4])} do not fit); start "
                                   f"from a pretraining run, minilm or a transformers encoder directory")
        reinit_top_layers(model, cfg)
        task = cls(cfg, data, split, tokenizer, model)
        if cfg.classify.probe_first:
            task.fit_probe()
        return task

    @classmethod
    def reopen(cls, cfg: Config, run_dir: Path, **extra) -> "ClassifyTask":
        data = load_labeled(cfg.data.dataset, cfg.data.cache_dir)
        recorded = json.loads((run_dir / "dataset.json").read_text())
        if recorded["identity"] != data.identity:
            raise LmforgeError(f"dataset {cfg.data.dataset} changed since {run_dir} started; cannot resume")
        split = json.loads((run_dir / "split.json").read_text())
        tokenizer = load_tokenizer(str(run_dir / "tokenizer.json"))
        model = Classifier(cfg.model, len(data.labels), rating_head_range(cfg, data))
        task = cls(cfg, data, split, tokenizer, model, **extra)
        if task.interpolates:  # found out now, not after the steps left
            task.read_start(run_dir)
        return task

    @property
    def interpolates(self) -> bool:
        """classify.wise_alpha < 1: the run ends by interpolating toward its start (WiSE-FT)."""
        return self.cfg.classify.wise_alpha < 1

    def fresh_model(self) -> nn.Module:
        return Classifier(self.cfg.model, len(self.data.labels), rating_head_range(self.cfg, self.data))

    def write_run_files(self, run_dir: Path) -> None:
        """The run's tokenizer, dataset identity and split."""
        cfg, data, split, tokenizer = self.cfg, self.data, self.split, self.tokenizer
        tokenizer.save(run_dir / "tokenizer.json")
        (run_dir / "dataset.json").write_text(json.dumps({
            "dataset": data.name, "identity": data.identity, "examples": len(data.examples),
            "labels": list(data.labels), "rating_range": data.rating_range,
            "rating_head": rating_head_range(cfg, data) is not None, "split_seed": cfg.data.split_seed,
            "tokenizer_sha256": tokenizer.sha256, "split": {k: len(v) for k, v in split.items()}}, indent=2) + "\n")
        (run_dir / "split.json").write_text(json.dumps(split) + "\n")
        if self.interpolates:  # what finish interpolates toward, kept before any update
            save_weights(self.model.state_dict(), run_dir / WISE_START)
        if self.truncated:
            print(f"warning: {self.truncated} examples are longer than data.seq_len={cfg.data.seq_len} and were "
                  f"truncated", file=sys.stderr)

    def initialised_from(self) -> str:
        return self.cfg.model.init_from or "random"

    def describe(self) -> str:
        s = self.split
        return (f"{self.data.name}: {len(s['train']):,} train / {len(s['validation']):,} validation / "
                f"{len(s['test']):,} test examples of {len(self.data.labels)} classes ({', '.join(self.data.labels)}); "
                f"{sum(p.numel() for p in self.model.parameters()):,} parameters (init: {self.initialised_from()})")

    @classmethod
    def load_run(cls, run_dir: Path, cfg: Config, *, mlm_head_required: bool = True) -> LoadedModel:
        """The classifier with the run's model (final_weights: its newest checkpoint, interpolated
        toward its start where classify.wise_alpha did so), in eval mode, and its tokenizer."""
        try:
            info = json.loads((run_dir / "dataset.json").read_text())
            rating_range = tuple(info["rating_range"]) if info["rating_range"] else None
            if not info.get("rating_head", True):  # a run before 0.3 always had the head where the data had ratings
                rating_range = None
            num_labels = len(info["labels"])
        except FileNotFoundError:
            raise LmforgeError(f"{run_dir} is not an lmforge fine-tuning run directory (no dataset.json); give a "
                               f"run made by `lmforge finetune`") from None
        except (ValueError, KeyError, TypeError) as e:  # not JSON, or not what `finetune` writes
            raise LmforgeError(f"{run_dir / 'dataset.json'} is damaged ({type(e).__name__}: {e}); it is written by "
                               f"`lmforge finetune` when the run starts") from None
        weights, _ = final_weights(run_dir)  # first: a run without a checkpoint may not have its shape filled in yet
        model = Classifier(cfg.model, num_labels, rating_range)
        load_checkpoint_weights(model, weights, run_dir)
        tokenizer = load_run_tokenizer(run_dir, "dataset.json")
        check_tokenizer_fits(tokenizer, cfg.model, run_dir / "tokenizer.json")
        return LoadedModel(model.eval(), cfg.model, tokenizer, "lmforge")

    @classmethod
    def headline(cls, summary: dict) -> str:
        rating = f", rating MAE {summary['test_rating_mae']:.3f}" if "test_rating_mae" in summary else ""
        return (f"test accuracy {summary['test_accuracy']:.4f}, F1 {summary['test_f1']:.4f}{rating} "
                f"(validation accuracy {summary['val_accuracy']:.4f})")

    def __init__(self, cfg: Config, data: LabeledData, split: dict[str, list[int]], tokenizer: TextTokenizer,
                 model: nn.Module):
        self.cfg, self.data, self.split, self.tokenizer, self.model = cfg, data, split, tokenizer, model
        tokenizer.require_bert("task.name=classify")
        max_len = cfg.data.seq_len
        texts = [e.text for e in data.examples]
        encoded = tokenizer.encode_batch(texts)
        self.truncated = sum(len(ids) > max_len - 2 for ids in encoded)
        self.ids = [[tokenizer.cls_id, *ids[: max_len - 2], tokenizer.sep_id] for ids in encoded]
        self.labels = torch.tensor([e.label for e in data.examples])
        self.has_rating = rating_head_range(cfg, data) is not None
        self.ratings = torch.tensor([e.rating if e.rating is not None else math.nan for e in data.examples],
                                    dtype=torch.float32)
        self.consumed = 0  # train examples handed out so far, in epoch order
        self._epoch, self._epoch_order = -1, []
        self._step, self._step_examples, self._step_epoch = -1, [], 0
        self._noise_ids = np.flatnonzero(~tokenizer.special_mask)  # what classify.token_noise draws from

    @torch.no_grad()
    def pooled_features(self, indices: list[int], batch_size: int = 256) -> torch.Tensor:
        """(n, hidden) float32: the model's pooled state (Classifier.pool, no dropout) of examples
        `indices`, in that order; fp32, the model's mode restored."""
        model, was_training = self.model, self.model.training
        model.eval()
        order = sorted(range(len(indices)), key=lambda k: len(self.ids[indices[k]]))  # little padding
        out = torch.empty(len(indices), self.cfg.model.hidden_size)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = self.collate([indices[k] for k in chunk])
            mask = mask_if_padded(batch.tensors["attention_mask"], batch.num_tokens)
            out[chunk] = model.pool(batch.tensors["input_ids"], attention_mask=mask)[0].float()
        model.train(was_training)
        return out

    def fit_probe(self) -> None:
        """classify.probe_first (LP-FT, Kumar et al. 2022): set the heads to a linear probe of the
        starting encoder before fine-tuning: the polarity head by L2-regularised logistic
        regression (L-BFGS), the rating head by ridge regression, both on the pooled states of the
        train split. A random head's first gradients would distort the pretrained features;
        features the movie reviews never exercise are then left closer to where they were."""
        started = time.time()
        train = self.split["train"]
        x, y = self.pooled_features(train), self.labels[torch.tensor(train)]
        head = nn.Linear(x.size(1), len(self.data.labels))
        nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
        opt = torch.optim.LBFGS(head.parameters(), max_iter=PROBE_ITERS, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(head(x), y) + PROBE_L2 * head.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        model = self.model
        model.polarity.weight.data.copy_(head.weight.data), model.polarity.bias.data.copy_(head.bias.data)
        accuracy = float((head(x).argmax(-1) == y).float().mean())
        if model.rating is not None:  # rating = centre + half_width * (w . x + b): ridge for (w, b)
            target = (self.ratings[torch.tensor(train)] - model.rating_centre) / model.rating_half_width
            a = torch.cat([x, torch.ones(len(x), 1)], 1).double()
            ridge = PROBE_L2 * len(x) * torch.eye(a.size(1), dtype=torch.float64)
            ridge[-1, -1] = 0  # the bias is not shrunk
            w = torch.linalg.solve(a.T @ a + ridge, a.T @ target.double().unsqueeze(1)).float().squeeze(1)
            model.rating.weight.data.copy_(w[:-1].unsqueeze(0)), model.rating.bias.data.fill_(float(w[-1]))
        print(f"lmforge: linear probe (classify.probe_first): heads fitted on the starting encoder's pooled states "
              f"of {len(train):,} train examples, train accuracy {accuracy:.4f} ({time.time() - started:.0f} s)",
              file=sys.stderr)

    # -- batches ---------------------------------------------------------------------------------
    def noisy_ids(self, i: int, epoch: int) -> list[int]:
        """Example i's ids as training sees them in `epoch`: each text token replaced with
        probability classify.token_noise by a random non-special token ([CLS] and [SEP] kept). The
        draw depends on the seed, the epoch and the example alone, not on the batch it lands in."""
        ids, p = self.ids[i], self.cfg.classify.token_noise
        if p == 0:
            return ids
        rng = np.random.default_rng(derive_seed(self.cfg.train.seed, "classify-noise", epoch, i))
        text = np.array(ids[1:-1])
        hit = rng.random(len(text)) < p
        text[hit] = rng.choice(self._noise_ids, int(hit.sum()))
        return [ids[0], *text.tolist(), ids[-1]]

    def collate(self, indices: list[int], epoch: Optional[int] = None) -> Batch:
        """Examples `indices` padded into one batch; with `epoch` (training), under classify.token_noise."""
        rows = [self.ids[i] if epoch is None else self.noisy_ids(i, epoch) for i in indices]
        input_ids, attention = pad_rows(rows, self.tokenizer.pad_id)
        index = torch.tensor(indices)
        tensors = {"input_ids": input_ids, "attention_mask": attention, "labels": self.labels[index],
                   "ratings": self.ratings[index], "index": index}
        return Batch(tensors, num_targets=len(indices), num_tokens=int(attention.sum()))

    def global_batch(self) -> int:
        """Examples in a full optimizer step over every process."""
        t = self.cfg.train
        return self.global_rows(t.batch_size * t.grad_accum_steps)[0]

    def _order_of_epoch(self, epoch: int) -> list[int]:
        """The epoch's train examples in the order steps take them: global batches of similar
        lengths, one after another (see the module docstring)."""
        if epoch != self._epoch:
            b = self.global_batch()
            rng = random.Random(derive_seed(self.cfg.train.seed, "classify-epoch", epoch))
            order = list(self.split["train"])
            rng.shuffle(order)
            if self.cfg.classify.length_buckets:
                batches = []
                for start in range(0, len(order), b * CHUNK_BATCHES):
                    chunk = sorted(order[start:start + b * CHUNK_BATCHES], key=lambda i: len(self.ids[i]))
                    batches += [chunk[k:k + b] for k in range(0, len(chunk), b)]
                rng.shuffle(batches)
                order = [i for batch in batches for i in batch]
            self._epoch, self._epoch_order = epoch, order
        return self._epoch_order

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.split["train"]) / self.global_batch())

    def _examples_of_step(self, step: int) -> list[int]:
        """The step's examples over every micro-batch and process: the next global batch (the
        last one of an epoch is short; steps of a batch-size ramp take fewer)."""
        if step != self._step:
            shape = self.step_shape(step)
            wanted = self.global_rows(shape.rows)[0] * shape.micro_batches
            epoch, offset = divmod(self.consumed, len(self.split["train"]))
            examples = self._order_of_epoch(epoch)[offset:offset + wanted]
            self.consumed += len(examples)
            self._step, self._step_examples, self._step_epoch = step, examples, epoch
        return self._step_examples

    def train_batch(self, step: int, micro: int) -> Batch:
        """This rank's share of micro-batch `micro` of the step's examples. A full step splits
        into equal shares; the short last step of an epoch into near-equal ones. A rank left with
        no example gets one with no weight: every rank must run a backward."""
        examples = self._examples_of_step(step)
        rank, world = self.shard
        micro_rows = np.array_split(np.array(examples), self.step_shape(step).micro_batches)[micro]
        mine = [int(i) for i in np.array_split(micro_rows, world)[rank]]
        if not mine:
            batch = self.collate(examples[:1], self._step_epoch)
            batch.num_targets = batch.num_tokens = 0
            return batch
        return self.collate(mine, self._step_epoch)

    def data_state(self) -> dict:
        return {"consumed_examples": self.consumed, "epoch": self.consumed / len(self.split["train"])}

    def load_data_state(self, state: dict) -> None:
        if "consumed_examples" in state:
            self.consumed = int(state["consumed_examples"])
            return
        # a checkpoint of an lmforge before 0.2 counted batches of train.batch_size x processes:
        # continue at the same place in the same epoch (its batches were composed another way)
        t, n = self.cfg.train, len(self.split["train"])
        b = self.global_rows(t.batch_size)[0]
        epoch, k = divmod(int(state["consumed_batches"]), math.ceil(n / b))
        self.consumed = epoch * n + min(k * b, n)

    # -- loss ------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Cross-entropy (classify.label_smoothing), summed over the batch's examples; with
        classify.rdrop, the mean over two passes (their own dropout masks) plus rdrop x the
        symmetric KL divergence of their predictions; then the rating term (finish_loss)."""
        t = batch.tensors
        mask = mask_if_padded(t["attention_mask"], batch.num_tokens)
        c = self.cfg.classify
        out = model(t["input_ids"], attention_mask=mask)
        logits, rating = out.logits, out.rating
        ce = F.cross_entropy(logits.float(), t["labels"], reduction="sum", label_smoothing=c.label_smoothing)
        sums = {"accuracy": (logits.argmax(-1) == t["labels"]).sum()}
        if c.rdrop > 0:
            again = model(t["input_ids"], attention_mask=mask)
            ce_again = F.cross_entropy(again.logits.float(), t["labels"], reduction="sum",
                                       label_smoothing=c.label_smoothing)
            log_p, log_q = logits.float().log_softmax(-1), again.logits.float().log_softmax(-1)
            kl = 0.5 * (F.kl_div(log_q, log_p, log_target=True, reduction="sum")
                        + F.kl_div(log_p, log_q, log_target=True, reduction="sum"))
            ce = (ce + ce_again) / 2
            sums["rdrop_kl"] = kl.detach()
            if rating is not None:
                rating = (rating + again.rating) / 2
            sums["ce"] = ce.detach()
            return self.finish_loss(batch, rating, ce + c.rdrop * kl, sums)
        sums["ce"] = ce.detach()
        return self.finish_loss(batch, rating, ce, sums)

    def finish_loss(self, batch: Batch, rating, loss: torch.Tensor, sums: dict) -> LossOutput:
        """The polarity loss and its metrics, plus the rating head's L1 term; a stand-in example
        (see train_batch) gets gradients and counts of zero."""
        if rating is not None and self.has_rating:
            l1 = (rating.float() - batch.tensors["ratings"]).abs().sum()
            loss = loss + self.cfg.classify.rating_weight * l1
            sums["rating_abs_error"] = l1.detach()
        if batch.num_targets == 0:
            loss, sums = loss * 0.0, {k: v * 0 for k, v in sums.items()}
        return LossOutput(loss, sums)

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: sharded engines (ZeRO-3) keep tensors gathered here for training
    def predict_split(self, model: nn.Module, split: str, device: torch.device) -> dict[str, torch.Tensor]:
        """Logits and probabilities (n, classes), ratings (n,), labels (n,) and the examples'
        indices (n,) for a split, in split order."""
        was_training = model.training
        model.eval()
        indices = sorted(self.split[split], key=lambda i: len(self.ids[i]))  # little padding
        size = self.cfg.train.eval_batch_size or 4 * self.cfg.train.batch_size
        all_logits, ratings, order = [], [], []
        for start in range(0, len(indices), size):
            batch = self.collate(indices[start:start + size])
            t = {k: v.to(device) for k, v in batch.tensors.items()}
            mask = mask_if_padded(t["attention_mask"], batch.num_tokens)
            out = model(t["input_ids"], attention_mask=mask)
            logits, rating = out.logits, out.rating
            all_logits.append(logits.float().cpu())
            ratings.append(rating.float().cpu() if rating is not None else torch.full((len(logits),), math.nan))
            order += indices[start:start + size]
        model.train(was_training)
        back = torch.tensor(order).argsort()  # sorted-by-length order -> split order
        index = torch.tensor(order)[back]
        logits = torch.cat(all_logits)[back]
        return {"index": index, "logits": logits, "probs": logits.softmax(-1), "ratings": torch.cat(ratings)[back],
                "labels": self.labels[index]}

    def metrics(self, pred: dict[str, torch.Tensor]) -> dict[str, float]:
        """accuracy, loss (NLL), f1 (the positive class's with the two sentiment classes, else
        macro), macro_f1, ece, examples, and rating_mae with a rating head."""
        labels = pred["labels"]
        f1 = f1_per_class(confusion_matrix(pred["logits"].argmax(-1), labels, len(self.data.labels)))
        out = {"accuracy": float((pred["logits"].argmax(-1) == labels).float().mean()),
               "loss": float(F.cross_entropy(pred["logits"], labels)),
               "f1": f1[1] if tuple(self.data.labels) == LABELS else sum(f1) / len(f1), "macro_f1": sum(f1) / len(f1),
               "ece": expected_calibration_error(pred["probs"], labels), "examples": len(labels)}
        if self.has_rating:
            out["rating_mae"] = float((pred["ratings"] - self.ratings[pred["index"]]).abs().mean())
        return out

    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult:
        pred = self.predict_split(model, "validation", device)
        table = self.examples_table(pred, range(min(6, len(pred["labels"]))))
        return EvalResult(self.metrics(pred), table.markdown(), table)

    def examples_table(self, pred: dict[str, torch.Tensor], picks) -> Table:
        """text | true | predicted | p(predicted) | rating (true / predicted), for the predictions
        at `picks`."""
        table = Table(["text", "true", "predicted", "p(predicted)", "rating (true / predicted)"], [])
        for k in picks:
            i = int(pred["index"][k])
            p = pred["probs"][k]
            guess = int(p.argmax())
            true_rating = self.data.examples[i].rating
            rating = (f"{true_rating:+.2f} / {float(pred['ratings'][k]):+.2f}"
                      if self.has_rating and true_rating is not None else "-")
            names = self.data.labels
            table.rows.append([self.data.examples[i].text, names[int(pred["labels"][k])], names[guess],
                               f"{float(p[guess]):.3f}", rating])
        return table

    def decode_batch(self, model: nn.Module, batch: Batch, rows: int = 8) -> Table:
        """A training batch as the overfit test shows it: text | true | predicted | p(predicted) |
        rating, for its first rows."""
        t = batch.tensors
        out = model(t["input_ids"], attention_mask=mask_if_padded(t["attention_mask"], batch.num_tokens))
        n = min(rows, len(t["labels"]))
        logits = out.logits[:n].float().cpu()
        ratings = out.rating[:n].float().cpu() if out.rating is not None else torch.full((n,), math.nan)
        pred = {"index": t["index"][:n].cpu(), "logits": logits, "probs": logits.softmax(-1), "ratings": ratings,
                "labels": t["labels"][:n].cpu()}
        return self.examples_table(pred, range(n))

    def summary(self, last_eval: dict[str, float]) -> dict[str, float]:
        return {"val_accuracy": last_eval["accuracy"], "val_f1": last_eval["f1"],
                **({"val_rating_mae": last_eval["rating_mae"]} if "rating_mae" in last_eval else {})}

    def finish(self, model: nn.Module, run_dir: Path, device: torch.device) -> dict[str, float]:
        """Fit the temperature on validation (calibration.json), evaluate the test split once,
        write errors.md, confusion.png and test_predictions.json, and, for a sentiment classifier,
        evaluate the out-of-domain sets (classify.evaluate_ood). Returns the summary's test_*,
        calibration and out-of-domain entries. With classify.wise_alpha < 1 the model is first
        interpolated toward its start (`interpolate_toward_start`), and all of that is of the result."""
        out = self.interpolate_toward_start(model, run_dir, device) if self.interpolates else {}
        val = self.predict_split(model, "validation", device)
        temperature = fit_temperature(val["logits"], val["labels"])
        pred = self.predict_split(model, "test", device)
        m = self.metrics(pred)
        calibrated = (pred["logits"] / temperature).softmax(-1)
        calibration = {"temperature": temperature, "fitted_on": "validation",
                       "val_ece": expected_calibration_error(val["probs"], val["labels"]),
                       "val_ece_calibrated": expected_calibration_error((val["logits"] / temperature).softmax(-1),
                                                                        val["labels"]),
                       "test_ece": m["ece"], "test_ece_calibrated": expected_calibration_error(calibrated,
                                                                                              pred["labels"])}
        write_text_atomic(run_dir / CALIBRATION, json.dumps(calibration, indent=1) + "\n")
        wrong = (pred["probs"].argmax(-1) != pred["labels"]).nonzero().squeeze(1)
        confidence = pred["probs"].max(-1).values[wrong]
        worst = wrong[confidence.argsort(descending=True)][:20]
        table = self.examples_table(pred, [int(k) for k in worst])
        (run_dir / "errors.md").write_text(
            f"# The {len(worst)} test examples predicted wrong with the highest confidence\n\n"
            f"Test accuracy {m['accuracy']:.4f} on {m['examples']} examples.\n\n" + table.markdown())
        confusion = confusion_matrix(pred["logits"].argmax(-1), pred["labels"], len(self.data.labels))
        plot_confusion(confusion.numpy(), self.data.labels, run_dir / "confusion.png",
                       f"test accuracy {m['accuracy']:.3f}")
        (run_dir / "test_predictions.json").write_text(json.dumps({
            "index": pred["index"].tolist(), "labels": list(self.data.labels),
            "probabilities": calibrated.tolist(), "temperature": temperature,
            "rating": [None if math.isnan(r) else r for r in pred["ratings"].tolist()]}) + "\n")
        out.update({"test_accuracy": m["accuracy"], "test_f1": m["f1"], "test_macro_f1": m["macro_f1"],
                    "test_examples": m["examples"], **{k: v for k, v in calibration.items() if k != "fitted_on"}})
        if "rating_mae" in m:
            out["test_rating_mae"] = m["rating_mae"]
        if tuple(self.data.labels) == LABELS and self.cfg.classify.evaluate_ood:  # how it does out of its domain
            for name in EVALUATION_ONLY:
                ood = evaluate_examples(model, self.tokenizer, load_labeled(name, self.cfg.data.cache_dir),
                                        self.data.labels, self.cfg.data.seq_len, temperature,
                                        self.cfg.train.eval_batch_size or 4 * self.cfg.train.batch_size)
                key = name.replace("-", "_")
                out.update({f"{key}_accuracy": ood["accuracy"], f"{key}_macro_f1": ood["macro_f1"],
                            f"{key}_majority_accuracy": ood["majority_accuracy"], f"{key}_ece": ood["ece"]})
        return out

    @torch.no_grad()
    def interpolate_toward_start(self, model: nn.Module, run_dir: Path, device: torch.device) -> dict[str, float]:
        """classify.wise_alpha (WiSE-FT, Wortsman et al. 2022): set `model` to (1 - a) x the run's
        start (start.safetensors: the pretrained encoder with its probe heads) + a x its fine-tuned
        weights, and write the result to wise.safetensors, which the run's readers load instead of
        the last checkpoint (that one stays the fine-tuned model: a resumed run trains on from it
        and interpolates again at its end). The fine-tuned model's validation entries are kept in
        the summary as fine_tuned_val_*, and val_* become the interpolated model's."""
        alpha = self.cfg.classify.wise_alpha
        start = self.read_start(run_dir)
        newest = checkpoints_newest_first(run_dir / "checkpoints")
        # validation as the loop measured it: under the run's precision (its checkpoint says which)
        state = json.loads((newest[0] / "state.json").read_text()) if newest else {}
        # (two autocast blocks: one caches its casts of the weights, which would outlive the change)
        with autocast_for(state.get("precision", "fp32"), device):
            before = self.metrics(self.predict_split(model, "validation", device))
        model.load_state_dict(interpolate(start, model.state_dict(), alpha))
        with autocast_for(state.get("precision", "fp32"), device):
            after = self.metrics(self.predict_split(model, "validation", device))
        save_weights(model.state_dict(), run_dir / WISE_WEIGHTS,
                     {"checkpoint": newest[0].name if newest else "", "wise_alpha": repr(alpha)})
        print(f"lmforge: WiSE-FT (classify.wise_alpha={alpha:g}): the weights are {1 - alpha:g} x the start + "
              f"{alpha:g} x the fine-tuned ones; validation accuracy {before['accuracy']:.4f} -> "
              f"{after['accuracy']:.4f}", file=sys.stderr)
        out = {"wise_alpha": alpha, "fine_tuned_val_accuracy": before["accuracy"], "fine_tuned_val_f1": before["f1"],
               "val_accuracy": after["accuracy"], "val_f1": after["f1"]}
        if "rating_mae" in after:
            out.update(fine_tuned_val_rating_mae=before["rating_mae"], val_rating_mae=after["rating_mae"])
        return out

    def read_start(self, run_dir: Path) -> dict[str, torch.Tensor]:
        """start.safetensors, the weights classify.wise_alpha interpolates toward, checked to be
        this model's tensors."""
        path = run_dir / WISE_START
        if not path.is_file():
            raise LmforgeError(f"{path} is missing: the run wrote it when it started, for classify.wise_alpha="
                               f"{self.cfg.classify.wise_alpha}, and cannot interpolate without it; train again")
        start, _ = read_weights(path)
        expected = self.model.state_dict()
        if set(start) != set(expected) or any(start[k].shape != v.shape for k, v in expected.items()):
            raise LmforgeError(f"{path} is not this run's start (its tensors are not the model's); put back the file "
                               f"the run wrote, or train again")
        return start


def interpolate(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) x start + alpha x end, tensor by tensor on end's devices and dtypes; tensors
    that are not floating point (counters, ids) are end's."""
    return {k: torch.lerp(start[k].to(v.device, v.dtype), v, alpha) if v.is_floating_point() else v
            for k, v in end.items()}


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """A state dict as safetensors, written atomically (CPU, contiguous copies)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file a run wrote, or a one-line error for a damaged one."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        again = ("delete summary.json and `lmforge finetune --resume` the run to write it again"
                 if path.name == WISE_WEIGHTS else "train again")
        raise LmforgeError(f"{path} is damaged ({e}); {again}") from None


def final_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, name) of a fine-tuning run's model: its newest whole checkpoint, or, where the run
    interpolated that checkpoint toward its start (classify.wise_alpha), wise.safetensors. A
    wise.safetensors of an earlier checkpoint (the run was resumed to train longer and has not
    finished again) is left aside, with a warning."""
    if not checkpoints_newest_first(run_dir / "checkpoints"):
        raise LmforgeError(f"{run_dir} has no checkpoint (it stopped before its first one was written); "
                           f"continue it with `--resume {run_dir}` or train it again")
    found = load_newest_good(run_dir / "checkpoints", with_optimizer=False, average=True)
    if found is None:
        raise LmforgeError(f"{run_dir} has no usable checkpoint")
    path, weights = found[0], found[1]
    wise = run_dir / WISE_WEIGHTS
    if wise.is_file():
        tensors, meta = read_weights(wise)
        if meta.get("checkpoint") == path.name:
            return tensors, f"{path.name}-wise"
        print(f"lmforge: warning: {wise} interpolates checkpoint {meta.get('checkpoint')!r}, not the newest one "
              f"({path.name}), which is used as it is; the run interpolates again when it finishes", file=sys.stderr)
    return weights, path.name


# classify.probe_first's fit: L-BFGS iterations, and the L2 weight of both heads (on states of RMS ~1)
PROBE_ITERS, PROBE_L2 = 200, 1e-3

CALIBRATION = "calibration.json"  # in a fine-tuning run: the temperature, fitted on validation at the end
# classify.wise_alpha < 1: the weights the run started from, and the interpolated model its readers load
WISE_START, WISE_WEIGHTS = "start.safetensors", "wise.safetensors"


def read_labels(run_dir: Path) -> tuple[str, ...]:
    """The class names of a fine-tuning run, in the order of its classifier's outputs."""
    return tuple(json.loads((Path(run_dir) / "dataset.json").read_text())["labels"])


def read_temperature(run_dir: Path) -> float:
    """The run's fitted temperature (calibration.json), or 1.0 for a run that has none (one still
    training, or made before 0.3)."""
    path = Path(run_dir) / CALIBRATION
    if not path.is_file():
        return 1.0
    try:
        temperature = float(json.loads(path.read_text())["temperature"])
    except (ValueError, KeyError, TypeError) as e:
        raise LmforgeError(f"{path} is damaged ({type(e).__name__}: {e}); delete it to use the uncalibrated "
                           f"probabilities") from None
    if not (math.isfinite(temperature) and temperature > 0):
        raise LmforgeError(f"{path} holds temperature {temperature}, not a positive number; delete it to use the "
                           f"uncalibrated probabilities")
    return temperature


def rating_head_range(cfg: Config, data: LabeledData) -> Optional[tuple[float, float]]:
    """The rating range the classifier's rating head maps to, or None for no rating head: the
    data has no ratings, or classify.rating_weight is 0 (the head would learn nothing)."""
    return data.rating_range if cfg.classify.rating_weight > 0 else None


def check_trainable(cfg: Config) -> None:
    """data.dataset is not one of the out-of-domain evaluation sets."""
    if cfg.data.dataset in EVALUATION_ONLY:
        raise LmforgeError(f"data.dataset={cfg.data.dataset} is an out-of-domain evaluation set, never trained on; "
                           f"train on movie-reviews (or your own file) and measure it with `lmforge evaluate RUN_DIR "
                           f"--dataset {cfg.data.dataset}`")


def load_training_data(cfg: Config) -> LabeledData:
    """data.dataset, checked to be trainable: two classes or more, and not an evaluation-only set."""
    check_trainable(cfg)
    data = load_labeled(cfg.data.dataset, cfg.data.cache_dir)  # every rank; the cache's file lock fetches once
    if len({e.label for e in data.examples}) < 2:
        raise LmforgeError(f"dataset {data.name} has examples of one class only ({data.labels[data.examples[0].label]!r}"
                           f"); a classifier needs two classes or more")
    return data


def load_classifier(run_dir: str | Path) -> tuple[Config, TextTokenizer, nn.Module]:
    """(config, tokenizer, classifier with the run's model (final_weights), in eval mode) of a fine-tuning run."""
    run_dir = Path(run_dir)
    if not (run_dir / "dataset.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise LmforgeError(f"{run_dir} is not an lmforge fine-tuning run directory (no dataset.json); give a run "
                           f"made by `lmforge finetune`")
    cfg = load_config(run_dir / "config.yaml", migrate_run=True)
    loaded = registry.objective(cfg.task.name).load_run(run_dir, cfg)
    return cfg, loaded.tokenizer, loaded.model


def evaluation_data(run_dir: Path, cfg: Config, spec: str) -> tuple[LabeledData, str]:
    """The examples `lmforge evaluate RUN --dataset SPEC` measures and which part they are: of the
    dataset the run was trained on (the same file, by sha256), its test split, never trained on;
    of movie-reviews for a run trained on something else, the test split of data.split_seed's
    default split (comparable between runs); of anything else, every example."""
    data = load_labeled(spec, cfg.data.cache_dir)
    recorded = json.loads((run_dir / "dataset.json").read_text())
    if data.identity == recorded.get("identity"):
        test = json.loads((run_dir / "split.json").read_text())["test"]
        part = "the run's test split"
    elif spec == "movie-reviews":
        test = stratified_split([e.label for e in data.examples], DataConfig().split_seed)["test"]
        part = f"its test split (data.split_seed={DataConfig().split_seed})"
    else:
        return data, "all of it"
    return dataclasses.replace(data, examples=[data.examples[i] for i in test]), part


def evaluate_run(run_dir: str | Path, spec: str, out_dir: Optional[str | Path] = None, write: bool = True) -> dict:
    """`lmforge evaluate`: the fine-tuning run's classifier (final_weights, the run's fitted
    temperature) on dataset `spec` (evaluation_data says which examples); the result of
    eval/evaluate.py's evaluate_examples plus `part`, `checkpoint` and, with `write`, `files`:
    OUT_DIR (default RUN_DIR/evaluations)/NAME.CHECKPOINT.json, -reliability.png, -confusion.png."""
    run_dir = Path(run_dir)
    cfg, tokenizer, model = load_classifier(run_dir)
    data, part = evaluation_data(run_dir, cfg, spec)
    result = evaluate_examples(model, tokenizer, data, read_labels(run_dir), cfg.data.seq_len,
                               read_temperature(run_dir), cfg.train.eval_batch_size or 4 * cfg.train.batch_size)
    _, checkpoint = final_weights(run_dir)  # its name: ...-wise for one interpolated toward the start
    result.update(part=part, checkpoint=checkpoint)
    if write:
        stem = f"{Path(spec).stem if Path(spec).suffix else spec.replace(':', '_').replace('/', '_')}.{checkpoint}"
        result["files"] = write_evaluation(result, Path(out_dir) if out_dir else run_dir / "evaluations", stem)
    return result


def init_source(cfg: Config) -> tuple[TextTokenizer, Optional[dict[str, torch.Tensor]]]:
    """Tokenizer and encoder tensors (`bert.*`, `model.*`, ...: the family's encoder) to start from;
    fills cfg.model's family and shape from the source."""
    spec = cfg.model.init_from
    if spec is None:
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.cache_dir)
        fill_vocab_size(cfg, tokenizer)
        return tokenizer, None
    path = source_path(spec, cfg.data.cache_dir)
    loaded = load_model(path, mlm_head_required=False)
    source_family = family(loaded.config.arch)
    if source_family.kind != "encoder":
        raise LmforgeError(f"model.init_from={spec} is a {loaded.config.arch} model; a classifier is fine-tuned "
                           f"from an encoder (an MLM or ELECTRA run, minilm, or a transformers BERT, ModernBERT "
                           f"or DeBERTa-v2)")
    if cfg.data.tokenizer != DataConfig().tokenizer:  # set on purpose: it must be the source's own
        given = load_tokenizer(cfg.data.tokenizer, cfg.data.cache_dir)
        if not same_vocabulary(given, loaded.tokenizer):
            raise LmforgeError(f"data.tokenizer={cfg.data.tokenizer} ({given.vocab_size} tokens) does not match the "
                               f"tokenizer of model.init_from={spec} ({loaded.tokenizer.vocab_size} tokens); drop "
                               f"data.tokenizer: a model is fine-tuned with the tokenizer it was trained with")
    src = loaded.config
    take_source_shape(cfg, src)  # the source's family and shape; dropout and the fine-tuning keys stay
    if cfg.data.seq_len > src.max_position_embeddings:
        raise LmforgeError(f"data.seq_len={cfg.data.seq_len} exceeds the {src.max_position_embeddings} positions "
                           f"of {spec}; set data.seq_len={src.max_position_embeddings} or lower")
    encoder = {k: v for k, v in loaded.model.state_dict().items() if k.startswith(source_family.encoder_attr + ".")}
    if cfg.model.classifier_pooling == "pooler":
        encoder.update(source_pooler(path, loaded))
    return loaded.tokenizer, encoder


def source_pooler(path: Path, loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """{"pooler.weight", "pooler.bias"} of a source that has BERT's pooler (a transformers BERT
    directory: minilm has one; an lmforge run pretrained with mlm.nsp), else {} and a note on
    stderr: the pooler then starts from the family's init."""
    if loaded.source == "hf":
        tensors = read_hf_dir(path)[1]
        for prefix in ("pooler.dense.", "bert.pooler.dense."):
            if prefix + "weight" in tensors:
                return {f"pooler.{p}": tensors[prefix + p] for p in ("weight", "bias")}
    elif getattr(loaded.model, "pooler", None) is not None:  # an mlm.nsp run's pooler (BertForMaskedLM)
        return {f"pooler.{k}": v for k, v in loaded.model.pooler.state_dict().items()}
    print(f"note: model.classifier_pooling=pooler: {path} has no pooler; it starts from the family's init",
          file=sys.stderr)
    return {}


def reinit_top_layers(model: Classifier, cfg: Config) -> None:
    """model.reinit_layers=k (Zhang et al. 2021): the top k encoder layers start afresh from BERT's
    init instead of the pretrained weights, which fit the pretraining objective and transfer the
    least; drawn from the seeded generator state like the heads."""
    k = cfg.model.reinit_layers
    if not k:
        return
    if cfg.model.init_from is None:
        raise LmforgeError("model.reinit_layers re-initialises layers of the model.init_from weights; without "
                           "model.init_from every layer is random already (set model.reinit_layers=0)")
    if k > cfg.model.num_layers:
        raise LmforgeError(f"model.reinit_layers={k} exceeds the {cfg.model.num_layers} layers of "
                           f"{cfg.model.init_from}; use at most {cfg.model.num_layers}")
    init = model_class(cfg.model.arch).init_weights
    for layer in model.encoder.layers[-k:]:
        layer.apply(lambda module: init(module, cfg.model))


def split_examples(cfg: Config, data: LabeledData) -> dict[str, list[int]]:
    labels = [e.label for e in data.examples]
    split = stratified_split(labels, cfg.data.split_seed)
    if cfg.data.train_examples is not None:  # few-sample fine-tuning: a stratified part of the train split
        split["train"] = stratified_subset(split["train"], labels, cfg.data.train_examples, cfg.data.split_seed)
    for name, idx in split.items():
        if not idx:
            raise LmforgeError(f"dataset {data.name} is too small: its {name} split is empty")
    return split
