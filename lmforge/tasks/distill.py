"""Distillation (DistilBERT, Sanh et al. 2019) as two tasks: a teacher teaches a student with
fewer encoder layers that starts as a copy of it (`copy_teacher`): the teacher's embeddings,
every other encoder layer ending at the top one (6 -> 3: layers 1, 3, 5), and its heads.
The teacher runs without gradients in eval mode; only the student is trained, checkpointed and
exported.

task.name=distill (`lmforge finetune`, task-specific): the teacher is a fine-tuned classifier, the
data the task's training texts. Loss on a batch, summed over examples:

    loss.soft_weight   x T^2 x KL(teacher's softmax(logits / T) || student's)   soft targets
  + loss.hard_weight   x cross-entropy with the true labels                      hard targets
  + loss.cosine_weight x (1 - cosine(student's [CLS] state, teacher's))          hidden states
  + loss.rating_weight x |rating - true rating|                                  (movie reviews)

task.name=distill-mlm (`lmforge pretrain`, general, DistilBERT's own setting): the teacher is a
masked LM (an lmforge MLM run or a transformers BERT with its MLM head), the data the corpus,
masked as for MLM. The same three terms, as means: soft targets and cross-entropy over the masked
positions (both over the whole vocabulary, fused in one chunked pass: lmforge/ops/linear_distill.py),
the cosine over the final hidden state of every token (`DistillMLMTask.loss` says how it is scaled).

Both record the teacher's weights' sha256 in the run (teacher.json); a resume re-reads the teacher
and refuses one that has changed.

The T^2 keeps the soft term's gradient the same size at any temperature (Hinton et al. 2015).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.data.padding import mask_if_padded
from lmforge.errors import LmforgeError
from lmforge.models.bert import BertForMaskedLM
from lmforge.models.classifier import BertClassifier
from lmforge.ops.linear_distill import linear_distill
from lmforge.tasks.base import Batch, EvalResult, LossOutput
from lmforge.tasks.classify import ClassifyTask
from lmforge.tasks.mlm import MaskedLMTask


def teacher_sha256(teacher: nn.Module) -> str:
    """Identity of a teacher's weights (names, shapes, dtypes, bytes): a resumed student must
    learn from the very teacher it started with, not a teacher run trained further since."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def record_teacher(run_dir: Path, spec: str, teacher: nn.Module) -> None:
    """teacher.json in the run directory: where the teacher was and which weights it had."""
    (run_dir / "teacher.json").write_text(json.dumps({"teacher": spec, "sha256": teacher_sha256(teacher)}, indent=2)
                                          + "\n")


def check_teacher(run_dir: Path, spec: str, teacher: nn.Module) -> None:
    """Refuse to resume with a teacher whose weights differ from the recorded ones."""
    path = run_dir / "teacher.json"
    if not path.is_file():
        raise LmforgeError(f"{run_dir} has no teacher.json: it cannot tell which teacher it learned from; "
                           f"start the run again")
    if json.loads(path.read_text())["sha256"] != teacher_sha256(teacher):
        raise LmforgeError(f"task.teacher={spec} has other weights than when {run_dir} started (trained further, or "
                           f"replaced); a resumed student must learn from the same teacher: restore it, or start a "
                           f"new run")


def student_layers(teacher_layers: int, layers: int) -> list[int]:
    """Which teacher layers the student's copy: every (teacher/student)-th, ending at the top."""
    step = teacher_layers / layers
    return [round(teacher_layers - 1 - step * (layers - 1 - i)) for i in range(layers)]


def copy_teacher(student: nn.Module, teacher: nn.Module, fresh: tuple[str, ...] = ()) -> nn.Module:
    """Load into `student` (the teacher's shape, fewer layers) the teacher's tensors: every one
    outside the encoder layers that the student has, and layers `student_layers(...)`. Student
    tensors whose names start with `fresh` may be missing from the teacher: they keep their init."""
    mine = student.state_dict()
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("bert.layers.") and k in mine}
    picks = student_layers(len(teacher.bert.layers), len(student.bert.layers))
    for i, theirs in enumerate(picks):
        state.update({f"bert.layers.{i}.{k}": v for k, v in teacher.bert.layers[theirs].state_dict().items()})
    lacking = [k for k in student.load_state_dict(state, strict=False).missing_keys if not k.startswith(fresh)]
    if lacking:
        raise KeyError(f"the teacher lacks student tensors: {', '.join(lacking)}")
    return student


def student_from_teacher(teacher: nn.Module, cfg: ModelConfig,
                         rating_range: Optional[tuple[float, float]]) -> BertClassifier:
    """A classifier of shape `cfg` (the teacher's, with fewer layers; its own dropout) initialised
    from `teacher` (see the module docstring), a BertClassifier or a transformers
    BertForSequenceClassification (PooledBertClassifier: its classifier becomes the polarity head,
    its pooler is left out). A rating head the teacher lacks starts from its init."""
    return copy_teacher(BertClassifier(cfg, teacher.polarity.out_features, rating_range), teacher, fresh=("rating.",))


def mlm_student_from_teacher(teacher: BertForMaskedLM, cfg: ModelConfig) -> BertForMaskedLM:
    """A masked LM of shape `cfg` initialised from the masked-LM `teacher` (an NSP head, if the
    teacher has one, is not copied: the student trains MLM only)."""
    return copy_teacher(BertForMaskedLM(cfg), teacher)


def on_device(teacher: nn.Module, device: torch.device) -> nn.Module:
    """The teacher, moved to the batches' device the first time (the loop moves only the student)."""
    if next(teacher.parameters()).device != device:
        teacher.to(device)
    return teacher


class DistillClassifyTask(ClassifyTask):
    name = "distill"

    def __init__(self, *args, teacher: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        t = batch.tensors
        mask = mask_if_padded(t["attention_mask"], batch.num_tokens)
        on_device(self.teacher, t["input_ids"].device)
        with torch.no_grad():
            teacher_logits, _, teacher_cls = self.teacher(t["input_ids"], attention_mask=mask, return_cls=True)
        logits, rating, cls = model(t["input_ids"], attention_mask=mask, return_cls=True)
        w, temp = self.cfg.loss, self.cfg.task.temperature
        soft = F.kl_div(F.log_softmax(logits.float() / temp, -1), F.log_softmax(teacher_logits.float() / temp, -1),
                        log_target=True, reduction="sum") * temp ** 2
        hard = F.cross_entropy(logits.float(), t["labels"], reduction="sum")
        cosine = (1 - F.cosine_similarity(cls.float(), teacher_cls.float(), dim=-1)).sum()
        loss = w.soft_weight * soft + w.hard_weight * hard + w.cosine_weight * cosine
        sums = {"correct": (logits.argmax(-1) == t["labels"]).sum(), "ce": hard.detach(), "soft": soft.detach(),
                "cosine": cosine.detach(),
                "teacher_agreement": (logits.argmax(-1) == teacher_logits.argmax(-1)).sum()}
        return self.finish_loss(batch, rating, loss, sums)  # + the rating term, as for any classifier


class DistillMLMTask(MaskedLMTask):
    """General distillation: MaskedLMTask's batches and evaluation, the distillation loss."""

    name = "distill-mlm"

    def __init__(self, *args, teacher: BertForMaskedLM, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self._teacher_eval: dict[str, float] | None = None

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        t = batch.tensors
        masked, selected = t["masked_ids"], t["selected"]
        teacher = on_device(self.teacher, masked.device)
        with torch.no_grad():
            teacher_hidden = teacher.bert(masked)
            teacher_x = teacher.mlm_head.transform(teacher_hidden[selected])
        w, temp = self.cfg.loss, self.cfg.task.temperature
        targets = t["input_ids"][selected]

        def head_loss(x, weight, bias):  # soft targets + cross-entropy, fused (lmforge/ops/linear_distill.py)
            return linear_distill(x, weight, bias, teacher_x, teacher.bert.embeddings.token.weight,
                                  teacher.mlm_head.bias, targets, temp, w.soft_weight, w.hard_weight)

        (head, soft, hard, correct, agreement), hidden = model(masked, selected=selected, return_hidden=True,
                                                              head_loss=head_loss)
        # Every token's state counts (no padding in MLM windows): a loss term over "tokens"
        # (Batch.counts), which the loop divides by the step's token count — the per-token mean
        # over the global batch, whatever micro-batches and processes it is cut into.
        cosine = (1 - F.cosine_similarity(hidden.float(), teacher_hidden.float(), dim=-1)).sum()
        return LossOutput(head, {"correct": correct, "mlm_loss": hard, "soft": soft, "cosine": cosine.detach(),
                                 "teacher_agreement": agreement},
                          terms={"tokens": w.cosine_weight * cosine}, per={"cosine": "tokens"})

    def train_batch(self, step: int, micro: int) -> Batch:
        batch = super().train_batch(step, micro)
        batch.counts["tokens"] = batch.tensors["masked_ids"].numel()
        return batch

    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult:
        """MLM's evaluation of the student, plus the teacher's loss and accuracy on the same masked
        positions (computed once: the teacher does not change)."""
        result = super().evaluate(model, device)
        if self._teacher_eval is None:
            teacher = on_device(self.teacher, device)
            self._teacher_eval = {f"teacher_{k}": v for k, v in super().evaluate(teacher, device).metrics.items()
                                  if k in ("loss", "accuracy")}
        result.metrics.update(self._teacher_eval)
        return result

    def summary(self, last_eval: dict[str, float]) -> dict[str, float]:
        return {**super().summary(last_eval), "teacher_val_loss": last_eval["teacher_loss"],
                "teacher_val_accuracy": last_eval["teacher_accuracy"]}
