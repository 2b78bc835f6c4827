"""Distillation: task-specific (task.name=distill, a classifier teacher) and general
(task.name=distill-mlm, a masked-LM teacher): the student's layer-copy initialisation, the loss of
a student equal to its teacher, and teacher -> student runs end to end with resume."""

import dataclasses
import json

import pytest
import torch

from conftest import interrupt_during_step
from lmforge.api import make_config
from lmforge.config import ModelConfig, load_config
from lmforge.errors import LmforgeError
from lmforge.jobs import finetune, resume_finetune
from lmforge.tasks.classify import load_classifier
from lmforge.models.classifier import Classifier
from lmforge.data.mlm import random_mask
from lmforge.export import export_hf
from lmforge.models.bert import BertForMaskedLM
from lmforge.tasks.loading import load_model
from lmforge.jobs import pretrain, resume
from lmforge.tasks.base import Batch
from lmforge.tasks.distill import (DistillClassifyTask, DistillMLMTask, mlm_student_from_teacher,
                                   student_from_teacher, student_layers)
from lmforge.train.log import read_metrics
from conftest import tiny_config
from test_finetune import _cfg, tiny_reviews  # noqa: F401  (a fixture)


def test_the_student_copies_every_other_layer_ending_at_the_top():
    assert student_layers(6, 3) == [1, 3, 5]
    assert student_layers(12, 6) == [1, 3, 5, 7, 9, 11]
    assert student_layers(2, 1) == [1] and student_layers(4, 4) == [0, 1, 2, 3]
    torch.manual_seed(0)
    teacher = Classifier(ModelConfig(vocab_size=60, hidden_size=16, num_layers=4, num_heads=2,
                                         intermediate_size=32, dropout=0.0), 2, (-4.0, 4.0))
    student = student_from_teacher(teacher, dataclasses.replace(teacher.cfg, num_layers=2, dropout=0.1),
                                   (-4.0, 4.0))
    assert len(student.bert.layers) == 2 and student.rating is not None and student.cfg.dropout == 0.1
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # noqa: E731
    assert same(student.bert.embeddings, teacher.bert.embeddings) and same(student.polarity, teacher.polarity)
    assert same(student.bert.layers[0], teacher.bert.layers[1]) and same(student.bert.layers[1], teacher.bert.layers[3])
    # a "student" with every layer is the teacher itself: same logits, rating and [CLS] state
    whole = student_from_teacher(teacher, teacher.cfg, (-4.0, 4.0)).eval()
    ids = torch.randint(5, 60, (3, 9))
    a, b = whole(ids), teacher.eval()(ids)
    for field in ("logits", "rating", "cls"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field))


def test_distillation_end_to_end_with_resume(tiny_prepared, tiny_reviews, tmp_path, monkeypatch):  # noqa: F811
    teacher_dir, teacher = finetune(_cfg(tiny_prepared, tmp_path / "t", tiny_reviews, "train.max_steps=30"))
    student = lambda out, *o: _cfg(tiny_prepared, out, tiny_reviews, "task.name=distill",  # noqa: E731
                                   f"distill.teacher={teacher_dir}", "train.max_steps=12", "train.eval_every=6",
                                   "train.checkpoint_every=6", "train.log_every=1", "model.dropout=0.1", *o)
    full_dir, summary = finetune(student(tmp_path / "full"))
    assert full_dir.name.startswith("distill.")
    cfg, _, model = load_classifier(full_dir)  # a plain classifier: `lmforge classify` and export use it
    assert cfg.model.num_layers == 1 and len(model.bert.layers) == 1 and cfg.distill.student_layers == 1
    assert json.loads((full_dir / "split.json").read_text()) == json.loads((teacher_dir / "split.json").read_text())
    train = [r for r in read_metrics(full_dir) if r["split"] == "train"]
    assert {"soft", "cosine", "teacher_agreement", "ce"} <= set(train[0]) and 0 <= summary["test_accuracy"] <= 1
    interrupt_during_step(monkeypatch, DistillClassifyTask, 8)
    cut_dir, cut = finetune(student(tmp_path / "cut"))
    assert cut["stopped_by"] == "signal"
    monkeypatch.undo()
    resume_finetune(cut_dir)  # the teacher is read again from distill.teacher
    losses = lambda d: [r["loss"] for r in read_metrics(d) if r["split"] == "train"]  # noqa: E731
    assert losses(cut_dir) == losses(full_dir)
    with pytest.raises(LmforgeError, match="needs distill.teacher"):  # the objective's check (check_config)
        make_config(None, ["task.name=distill"])
    with pytest.raises(LmforgeError, match="exceeds the teacher's 2 layers"):
        finetune(student(tmp_path / "x", "distill.student_layers=3"))
    with pytest.raises(LmforgeError, match="drop model.init_from"):
        finetune(student(tmp_path / "y", "model.init_from=minilm"))


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_mlm_student_copies_every_other_layer_and_a_full_copy_has_zero_distillation_loss(tiny_prepared):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tiny_prepared.tokenizer.vocab_size, hidden_size=32, num_layers=4, num_heads=2,
                      intermediate_size=64, max_position_embeddings=64, dropout=0.0, next_sentence_head=True)
    teacher = BertForMaskedLM(cfg)
    student = mlm_student_from_teacher(teacher, dataclasses.replace(cfg, num_layers=2, next_sentence_head=False))
    assert not hasattr(student, "pooler") and _same(student.mlm_head, teacher.mlm_head)
    assert _same(student.bert.embeddings, teacher.bert.embeddings)
    assert _same(student.bert.layers[0], teacher.bert.layers[1]) and _same(student.bert.layers[1], teacher.bert.layers[3])
    # a student with all the teacher's layers: KL and cosine terms are zero, the rest is the teacher's MLM loss
    whole = mlm_student_from_teacher(teacher, dataclasses.replace(cfg, next_sentence_head=False))
    task = DistillMLMTask.__new__(DistillMLMTask)  # the loss alone: no data needed
    task.cfg = load_config(None, ["task.name=distill-mlm", "distill.teacher=x"])
    task.teacher = teacher.eval()
    ids = torch.randint(5, cfg.vocab_size, (4, 16))
    masked, selected = random_mask(ids, mask_id=4, special_mask=torch.zeros(cfg.vocab_size, dtype=torch.bool),
                                   mask_prob=0.3, mask_token_frac=0.8, random_token_frac=0.1,
                                   generator=torch.Generator().manual_seed(0))
    batch = Batch({"input_ids": ids, "masked_ids": masked, "selected": selected}, int(selected.sum()), ids.numel())
    out = task.loss(whole.eval(), batch)
    assert abs(out.sums["soft"].item()) < 1e-4 and abs(out.sums["cosine"].item()) < 1e-4
    reference = teacher(masked, selected=selected, targets=ids[selected]).loss_sum
    torch.testing.assert_close(out.sums["mlm_loss"], reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss_sum, 2.0 * reference, rtol=1e-4, atol=1e-3)  # hard_weight 2
    assert out.sums["teacher_agreement"].item() == batch.num_targets
    # the cosine term is a sum over every token, which the loop divides by the step's token count
    # (Batch.counts["tokens"]): a batch's sum is the sum of its halves', whatever their masked counts
    selected[:2, :8] = True  # the first half has more masked positions than the second
    whole_batch = Batch({"input_ids": ids, "masked_ids": masked, "selected": selected}, int(selected.sum()),
                        ids.numel())
    halves = [Batch({k: v[rows] for k, v in whole_batch.tensors.items()}, int(selected[rows].sum()), ids[rows].numel())
              for rows in (slice(0, 2), slice(2, 4))]
    student = mlm_student_from_teacher(teacher, dataclasses.replace(cfg, num_layers=1, next_sentence_head=False))
    with torch.no_grad():
        student.bert.layers[0].ffn_out.weight.mul_(5.0)  # rows whose states differ more or less from the teacher's
    task.cfg.distill.soft_weight = task.cfg.distill.hard_weight = 0.0  # the cosine term alone
    parts = [task.loss(student.eval(), b).terms["tokens"] for b in halves]
    whole_sum = task.loss(student, whole_batch).terms["tokens"]
    assert whole_sum > 0.001
    torch.testing.assert_close(parts[0] + parts[1], whole_sum, rtol=1e-6, atol=1e-7)
    task.cfg.distill.soft_weight, task.cfg.distill.hard_weight = 5.0, 2.0
    # and the student's gradient is zero in the soft and cosine terms alone at a full copy
    task.cfg.distill.hard_weight = 0.0
    whole.zero_grad()
    out = task.loss(whole, batch)
    (out.loss_sum + out.terms["tokens"]).backward()
    assert max(p.grad.abs().max().item() for p in whole.parameters() if p.grad is not None) < 1e-3


def test_general_distillation_end_to_end_with_resume_and_a_transformers_teacher(tiny_prepared, tmp_path,
                                                                               monkeypatch):
    teacher_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "t", "train.max_steps=20"))
    student = lambda out, teacher, *o: tiny_config(  # noqa: E731
        tiny_prepared, out, "task.name=distill-mlm", f"distill.teacher={teacher}", "model.dropout=0.1", *o)
    full_dir, summary = pretrain(student(tmp_path / "full", teacher_dir))
    assert full_dir.name.startswith("distill-mlm.")
    loaded = load_model(full_dir)  # a plain BERT MLM run: fill-mask, export and fine-tuning take it
    assert loaded.config.num_layers == 1 and loaded.config.hidden_size == 32 and loaded.config.dropout == 0.1
    assert summary["teacher_val_loss"] > 0 and 0 <= summary["val_accuracy"] <= 1
    train = [r for r in read_metrics(full_dir) if r["split"] == "train"]
    assert {"soft", "cosine", "teacher_agreement", "mlm_loss"} <= set(train[0])
    assert train[0]["teacher_agreement"] > 0.5  # the student starts as the teacher minus a layer
    losses = lambda d: [r["loss"] for r in read_metrics(d) if r["split"] == "train"]  # noqa: E731
    # resume: bit-exact, the teacher read again from distill.teacher
    interrupt_during_step(monkeypatch, DistillMLMTask, 8)
    cut_dir, cut = pretrain(student(tmp_path / "cut", teacher_dir))
    assert cut["stopped_by"] == "signal"
    monkeypatch.undo()
    resume(cut_dir)
    assert losses(cut_dir) == losses(full_dir)
    # the same teacher as a transformers BertForMaskedLM directory teaches the same student
    hf_dir = export_hf(teacher_dir, tmp_path / "hf")
    hf_run, _ = pretrain(student(tmp_path / "hf-student", hf_dir, "train.precision=fp32"))
    fp32_run, _ = pretrain(student(tmp_path / "fp32-student", teacher_dir, "train.precision=fp32"))
    torch.testing.assert_close(losses(hf_run), losses(fp32_run), rtol=1e-4, atol=1e-4)
    # the teacher trained further is another teacher: resuming the student with it is refused
    assert json.loads((cut_dir / "teacher.json").read_text())["teacher"] == str(teacher_dir.resolve())
    resume(teacher_dir, ["train.max_steps=22"])
    with pytest.raises(LmforgeError, match="has other weights than when"):
        resume(cut_dir, ["train.max_steps=14"])


def test_general_distillation_refuses_teachers_without_soft_targets(tiny_prepared, tmp_path):
    gpt_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "g", "model.arch=gpt", "task.name=clm",
                                      "train.max_steps=6"))
    electra_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "e", "task.name=electra", "train.max_steps=6"))
    mlm_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "m", "train.max_steps=6"))
    student = lambda teacher, *o: tiny_config(tiny_prepared, tmp_path / "s", "task.name=distill-mlm",  # noqa: E731
                                              f"distill.teacher={teacher}", *o)
    with pytest.raises(LmforgeError, match="not a BERT masked LM"):
        pretrain(student(gpt_dir))
    with pytest.raises(LmforgeError, match="no trained masked-LM head"):
        pretrain(student(electra_dir))
    with pytest.raises(LmforgeError, match="exceeds the teacher's 2 layers"):
        pretrain(student(mlm_dir, "distill.student_layers=3"))
    with pytest.raises(LmforgeError, match="is not the tokenizer of distill.teacher"):
        pretrain(student(mlm_dir, "data.tokenizer=gpt2"))
    with pytest.raises(LmforgeError, match="needs distill.teacher"):
        make_config(None, ["task.name=distill-mlm"])
    with pytest.raises(LmforgeError, match="distill.teacher is read by task.name=distill"):
        load_config(None, [f"distill.teacher={mlm_dir}"])  # a teacher without a distillation task is not ignored
    with pytest.raises(LmforgeError, match="data.long_seq_len=128 exceeds the 64 positions of distill.teacher"):
        pretrain(student(mlm_dir, "data.long_seq_len=128"))  # validation left the positions to the teacher
    with pytest.raises(LmforgeError, match="general distillation of a masked LM is task.name=distill-mlm"):
        pretrain(tiny_config(tiny_prepared, tmp_path / "x", "task.name=distill", f"distill.teacher={mlm_dir}"))
    assert not (tmp_path / "s").exists()  # nothing refused left a run directory


def test_a_transformers_sequence_classifier_teaches_with_its_labels_in_our_order(tiny_prepared, tiny_reviews,  # noqa: F811
                                                                                  tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.models.hf import hf_config_from_model
    from lmforge.runs.readers import load_hf_classifier

    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=tiny_prepared.tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=2,
                       intermediate_size=64, max_position_embeddings=64, dropout=0.0)
    hf_cfg = hf_config_from_model(mcfg, "BertForSequenceClassification")
    hf_cfg.update(num_labels=2, id2label={0: "POSITIVE", 1: "NEGATIVE"}, label2id={"POSITIVE": 0, "NEGATIVE": 1})
    ref = transformers.BertForSequenceClassification(transformers.BertConfig(**hf_cfg)).eval()
    hf_dir = tmp_path / "hf-classifier"
    ref.save_pretrained(hf_dir)
    tiny_prepared.tokenizer.save(hf_dir / "tokenizer.json")
    _, _, teacher, notes = load_hf_classifier(hf_dir, ("negative", "positive"))
    assert notes == []
    ids = torch.randint(5, mcfg.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask).logits
        out = teacher(ids, attention_mask=mask)
    ours = out.logits
    assert out.rating is None and out.cls.shape == (3, mcfg.hidden_size)
    torch.testing.assert_close(ours, theirs.flip(-1), rtol=1e-4, atol=1e-5)  # their POSITIVE is our column 1
    # distillation from it: the student is a Classifier from its top layer, classifier and embeddings
    run_dir, summary = finetune(_cfg(tiny_prepared, tmp_path / "s", tiny_reviews, "task.name=distill",
                                     f"distill.teacher={hf_dir}", "train.max_steps=4", "train.eval_every=4",
                                     "train.checkpoint_every=4", "model.dropout=0.1",
                                     "classify.wise_alpha=0.5"))  # as configs/mr-minilm.yaml has one: ignored
    cfg, _, student = load_classifier(run_dir)
    assert cfg.model.num_layers == 1 and cfg.model.dropout == 0.1 and student.rating is not None
    assert "wise_alpha" not in summary and not (run_dir / "start.safetensors").exists()
    assert 0 <= summary["test_accuracy"] <= 1
    with pytest.raises(LmforgeError, match="not a BertForSequenceClassification"):
        finetune(_cfg(tiny_prepared, tmp_path / "x", tiny_reviews, "task.name=distill",
                      f"distill.teacher={export_hf(run_dir, tmp_path / 'encoder')}"))
    with pytest.raises(LmforgeError, match="teaches with `lmforge finetune task.name=distill`"):
        pretrain(tiny_config(tiny_prepared, tmp_path / "y", "task.name=distill-mlm", f"distill.teacher={hf_dir}"))
    with pytest.raises(LmforgeError, match="neither an lmforge fine-tuning run"):
        finetune(_cfg(tiny_prepared, tmp_path / "x", tiny_reviews, "task.name=distill", f"distill.teacher={tmp_path}"))
