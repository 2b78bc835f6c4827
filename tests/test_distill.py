"""Task-specific distillation (task.name=distill): the student's layer-copy initialisation, the
loss of a student equal to its teacher, and a teacher -> student run end to end with resume."""

import dataclasses
import json

import pytest
import torch

from conftest import interrupt_during_step
from lmforge.config import ModelConfig, load_config
from lmforge.errors import LmforgeError
from lmforge.finetune import finetune, load_classifier, resume_finetune
from lmforge.models.classifier import BertClassifier
from lmforge.tasks.distill import DistillClassifyTask, student_from_teacher, student_layers
from lmforge.train.log import read_metrics
from test_finetune import _cfg, tiny_reviews  # noqa: F401  (a fixture)


def test_the_student_copies_every_other_layer_ending_at_the_top():
    assert student_layers(6, 3) == [1, 3, 5]
    assert student_layers(12, 6) == [1, 3, 5, 7, 9, 11]
    assert student_layers(2, 1) == [1] and student_layers(4, 4) == [0, 1, 2, 3]
    torch.manual_seed(0)
    teacher = BertClassifier(ModelConfig(vocab_size=60, hidden_size=16, num_layers=4, num_heads=2,
                                         intermediate_size=32, dropout=0.0), 2, (-4.0, 4.0))
    student = student_from_teacher(teacher, dataclasses.replace(teacher.cfg, num_layers=2, dropout=0.1))
    assert len(student.bert.layers) == 2 and student.rating is not None and student.cfg.dropout == 0.1
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # noqa: E731
    assert same(student.bert.embeddings, teacher.bert.embeddings) and same(student.polarity, teacher.polarity)
    assert same(student.bert.layers[0], teacher.bert.layers[1]) and same(student.bert.layers[1], teacher.bert.layers[3])
    # a "student" with every layer is the teacher itself: same logits, rating and [CLS] state
    whole = student_from_teacher(teacher, teacher.cfg).eval()
    ids = torch.randint(5, 60, (3, 9))
    for a, b in zip(whole(ids, return_cls=True), teacher.eval()(ids, return_cls=True)):
        torch.testing.assert_close(a, b)


def test_distillation_end_to_end_with_resume(tiny_prepared, tiny_reviews, tmp_path, monkeypatch):  # noqa: F811
    teacher_dir, teacher = finetune(_cfg(tiny_prepared, tmp_path / "t", tiny_reviews, "train.max_steps=30"))
    student = lambda out, *o: _cfg(tiny_prepared, out, tiny_reviews, "task.name=distill",  # noqa: E731
                                   f"task.teacher={teacher_dir}", "train.max_steps=12", "train.eval_every=6",
                                   "train.checkpoint_every=6", "train.log_every=1", "model.dropout=0.1", *o)
    full_dir, summary = finetune(student(tmp_path / "full"))
    assert full_dir.name.startswith("distill.")
    cfg, _, model = load_classifier(full_dir)  # a plain classifier: `lmforge classify` and export use it
    assert cfg.model.num_layers == 1 and len(model.bert.layers) == 1 and cfg.task.student_layers == 1
    assert json.loads((full_dir / "split.json").read_text()) == json.loads((teacher_dir / "split.json").read_text())
    train = [r for r in read_metrics(full_dir) if r["split"] == "train"]
    assert {"soft", "cosine", "teacher_agreement", "ce"} <= set(train[0]) and 0 <= summary["test_accuracy"] <= 1
    interrupt_during_step(monkeypatch, DistillClassifyTask, 8)
    cut_dir, cut = finetune(student(tmp_path / "cut"))
    assert cut["stopped_by"] == "signal"
    monkeypatch.undo()
    resume_finetune(cut_dir)  # the teacher is read again from task.teacher
    losses = lambda d: [r["loss"] for r in read_metrics(d) if r["split"] == "train"]  # noqa: E731
    assert losses(cut_dir) == losses(full_dir)
    with pytest.raises(LmforgeError, match="needs task.teacher"):
        load_config(None, ["task.name=distill"])
    with pytest.raises(LmforgeError, match="exceeds the teacher's 2 layers"):
        finetune(student(tmp_path / "x", "task.student_layers=3"))
    with pytest.raises(LmforgeError, match="drop model.init_from"):
        finetune(student(tmp_path / "y", "model.init_from=minilm"))
