"""`lmforge finetune`: from a config to a fine-tuned classifier run directory.

labelled data -> seeded stratified split (saved in the run) -> tokenizer and encoder from
model.init_from (the bundled MiniLM, an lmforge run, a Hugging Face directory) or random ->
BertClassifier -> ClassifyTask -> the same loop as pretraining -> test-split report.
`load_classifier` is the way back from a run directory, for `lmforge classify`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch

from lmforge import distributed
from lmforge.config import FINE_TUNING_TASKS, Config, DataConfig, load_config
from lmforge.data.sentiment import LABELS, LabeledData, load_labeled, stratified_split, stratified_subset
from lmforge.data.tokenizers import TextTokenizer, load_tokenizer, minilm_model_dir
from lmforge.errors import LmforgeError
from lmforge.models.bert import init_bert_weights
from lmforge.models.classifier import BertClassifier
from lmforge.models.hf import is_hf_dir
from lmforge.models.loading import (check_tokenizer_fits, is_hf_classifier_dir, load_checkpoint_weights,
                                    load_hf_classifier, load_model, load_run_tokenizer, run_weights)
from lmforge.pretrain import (fill_vocab_size, resume_config, run_task, save_overrides, student_config,
                             teacher_path)
from lmforge.tasks.classify import ClassifyTask
from lmforge.tasks.distill import DistillClassifyTask, check_teacher, record_teacher, student_from_teacher
from lmforge.train.loop import resolve_device
from lmforge.train.machine import set_threads
from lmforge.train.run_dir import check_out_dir, create_run_dir

BUNDLED_MODELS = {"minilm": minilm_model_dir}  # names model.init_from accepts besides paths


def _init_source(cfg: Config) -> tuple[TextTokenizer, Optional[dict[str, torch.Tensor]]]:
    """Tokenizer and encoder tensors (`bert.*`) to start from; fills cfg.model's shape from the source."""
    spec = cfg.model.init_from
    if spec is None:
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.cache_dir)
        fill_vocab_size(cfg, tokenizer)
        return tokenizer, None
    path = BUNDLED_MODELS[spec](cfg.data.cache_dir) if spec in BUNDLED_MODELS else Path(spec).expanduser()
    loaded = load_model(path, mlm_head_required=False)
    if loaded.config.arch != "bert":
        raise LmforgeError(f"model.init_from={spec} is a {loaded.config.arch} model; a classifier is fine-tuned "
                           f"from a BERT encoder (an MLM or ELECTRA run, minilm, or a transformers BERT)")
    if cfg.data.tokenizer != DataConfig().tokenizer:  # set on purpose: it must be the source's own
        given = load_tokenizer(cfg.data.tokenizer, cfg.data.cache_dir)
        if given.tok.get_vocab(with_added_tokens=True) != loaded.tokenizer.tok.get_vocab(with_added_tokens=True):
            raise LmforgeError(f"data.tokenizer={cfg.data.tokenizer} ({given.vocab_size} tokens) does not match the "
                               f"tokenizer of model.init_from={spec} ({loaded.tokenizer.vocab_size} tokens); drop "
                               f"data.tokenizer: a model is fine-tuned with the tokenizer it was trained with")
    src = loaded.config
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "layer_norm_eps"):
        setattr(cfg.model, key, getattr(src, key))
    if cfg.data.seq_len > src.max_position_embeddings:
        raise LmforgeError(f"data.seq_len={cfg.data.seq_len} exceeds the {src.max_position_embeddings} positions "
                           f"of {spec}; set data.seq_len={src.max_position_embeddings} or lower")
    encoder = {k: v for k, v in loaded.model.state_dict().items() if k.startswith("bert.")}
    return loaded.tokenizer, encoder


def _read_teacher(spec: str) -> tuple[Optional[Config], TextTokenizer, torch.nn.Module]:
    """(its run's config, or None for a transformers directory; tokenizer; classifier in eval mode)."""
    path = Path(spec).expanduser()
    if is_hf_classifier_dir(path):
        _, tokenizer, teacher, notes = load_hf_classifier(path, LABELS)
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        return None, tokenizer, teacher
    if is_hf_dir(path):
        raise LmforgeError(f"task.teacher={spec} is a transformers directory but not a BertForSequenceClassification; "
                           f"task.name=distill learns from a fine-tuned classifier (general distillation of a "
                           f"masked LM is `lmforge pretrain task.name=distill-mlm`)")
    if not (path / "dataset.json").is_file():
        raise LmforgeError(f"task.teacher={spec} is neither an lmforge fine-tuning run (no dataset.json) nor a "
                           f"transformers BertForSequenceClassification directory")
    return load_classifier(path)


def load_teacher(cfg: Config) -> tuple[TextTokenizer, torch.nn.Module]:
    """task.name=distill: the teacher classifier (an lmforge fine-tuning run or a transformers
    BertForSequenceClassification directory) and its tokenizer. The student takes the teacher's
    shape with task.student_layers layers (default half). From an lmforge teacher it also takes the
    dataset, split and sequence length (its test split must be the teacher's, never seen in
    training by either); a transformers teacher brings none, so the config's are used."""
    t_cfg, tokenizer, teacher = _read_teacher(str(teacher_path(cfg)))
    if t_cfg is not None:
        if cfg.data.dataset not in (t_cfg.data.dataset, DataConfig().dataset):
            raise LmforgeError(f"data.dataset={cfg.data.dataset} differs from the teacher's ({t_cfg.data.dataset}); "
                               f"the student learns on the teacher's task: drop data.dataset")
        cfg.data.dataset, cfg.data.split_seed, cfg.data.seq_len = (t_cfg.data.dataset, t_cfg.data.split_seed,
                                                                   t_cfg.data.seq_len)
    cfg.model = student_config(cfg, teacher.cfg)
    return tokenizer, teacher


def make_task(cfg: Config, data: LabeledData, split: dict, tokenizer: TextTokenizer, model: BertClassifier,
              teacher: Optional[torch.nn.Module] = None) -> ClassifyTask:
    if cfg.task.name == "distill":
        if teacher is None:
            raise ValueError("task.name=distill needs its teacher (load_teacher, or read again on resume)")
        return DistillClassifyTask(cfg, data, split, tokenizer, model, teacher=teacher)
    return ClassifyTask(cfg, data, split, tokenizer, model)


def reinit_top_layers(model: BertClassifier, cfg: Config) -> None:
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
    for layer in model.bert.layers[-k:]:
        layer.apply(lambda module: init_bert_weights(module, cfg.model.init_std))


def _split(cfg: Config, data: LabeledData) -> dict[str, list[int]]:
    labels = [e.label for e in data.examples]
    split = stratified_split(labels, cfg.data.split_seed)
    if cfg.data.train_examples is not None:  # few-sample fine-tuning: a stratified part of the train split
        split["train"] = stratified_subset(split["train"], labels, cfg.data.train_examples, cfg.data.split_seed)
    for name, idx in split.items():
        if not idx:
            raise LmforgeError(f"dataset {data.name} is too small: its {name} split is empty")
    return split


def finetune(cfg: Config) -> tuple[Path, dict]:
    """Run a new fine-tuning job. Returns (run directory, summary)."""
    if cfg.task.name not in FINE_TUNING_TASKS:
        raise LmforgeError(f"`lmforge finetune` trains task.name=classify (or distill), not {cfg.task.name!r}; "
                           f"use configs/mr-minilm.yaml or set task.name=classify")
    check_out_dir(cfg.out_dir)
    set_threads(cfg.train.num_threads)
    par, device = distributed.setup(resolve_device(cfg.train.device), timeout_s=cfg.distributed.timeout_s)
    teacher = load_teacher(cfg) if cfg.task.name == "distill" else None  # sets the student's data and shape
    data = load_labeled(cfg.data.dataset, cfg.data.cache_dir)  # every rank; the cache's file lock fetches once
    split = _split(cfg, data)
    torch.manual_seed(cfg.train.seed)  # head (and, without init_from, encoder) initialisation
    if teacher is not None:  # the student starts as every other layer of the teacher
        tokenizer, model = teacher[0], student_from_teacher(teacher[1], cfg.model, data.rating_range)
    else:
        tokenizer, encoder = _init_source(cfg)
        model = BertClassifier(cfg.model, len(LABELS), data.rating_range)
        if encoder is not None:
            missing, unexpected = model.load_state_dict(encoder, strict=False)
            lacking = [k for k in missing if k.startswith("bert.")]
            if unexpected or lacking:
                raise LmforgeError(f"model.init_from={cfg.model.init_from} is not a whole BERT encoder for this "
                                   f"classifier ({', '.join((unexpected + lacking)[:4])} do not fit); start from "
                                   f"a BERT run, minilm or a transformers BERT directory")
        reinit_top_layers(model, cfg)
    # before the run directory: a task that fails to start leaves none
    task = make_task(cfg, data, split, tokenizer, model, teacher[1] if teacher else None)
    run_dir = Path(par.broadcast(str(create_run_dir(cfg, cfg.task.name)) if par.main else None))
    if par.main:
        _describe_run(cfg, run_dir, data, split, tokenizer, task, model, device, par)
        if teacher is not None:
            record_teacher(run_dir, cfg.task.teacher, teacher[1])
    return run_dir, run_task(cfg, task, run_dir, device, resume=False,
                             build=lambda: BertClassifier(cfg.model, len(LABELS), data.rating_range))


def _describe_run(cfg, run_dir, data, split, tokenizer, task, model, device, par) -> None:
    """Rank 0: the run's tokenizer, dataset identity and split, and what it will train."""
    tokenizer.save(run_dir / "tokenizer.json")
    (run_dir / "dataset.json").write_text(json.dumps({
        "dataset": data.name, "identity": data.identity, "examples": len(data.examples), "labels": list(LABELS),
        "rating_range": data.rating_range, "split_seed": cfg.data.split_seed, "tokenizer_sha256": tokenizer.sha256,
        "split": {k: len(v) for k, v in split.items()}}, indent=2) + "\n")
    (run_dir / "split.json").write_text(json.dumps(split) + "\n")
    init = (f"every other layer of {cfg.task.teacher}" if cfg.task.name == "distill"
            else cfg.model.init_from or "random")
    print(f"lmforge: run directory {run_dir}")
    print(f"lmforge: {data.name}: {len(split['train']):,} train / {len(split['validation']):,} validation / "
          f"{len(split['test']):,} test examples; {sum(p.numel() for p in model.parameters()):,} parameters "
          f"(init: {init}); device {device}"
          + (f", {par.world} processes ({cfg.distributed.strategy}); global batch {cfg.train.batch_size} x "
             f"{cfg.train.grad_accum_steps} x {par.world} = "
             f"{cfg.train.batch_size * cfg.train.grad_accum_steps * par.world} examples" if par.world > 1 else ""))
    if task.truncated:
        print(f"warning: {task.truncated} examples are longer than data.seq_len={cfg.data.seq_len} and were "
              f"truncated", file=sys.stderr)


def resume_finetune(run_dir: Path, overrides: Optional[list[str]] = None) -> tuple[Path, dict]:
    """Continue a fine-tuning run from its latest checkpoint, in the same directory."""
    cfg, device = resume_config(run_dir, overrides, fine_tuning=True)
    data = load_labeled(cfg.data.dataset, cfg.data.cache_dir)
    recorded = json.loads((run_dir / "dataset.json").read_text())
    if recorded["identity"] != data.identity:
        raise LmforgeError(f"dataset {cfg.data.dataset} changed since {run_dir} started; cannot resume")
    split = json.loads((run_dir / "split.json").read_text())
    tokenizer = load_tokenizer(str(run_dir / "tokenizer.json"))
    teacher = None
    if cfg.task.name == "distill":  # read again, and it must be the same teacher
        teacher = _read_teacher(cfg.task.teacher)[2]
        check_teacher(run_dir, cfg.task.teacher, teacher)
    task = make_task(cfg, data, split, tokenizer, BertClassifier(cfg.model, len(LABELS), data.rating_range), teacher)
    save_overrides(run_dir, cfg, overrides)
    return run_dir, run_task(cfg, task, run_dir, device, resume=True,
                             build=lambda: BertClassifier(cfg.model, len(LABELS), data.rating_range))


def load_classifier(run_dir: str | Path) -> tuple[Config, TextTokenizer, BertClassifier]:
    """(config, tokenizer, classifier with the latest weights, in eval mode) of a finetune run."""
    run_dir = Path(run_dir)
    if not (run_dir / "dataset.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise LmforgeError(f"{run_dir} is not an lmforge fine-tuning run directory (no dataset.json); give a run "
                           f"made by `lmforge finetune`")
    cfg = load_config(run_dir / "config.yaml")
    try:
        info = json.loads((run_dir / "dataset.json").read_text())
        rating_range = tuple(info["rating_range"]) if info["rating_range"] else None
        num_labels = len(info["labels"])
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not what `finetune` writes
        raise LmforgeError(f"{run_dir / 'dataset.json'} is damaged ({type(e).__name__}: {e}); it is written by "
                           f"`lmforge finetune` when the run starts") from None
    weights = run_weights(run_dir)  # first: a run without a checkpoint may not have its shape filled in yet
    model = BertClassifier(cfg.model, num_labels, rating_range)
    load_checkpoint_weights(model, weights, run_dir)
    tokenizer = load_run_tokenizer(run_dir, "dataset.json")
    check_tokenizer_fits(tokenizer, cfg.model, run_dir / "tokenizer.json")
    return cfg, tokenizer, model.eval()
