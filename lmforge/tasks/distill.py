"""Task-specific distillation (DistilBERT, Sanh et al. 2019) as a task: a fine-tuned classifier
(the teacher) teaches a smaller one (the student) on the task's training texts.

The student has fewer encoder layers and starts as a copy of the teacher: its embeddings, every
other encoder layer ending at the top one (6 -> 3: layers 1, 3, 5), and the heads
(`student_from_teacher`). Its loss on a batch, summed over examples:

    loss.soft_weight   x T^2 x KL(teacher's softmax(logits / T) || student's)   soft targets
  + loss.hard_weight   x cross-entropy with the true labels                      hard targets
  + loss.cosine_weight x (1 - cosine(student's [CLS] state, teacher's))          hidden states
  + loss.rating_weight x |rating - true rating|                                  (movie reviews)

The T^2 keeps the soft term's gradient the same size at any temperature (Hinton et al. 2015).
The teacher runs without gradients in eval mode; only the student is trained, checkpointed and
exported, and `lmforge classify` uses it like any classifier.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.data.padding import mask_if_padded
from lmforge.models.classifier import BertClassifier
from lmforge.tasks.base import Batch, LossOutput
from lmforge.tasks.classify import ClassifyTask


def student_layers(teacher_layers: int, layers: int) -> list[int]:
    """Which teacher layers the student's copy: every (teacher/student)-th, ending at the top."""
    step = teacher_layers / layers
    return [round(teacher_layers - 1 - step * (layers - 1 - i)) for i in range(layers)]


def student_from_teacher(teacher: BertClassifier, cfg: ModelConfig) -> BertClassifier:
    """A classifier of shape `cfg` (the teacher's, with fewer layers; its own dropout) initialised
    from `teacher` (see the module docstring)."""
    layers = cfg.num_layers
    rating_range = None
    if teacher.rating is not None:
        centre, half = float(teacher.rating_centre), float(teacher.rating_half_width)
        rating_range = (centre - half, centre + half)
    student = BertClassifier(cfg, teacher.polarity.out_features, rating_range)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("bert.layers.")}
    for mine, theirs in enumerate(student_layers(len(teacher.bert.layers), layers)):
        state.update({f"bert.layers.{mine}.{k}": v for k, v in teacher.bert.layers[theirs].state_dict().items()})
    student.load_state_dict(state)
    return student


class DistillClassifyTask(ClassifyTask):
    name = "distill"

    def __init__(self, *args, teacher: BertClassifier, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        t = batch.tensors
        mask = mask_if_padded(t["attention_mask"], batch.num_tokens)
        device = t["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
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
