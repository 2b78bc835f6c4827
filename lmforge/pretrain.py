"""`lmforge pretrain`: from a config to a finished run directory.

config -> tokenizer -> prepared shards (cached) -> model -> task -> the loop -> summary and report.
`--resume` continues a run in its own directory. task.name=distill-mlm takes its tokenizer and its
student's shape and first weights from the teacher (`load_mlm_teacher`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from lmforge import distributed
from lmforge.config import (FINE_TUNING_TASKS, PRETRAINING_TASKS, Config, DataConfig, ModelConfig, dump_yaml,
                            load_config)
from lmforge.data.corpora import open_corpus
from lmforge.data.packages import cache_root, cached_item_lock
from lmforge.data.shards import PreparedData, prepared_or_prepare
from lmforge.data.tokenizers import TextTokenizer, load_tokenizer, train_bpe, train_wordpiece
from lmforge.errors import LmforgeError
from lmforge.eval.report import write_report
from lmforge.models.bert import BertForMaskedLM
from lmforge.models.loading import LoadedModel, is_hf_classifier_dir, load_model
from lmforge.models.loading import build_model as build_arch
from lmforge.tasks.base import Task
from lmforge.tasks.clm import CausalLMTask
from lmforge.tasks.distill import DistillMLMTask, check_teacher, mlm_student_from_teacher, record_teacher
from lmforge.tasks.electra import ElectraTask
from lmforge.tasks.mlm import MaskedLMTask
from lmforge.train.checkpoint import checkpoints_newest_first, load_model_weights
from lmforge.train.loop import check_global_batch, resolve_device, train, write_summary
from lmforge.train.machine import set_threads
from lmforge.train.run_dir import check_out_dir, create_run_dir, flatten

# Settings that may change when a run is resumed; everything else would make it another run.
RESUMABLE_OVERRIDES = ("train.max_steps", "train.max_time_s", "train.progress", "train.device",
                       "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                       # another world size or strategy, with the same global batch (checked)
                       "train.batch_size", "train.grad_accum_steps", "distributed.strategy",
                       "distributed.zero_stage", "distributed.offload_optimizer", "distributed.offload_param",
                       "distributed.deepspeed_config")


def prepared_data(cfg: Config, progress: bool = True) -> PreparedData:
    """The prepared shards for cfg.data, tokenizing the corpus first if no cache has them."""
    d = cfg.data
    if (Path(d.corpus) / "manifest.json").is_file():  # already a `lmforge prepare` output
        return PreparedData(d.corpus)
    corpus = open_corpus(d.corpus, d.cache_dir)
    root = cache_root(d.cache_dir)
    if d.train_tokenizer_vocab:
        tokenizer = trained_tokenizer(corpus, "bpe" if cfg.model.arch == "gpt" else "wordpiece",
                                      d.train_tokenizer_vocab, root)
    else:
        tokenizer = load_tokenizer(d.tokenizer, d.cache_dir)
    return prepared_or_prepare(corpus, tokenizer, root, val_frac=d.val_frac, split_seed=d.split_seed,
                               progress=progress)


def trained_tokenizer(corpus, kind: str, vocab_size: int, root: Path) -> TextTokenizer:
    """A tokenizer of `kind` (bpe | wordpiece) trained on `corpus`, cached under root/tokenizers
    (keyed by corpus identity, kind and size) so that it is trained once, also by processes
    started together (under the file's lock)."""
    key = hashlib.sha256(f"{corpus.identity}:{kind}:{vocab_size}".encode()).hexdigest()[:16]
    path = root / "tokenizers" / f"{kind}-{vocab_size}-{key}.json"
    if not path.is_file():
        with cached_item_lock(path, f"training a {kind} vocabulary on {corpus.name}"):
            if not path.is_file():  # again: another process may have just trained it
                print(f"lmforge: training a {vocab_size}-entry {kind} vocabulary on {corpus.name}")
                train = train_bpe if kind == "bpe" else train_wordpiece
                tok = train((text for _, text in corpus.documents()), vocab_size)
                tmp = path.with_name(f".{path.name}.tmp")
                tok.save(tmp)
                os.replace(tmp, path)
    tok = load_tokenizer(str(path))
    tok.name = f"{kind}-{vocab_size}"
    return tok


def fill_vocab_size(cfg: Config, tokenizer: TextTokenizer) -> Config:
    """vocab_size: null -> the tokenizer's; a set value must hold every token id."""
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise LmforgeError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                           f"{tokenizer.vocab_size} tokens; set model.vocab_size={tokenizer.vocab_size} or null")
    return cfg


def build_model(cfg: Config) -> torch.nn.Module:
    return build_arch(cfg.model, cfg.task)


def load_mlm_teacher(cfg: Config) -> LoadedModel:
    """task.name=distill-mlm: the teacher masked LM (an lmforge MLM run or a transformers BERT with
    its MLM head). The student takes the teacher's tokenizer (data.tokenizer is set to it) and its
    shape with task.student_layers layers (default half)."""
    k, d = cfg.task, cfg.data
    path = teacher_path(cfg)
    if d.train_tokenizer_vocab:
        raise LmforgeError("task.name=distill-mlm uses the teacher's tokenizer; drop data.train_tokenizer_vocab")
    if is_hf_classifier_dir(path):
        raise LmforgeError(f"task.teacher={k.teacher} is a fine-tuned classifier; it teaches with `lmforge finetune "
                           f"task.name=distill`, not general distillation of a masked LM")
    teacher = load_model(path, mlm_head_required=False)
    if not isinstance(teacher.model, BertForMaskedLM):
        raise LmforgeError(f"task.teacher={k.teacher} is not a BERT masked LM (a GPT); general distillation "
                           f"needs a masked-LM teacher: an lmforge MLM run or a transformers BertForMaskedLM")
    if teacher.fresh_mlm_head:
        raise LmforgeError(f"task.teacher={k.teacher} has no trained masked-LM head (an encoder only, or an "
                           f"ELECTRA discriminator): there are no soft targets to learn from; give an MLM run or a "
                           f"transformers BertForMaskedLM")
    spec = str(path / "tokenizer.json") if (path / "config.yaml").is_file() else str(path)
    if d.tokenizer not in (spec, DataConfig().tokenizer):
        given = load_tokenizer(d.tokenizer, d.cache_dir)
        if given.sha256 != teacher.tokenizer.sha256:
            raise LmforgeError(f"data.tokenizer={d.tokenizer} is not the tokenizer of task.teacher={k.teacher}; "
                               f"drop data.tokenizer: the student reads the teacher's tokens")
    d.tokenizer = spec
    cfg.model = student_config(cfg, teacher.config, next_sentence_head=False)
    return teacher


def teacher_path(cfg: Config) -> Path:
    """Distillation: task.teacher as an absolute path, saved so in the config (a resume from
    elsewhere finds it); model.init_from is refused, the student starts from the teacher."""
    if cfg.model.init_from is not None:
        raise LmforgeError(f"task.name={cfg.task.name} starts the student from the teacher's own layers; drop "
                           f"model.init_from (set it to null)")
    path = Path(cfg.task.teacher).expanduser().resolve()
    cfg.task.teacher = str(path)
    return path


def student_config(cfg: Config, teacher: ModelConfig, **fixed) -> ModelConfig:
    """Distillation: the student's shape, the teacher's with task.student_layers layers (default
    half; set in cfg) and the config's dropout. The sequence lengths are checked against the
    teacher's positions here (config validation left them to this)."""
    positions = teacher.max_position_embeddings
    for key, value in (("data.seq_len", cfg.data.seq_len), ("data.long_seq_len", cfg.data.long_seq_len)):
        if value is not None and value > positions:
            raise LmforgeError(f"{key}={value} exceeds the {positions} positions of task.teacher={cfg.task.teacher}; "
                               f"set {key}={positions} or lower")
    layers = cfg.task.student_layers or max(1, teacher.num_layers // 2)
    if layers > teacher.num_layers:
        raise LmforgeError(f"task.student_layers={layers} exceeds the teacher's {teacher.num_layers} layers")
    cfg.task.student_layers = layers
    return dataclasses.replace(teacher, num_layers=layers, dropout=cfg.model.dropout, init_from=None, reinit_layers=0,
                               **fixed)


def build_task(cfg: Config, data: PreparedData, model: torch.nn.Module,
               teacher: Optional[BertForMaskedLM] = None) -> Task:
    if cfg.task.name == "distill-mlm":
        if teacher is None:
            raise ValueError("task.name=distill-mlm needs its teacher (load_mlm_teacher, or read again on resume)")
        return DistillMLMTask(cfg, data, model, teacher=teacher)
    if cfg.task.name == "clm":
        return CausalLMTask(cfg, data, model)
    if cfg.task.name == "mlm":
        return MaskedLMTask(cfg, data, model)
    if cfg.task.name == "electra":
        return ElectraTask(cfg, data, model)
    raise LmforgeError(f"task.name={cfg.task.name!r} is not a pretraining task ({', '.join(PRETRAINING_TASKS)}); "
                       f"use `lmforge finetune` for classify")


def pretrain(cfg: Config) -> tuple[Path, dict]:
    """Run a new pretraining job. Returns (run directory, summary)."""
    if cfg.task.name not in PRETRAINING_TASKS:
        hint = ("task-specific distillation (a classifier teacher) is `lmforge finetune`; general distillation "
                "of a masked LM is task.name=distill-mlm" if cfg.task.name == "distill" else
                "use `lmforge finetune` for classify")
        raise LmforgeError(f"`lmforge pretrain` runs task.name={', '.join(PRETRAINING_TASKS)}, not "
                           f"{cfg.task.name!r}; {hint}")
    check_out_dir(cfg.out_dir)
    set_threads(cfg.train.num_threads)
    par, device = distributed.setup(resolve_device(cfg.train.device), timeout_s=cfg.distributed.timeout_s)
    teacher = load_mlm_teacher(cfg) if cfg.task.name == "distill-mlm" else None  # sets tokenizer and shape
    # Every rank, no collective: the first to take the cache's file lock tokenizes the corpus (and
    # shows the progress bar), the others wait on the lock, then read it (a collective here would
    # time out on a large corpus).
    data = prepared_data(cfg, progress=cfg.train.progress)
    if teacher is not None and data.tokenizer.sha256 != teacher.tokenizer.sha256:
        raise LmforgeError(f"the prepared data {data.folder} was tokenized with another tokenizer than the teacher "
                           f"{cfg.task.teacher}'s; give the corpus itself (data.corpus), not prepared shards")
    cfg = fill_vocab_size(cfg, data.tokenizer)
    torch.manual_seed(cfg.train.seed)  # model initialisation
    model = build_model(cfg) if teacher is None else mlm_student_from_teacher(teacher.model, cfg.model)
    # before the run directory: a task that cannot start leaves none
    task = build_task(cfg, data, model, teacher.model if teacher else None)
    run_dir = Path(par.broadcast(str(create_run_dir(cfg, cfg.task.name)) if par.main else None))
    if par.main:
        data.tokenizer.save(run_dir / "tokenizer.json")
        if teacher is not None:
            record_teacher(run_dir, cfg.task.teacher, teacher.model)
        info = {"prepared": str(data.folder), "tokenizer_sha256": data.tokenizer.sha256, **data.manifest["splits"]}
        (run_dir / "data.json").write_text(json.dumps(info, indent=2) + "\n")
        print(f"lmforge: run directory {run_dir}")
        print(f"lmforge: {sum(p.numel() for p in model.parameters()):,} parameters, data {data.folder}, "
              f"device {device}" + (f", {par.world} processes ({cfg.distributed.strategy}); global batch "
                                    f"{cfg.train.batch_size} x {cfg.train.grad_accum_steps} x {par.world} = "
                                    f"{cfg.train.batch_size * cfg.train.grad_accum_steps * par.world} sequences"
                                    if par.world > 1 else ""))
    return run_dir, run_task(cfg, task, run_dir, device, resume=False)


def resume(run_dir: Path, overrides: Optional[list[str]] = None) -> tuple[Path, dict]:
    """Continue a run from its latest checkpoint, in the same directory."""
    run_dir = Path(run_dir)
    cfg, device = resume_config(run_dir, overrides, fine_tuning=False)
    recorded = json.loads((run_dir / "data.json").read_text())["prepared"] if (run_dir / "data.json").is_file() else None
    if recorded and (Path(recorded) / "manifest.json").is_file():
        data = PreparedData(recorded)  # the very shards the run started on
    else:
        data = prepared_data(cfg, progress=cfg.train.progress)  # deterministic: re-made identically
    if data.tokenizer.sha256 != load_tokenizer(str(run_dir / "tokenizer.json")).sha256:
        raise LmforgeError(f"the prepared data {data.folder} uses another tokenizer than {run_dir}; cannot resume")
    teacher = None
    if cfg.task.name == "distill-mlm":  # read again, and it must be the same teacher
        teacher = load_model(Path(cfg.task.teacher), mlm_head_required=False).model
        check_teacher(run_dir, cfg.task.teacher, teacher)
    task = build_task(cfg, data, build_model(cfg), teacher)
    save_overrides(run_dir, cfg, overrides)
    return run_dir, run_task(cfg, task, run_dir, device, resume=True)


def resume_config(run_dir: Path, overrides: Optional[list[str]], fine_tuning: bool) -> tuple[Config, torch.device]:
    """The run's config with the allowed overrides applied, and the device, after every check that
    can refuse the resume. Nothing is written: `save_overrides` does that once nothing can refuse,
    so a refused resume leaves the run directory exactly as it was."""
    if not (run_dir / "config.yaml").is_file():
        raise LmforgeError(f"{run_dir} is not an lmforge run directory (no config.yaml)")
    for text in overrides or []:
        key = text.split("=", 1)[0].strip()
        if key not in RESUMABLE_OVERRIDES:
            raise LmforgeError(f"'{key}' cannot change when resuming (it would be a different run); "
                               f"allowed: {', '.join(RESUMABLE_OVERRIDES)}")
    cfg = load_config(run_dir / "config.yaml", overrides)
    if fine_tuning and cfg.task.name not in FINE_TUNING_TASKS:
        raise LmforgeError(f"{run_dir} is a pretraining run; continue it with `lmforge pretrain --resume`")
    if not fine_tuning and cfg.task.name in FINE_TUNING_TASKS:
        raise LmforgeError(f"{run_dir} is a fine-tuning run; continue it with `lmforge finetune --resume`")
    _check_model_unchanged(run_dir, cfg)
    _check_steps_left(run_dir, cfg)
    set_threads(cfg.train.num_threads)
    par, device = distributed.setup(resolve_device(cfg.train.device),  # joins torchrun's ranks, if any
                                    timeout_s=cfg.distributed.timeout_s)
    _check_global_batch(run_dir, cfg, par.world)
    return cfg, device


def _check_model_unchanged(run_dir: Path, cfg: Config) -> None:
    """config.yaml's model section must be the one the run started with (hparams.json is written
    once, at the start): the checkpoints only load into that model."""
    path = run_dir / "hparams.json"
    if not path.is_file():
        return
    started = json.loads(path.read_text())
    for key, value in flatten({"model": dataclasses.asdict(cfg.model)}).items():
        if key in started and started[key] != value:
            raise LmforgeError(f"{key}={value} in {run_dir / 'config.yaml'} differs from the {started[key]} the run "
                               f"started with; the model cannot change when resuming: restore {key}="
                               f"{started[key]}, or start a new run")


def _check_steps_left(run_dir: Path, cfg: Config) -> None:
    """Refuse a run with no checkpoint or with no steps left here, before train.max_steps=N is
    saved (the loop checks the same when it loads the checkpoint, after the overrides would be)."""
    newest = checkpoints_newest_first(run_dir / "checkpoints")
    if not newest:
        raise LmforgeError(f"{run_dir} has no usable checkpoint to resume from (it stopped before its first "
                           f"checkpoint was written); start the run again")
    try:
        step = json.loads((newest[0] / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # damaged: the loop falls back to an older checkpoint and says so
    # at max_steps without summary.json: killed before its final reports; the loop writes them
    if isinstance(step, int) and step >= cfg.train.max_steps and (run_dir / "summary.json").is_file():
        raise LmforgeError(f"{run_dir} already finished at step {step} (train.max_steps={cfg.train.max_steps}); "
                           f"to train longer, resume with a larger train.max_steps=N")


def _check_global_batch(run_dir: Path, cfg: Config, world: int) -> None:
    """The loop's check (train/loop.py check_global_batch) before anything is written; a damaged
    newest checkpoint is left to the loop, which falls back to an older one and checks that."""
    newest = checkpoints_newest_first(run_dir / "checkpoints")
    try:
        trained = json.loads((newest[0] / "state.json").read_text()).get("global_batch") if newest else None
    except (OSError, ValueError, AttributeError):
        return
    check_global_batch(run_dir, trained, cfg, world)


def save_overrides(run_dir: Path, cfg: Config, overrides: Optional[list[str]]) -> None:
    """Write the resumed config (with its new train.* settings) back, so the next resume sees them."""
    if overrides and distributed.current().main:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))


def run_task(cfg: Config, task: Task, run_dir: Path, device: torch.device, resume: bool,
             build: Optional[Callable[[], torch.nn.Module]] = None) -> dict:
    """The loop, then the task's final reports, summary.json and report.png. Returns the summary.
    `build` makes a fresh model like task.model: with sharded parameters (fsdp, deepspeed), rank 0
    loads the final checkpoint into one for the reports."""
    result = train(cfg, task, run_dir, device, resume=resume)
    par = distributed.current()
    if not par.main:  # rank 0 writes the reports
        par.barrier()
        return {}
    model = task.model
    if par.world > 1 and cfg.distributed.strategy != "ddp":  # sharded: rank 0 reports on the whole model
        model = (build or (lambda: build_model(cfg)))().to(device)
        model.load_state_dict(load_model_weights(run_dir / "checkpoints", run_dir))
    extra = task.finish(model, run_dir, device)
    write_report(run_dir)
    summary = write_summary(run_dir, task, result, extra)  # last: its presence marks a finished run
    par.barrier()
    return summary
