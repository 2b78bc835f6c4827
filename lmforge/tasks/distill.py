"""Distillation (DistilBERT, Sanh et al. 2019) as two tasks: a teacher teaches a student with
fewer encoder layers that starts as a copy of it (`copy_teacher`): the teacher's embeddings,
every other encoder layer ending at the top one (6 -> 3: layers 1, 3, 5), and its heads.
The teacher runs without gradients in eval mode; only the student is trained, checkpointed and
exported.

task.name=distill (`lmforge finetune`, task-specific): the teacher is a fine-tuned classifier, the
data the task's training texts. Loss on a batch, summed over examples:

    distill.soft_weight    x T^2 x KL(teacher's softmax(logits / T) || student's)   soft targets
  + distill.hard_weight    x cross-entropy with the true labels                      hard targets
  + distill.cosine_weight  x (1 - cosine(student's [CLS] state, teacher's))          hidden states
  + classify.rating_weight x |rating - true rating|                                  (movie reviews)

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

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import Config, DataConfig, ModelConfig
from lmforge.data.padding import mask_if_padded
from lmforge.data.prepared import fill_vocab_size, prepared_data
from lmforge.data.sentiment import LABELS
from lmforge.data.tokenizers import TextTokenizer, load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models.bert import BertForMaskedLM
from lmforge.models.classifier import Classifier
from lmforge.models.registry import check_family
from lmforge.ops.linear_distill import linear_distill
from lmforge.runs.readers import LoadedModel, is_hf_classifier_dir, is_hf_dir, load_hf_classifier
from lmforge.tasks.base import Batch, EvalResult, LossOutput
from lmforge.tasks.classify import (ClassifyTask, load_classifier, load_training_data, rating_head_range,
                                    split_examples)
from lmforge.tasks.loading import load_model
from lmforge.tasks.mlm import MaskedLMTask
from lmforge.tasks.registry import register


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
        raise LmforgeError(f"distill.teacher={spec} has other weights than when {run_dir} started (trained further, or "
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
                         rating_range: Optional[tuple[float, float]]) -> Classifier:
    """A classifier of shape `cfg` (the teacher's, with fewer layers; its own dropout) initialised
    from `teacher` (see the module docstring), a Classifier or a transformers
    BertForSequenceClassification (a Classifier with its pooler: its classifier becomes the polarity head,
    its pooler is left out). A rating head the teacher lacks starts from its init."""
    return copy_teacher(Classifier(cfg, teacher.polarity.out_features, rating_range), teacher, fresh=("rating.",))


def mlm_student_from_teacher(teacher: BertForMaskedLM, cfg: ModelConfig) -> BertForMaskedLM:
    """A masked LM of shape `cfg` initialised from the masked-LM `teacher` (an NSP head, if the
    teacher has one, is not copied: the student trains MLM only)."""
    return copy_teacher(BertForMaskedLM(cfg), teacher)


def on_device(teacher: nn.Module, device: torch.device) -> nn.Module:
    """The teacher, moved to the batches' device the first time (the loop moves only the student)."""
    if next(teacher.parameters()).device != device:
        teacher.to(device)
    return teacher


@register
class DistillClassifyTask(ClassifyTask):
    name = "distill"
    wrong_verb_hint = ("task-specific distillation (a classifier teacher) is `lmforge finetune`; general "
                       "distillation of a masked LM is task.name=distill-mlm")

    def __init__(self, *args, teacher: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        check_family(cls.name, cfg.model.arch, "encoder", ("bert",))  # the student copies the teacher's BERT layers
        if cfg.distill.teacher is None:
            raise LmforgeError("task.name=distill needs distill.teacher=RUN_DIR, a fine-tuned classifier run to learn "
                               "from")

    @classmethod
    def create(cls, cfg: Config) -> "DistillClassifyTask":
        tokenizer, teacher = load_teacher(cfg)  # sets the student's data and shape
        data = load_training_data(cfg)
        if teacher.polarity.out_features != len(data.labels):
            raise LmforgeError(f"the teacher has {teacher.polarity.out_features} classes and {data.name} has "
                               f"{len(data.labels)} ({', '.join(data.labels)}); distil on the teacher's own task")
        split = split_examples(cfg, data)
        torch.manual_seed(cfg.train.seed)  # the rating head's initialisation
        model = student_from_teacher(teacher, cfg.model, rating_head_range(cfg, data))  # every other teacher layer
        return cls(cfg, data, split, tokenizer, model, teacher=teacher)

    # the student starts from its teacher's layers and heads, not from a probe of a pretrained
    # encoder: classify.probe_first and classify.wise_alpha do not apply (config.py says so)
    interpolates = False

    @classmethod
    def reopen(cls, cfg: Config, run_dir: Path, **extra) -> "DistillClassifyTask":
        teacher = _read_teacher(cfg.distill.teacher)[2]  # read again, and it must be the same teacher
        check_teacher(run_dir, cfg.distill.teacher, teacher)
        return super().reopen(cfg, run_dir, teacher=teacher)

    def write_run_files(self, run_dir: Path) -> None:
        super().write_run_files(run_dir)
        record_teacher(run_dir, self.cfg.distill.teacher, self.teacher)

    def initialised_from(self) -> str:
        return f"every other layer of {self.cfg.distill.teacher}"

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        t = batch.tensors
        mask = mask_if_padded(t["attention_mask"], batch.num_tokens)
        on_device(self.teacher, t["input_ids"].device)
        with torch.no_grad():
            teacher_out = self.teacher(t["input_ids"], attention_mask=mask)
        teacher_logits, teacher_cls = teacher_out.logits, teacher_out.cls
        out = model(t["input_ids"], attention_mask=mask)
        logits, rating, cls = out.logits, out.rating, out.cls
        w, temp = self.cfg.distill, self.cfg.distill.temperature
        soft = F.kl_div(F.log_softmax(logits.float() / temp, -1), F.log_softmax(teacher_logits.float() / temp, -1),
                        log_target=True, reduction="sum") * temp ** 2
        hard = F.cross_entropy(logits.float(), t["labels"], reduction="sum")
        cosine = (1 - F.cosine_similarity(cls.float(), teacher_cls.float(), dim=-1)).sum()
        loss = w.soft_weight * soft + w.hard_weight * hard + w.cosine_weight * cosine
        sums = {"accuracy": (logits.argmax(-1) == t["labels"]).sum(), "ce": hard.detach(), "soft": soft.detach(),
                "cosine": cosine.detach(),
                "teacher_agreement": (logits.argmax(-1) == teacher_logits.argmax(-1)).sum()}
        return self.finish_loss(batch, rating, loss, sums)  # + the rating term, as for any classifier


@register
class DistillMLMTask(MaskedLMTask):
    """General distillation: MaskedLMTask's batches and evaluation, the distillation loss."""

    name = "distill-mlm"
    archs = ("bert",)  # the teacher's layers are copied into the student: BERT to BERT
    wrong_verb_hint = "general distillation of a masked LM is `lmforge pretrain task.name=distill-mlm`"

    def __init__(self, *args, teacher: BertForMaskedLM, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self._teacher_eval: dict[str, float] | None = None

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.distill.teacher is None:
            raise LmforgeError("task.name=distill-mlm needs distill.teacher=PATH, an lmforge MLM run or a transformers "
                               "BertForMaskedLM directory to learn from")

    @classmethod
    def create(cls, cfg: Config) -> "DistillMLMTask":
        teacher = load_mlm_teacher(cfg)  # sets the tokenizer and the student's shape
        data = prepared_data(cfg, progress=cfg.train.progress)
        if data.tokenizer.sha256 != teacher.tokenizer.sha256:
            raise LmforgeError(f"the prepared data {data.folder} was tokenized with another tokenizer than the "
                               f"teacher {cfg.distill.teacher}'s; give the corpus itself (data.corpus), not prepared "
                               f"shards")
        fill_vocab_size(cfg, data.tokenizer)
        torch.manual_seed(cfg.train.seed)
        return cls(cfg, data, mlm_student_from_teacher(teacher.model, cfg.model), teacher=teacher.model)

    @classmethod
    def reopen(cls, cfg: Config, run_dir: Path) -> "DistillMLMTask":
        data = cls.reopen_data(cfg, run_dir)
        teacher = load_model(Path(cfg.distill.teacher), mlm_head_required=False).model  # it must be the same teacher
        check_teacher(run_dir, cfg.distill.teacher, teacher)
        return cls(cfg, data, cls.build_model(cfg), teacher=teacher)

    def write_run_files(self, run_dir: Path) -> None:
        super().write_run_files(run_dir)
        record_teacher(run_dir, self.cfg.distill.teacher, self.teacher)

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        t = batch.tensors
        masked, selected = t["masked_ids"], t["selected"]
        teacher = on_device(self.teacher, masked.device)
        with torch.no_grad():
            teacher_hidden = teacher.bert(masked)
            teacher_x = teacher.mlm_head.transform(teacher_hidden[selected])
        w, temp = self.cfg.distill, self.cfg.distill.temperature
        targets = t["input_ids"][selected]

        def head_loss(x, weight, bias):  # soft targets + cross-entropy, fused (lmforge/ops/linear_distill.py)
            return linear_distill(x, weight, bias, teacher_x, teacher.bert.embeddings.token.weight,
                                  teacher.mlm_head.bias, targets, temp, w.soft_weight, w.hard_weight)

        out = model(masked, selected=selected, head_loss=head_loss)
        (head, soft, hard, correct, agreement), hidden = out.head, out.hidden
        # Every token's state counts (no padding in MLM windows): a loss term over "tokens"
        # (Batch.counts), which the loop divides by the step's token count — the per-token mean
        # over the global batch, whatever micro-batches and processes it is cut into.
        cosine = (1 - F.cosine_similarity(hidden.float(), teacher_hidden.float(), dim=-1)).sum()
        return LossOutput(head, {"accuracy": correct, "mlm_loss": hard, "soft": soft, "cosine": cosine.detach(),
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


# -- reading the teacher and shaping the student ------------------------------------------------

def load_mlm_teacher(cfg: Config) -> LoadedModel:
    """task.name=distill-mlm: the teacher masked LM (an lmforge MLM run or a transformers BERT with
    its MLM head). The student takes the teacher's tokenizer (data.tokenizer is set to it) and its
    shape with distill.student_layers layers (default half)."""
    k, d = cfg.distill, cfg.data
    path = teacher_path(cfg)
    if d.train_tokenizer_vocab:
        raise LmforgeError("task.name=distill-mlm uses the teacher's tokenizer; drop data.train_tokenizer_vocab")
    if is_hf_classifier_dir(path):
        raise LmforgeError(f"distill.teacher={k.teacher} is a fine-tuned classifier; it teaches with `lmforge finetune "
                           f"task.name=distill`, not general distillation of a masked LM")
    teacher = load_model(path, mlm_head_required=False)
    if not isinstance(teacher.model, BertForMaskedLM):
        raise LmforgeError(f"distill.teacher={k.teacher} is not a BERT masked LM (a GPT); general distillation "
                           f"needs a masked-LM teacher: an lmforge MLM run or a transformers BertForMaskedLM")
    if teacher.fresh_mlm_head:
        raise LmforgeError(f"distill.teacher={k.teacher} has no trained masked-LM head (an encoder only, or an "
                           f"ELECTRA discriminator): there are no soft targets to learn from; give an MLM run or a "
                           f"transformers BertForMaskedLM")
    spec = str(path / "tokenizer.json") if (path / "config.yaml").is_file() else str(path)
    if d.tokenizer not in (spec, DataConfig().tokenizer):
        given = load_tokenizer(d.tokenizer, d.cache_dir)
        if given.sha256 != teacher.tokenizer.sha256:
            raise LmforgeError(f"data.tokenizer={d.tokenizer} is not the tokenizer of distill.teacher={k.teacher}; "
                               f"drop data.tokenizer: the student reads the teacher's tokens")
    d.tokenizer = spec
    cfg.model = student_config(cfg, teacher.config, next_sentence_head=False)
    return teacher


def teacher_path(cfg: Config) -> Path:
    """Distillation: distill.teacher as an absolute path, saved so in the config (a resume from
    elsewhere finds it); model.init_from is refused, the student starts from the teacher."""
    if cfg.model.init_from is not None:
        raise LmforgeError(f"task.name={cfg.task.name} starts the student from the teacher's own layers; drop "
                           f"model.init_from (set it to null)")
    path = Path(cfg.distill.teacher).expanduser().resolve()
    cfg.distill.teacher = str(path)
    return path


def student_config(cfg: Config, teacher: ModelConfig, **fixed) -> ModelConfig:
    """Distillation: the student's shape, the teacher's with distill.student_layers layers (default
    half; set in cfg) and the config's dropout. The sequence lengths are checked against the
    teacher's positions here (config validation left them to this)."""
    positions = teacher.max_position_embeddings
    for key, value in (("data.seq_len", cfg.data.seq_len), ("data.long_seq_len", cfg.data.long_seq_len)):
        if value is not None and value > positions:
            raise LmforgeError(f"{key}={value} exceeds the {positions} positions of distill.teacher="
                               f"{cfg.distill.teacher}; set {key}={positions} or lower")
    layers = cfg.distill.student_layers or max(1, teacher.num_layers // 2)
    if layers > teacher.num_layers:
        raise LmforgeError(f"distill.student_layers={layers} exceeds the teacher's {teacher.num_layers} layers")
    cfg.distill.student_layers = layers
    return dataclasses.replace(teacher, num_layers=layers, dropout=cfg.model.dropout, init_from=None, reinit_layers=0,
                               **fixed)


def _read_teacher(spec: str) -> tuple[Optional[Config], TextTokenizer, torch.nn.Module]:
    """(its run's config, or None for a transformers directory; tokenizer; classifier in eval mode)."""
    path = Path(spec).expanduser()
    if is_hf_classifier_dir(path):
        _, tokenizer, teacher, notes = load_hf_classifier(path, LABELS)
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        return None, tokenizer, teacher
    if is_hf_dir(path):
        raise LmforgeError(f"distill.teacher={spec} is a transformers directory but not a "
                           f"BertForSequenceClassification; task.name=distill learns from a fine-tuned classifier "
                           f"(general distillation of a masked LM is `lmforge pretrain task.name=distill-mlm`)")
    if not (path / "dataset.json").is_file():
        raise LmforgeError(f"distill.teacher={spec} is neither an lmforge fine-tuning run (no dataset.json) nor a "
                           f"transformers BertForSequenceClassification directory")
    return load_classifier(path)


def load_teacher(cfg: Config) -> tuple[TextTokenizer, torch.nn.Module]:
    """task.name=distill: the teacher classifier (an lmforge fine-tuning run or a transformers
    BertForSequenceClassification directory) and its tokenizer. The student takes the teacher's
    shape with distill.student_layers layers (default half). From an lmforge teacher it also takes the
    dataset, split and sequence length (its test split must be the teacher's, never seen in
    training by either); a transformers teacher brings none, so the config's are used."""
    t_cfg, tokenizer, teacher = _read_teacher(str(teacher_path(cfg)))
    if t_cfg is not None:
        if cfg.data.dataset not in (t_cfg.data.dataset, DataConfig().dataset):
            raise LmforgeError(f"data.dataset={cfg.data.dataset} differs from the teacher's ({t_cfg.data.dataset}); "
                               f"the student learns on the teacher's task: drop data.dataset")
        cfg.data.dataset, cfg.data.split_seed, cfg.data.seq_len = (t_cfg.data.dataset, t_cfg.data.split_seed,
                                                                   t_cfg.data.seq_len)
    # a transformers teacher's pooler is left out: its student reads the final [CLS] state
    cfg.model = student_config(cfg, teacher.cfg, **({"classifier_pooling": "cls"} if t_cfg is None else {}))
    return tokenizer, teacher
