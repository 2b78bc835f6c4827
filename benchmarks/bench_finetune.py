"""Fine-tuning speed (examples/s): `lmforge finetune` against transformers' BertForSequenceClassification.

Both start from the same weights (the bundled MiniLM-L6-H384 encoder; lmforge's seeded polarity
head is copied into transformers' classifier), train on the same movie-review examples with the
same optimizer (fused AdamW, two parameter groups, lr 5e-5), gradient clipping at 1.0 (both
tools' default), batch 32, dynamic padding to the longest member with at most 64 tokens, and
dropout 0.1 as in MiniLM's config. Variants:
  lmforge         what `lmforge finetune` runs: Classifier (polarity + rating heads) with
                  ClassifyTask's batches (length-bucketed: seeded shuffle, chunks of 50 batches
                  sorted by length), its collate and its loss
  hf              BertForSequenceClassification (its default attention, sdpa), batches in random
                  order collated by DataCollatorWithPadding: what Trainer does by default
  lmforge-random  lmforge's model, collate and loss on hf's random batches (model speed alone)
  hf-grouped      transformers on lmforge's length-bucketed batches (like Trainer's group_by_length)
Every variant processes the same example set each round: the first --batches-per-round batches
of ClassifyTask's first epoch (lmforge, hf-grouped), the same examples reshuffled into random
batches (hf, lmforge-random). Rounds are interleaved (A B C D A B C D ...) and examples/s is the
round's examples over the median round time; collation is inside the timed step for every variant.

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode records every matmul
and attention kernel of the first (warm-up) round, forward and backward, at the padded shapes
really run; MFU is those FLOPs per second over the fp32 matmul peak measured in this run.
"peak RSS MB" is the resident memory the variant's model build, optimizer and warm-up round
added (sampled every 2 ms). "padding" is the share of the round's input positions that are pads.

    python benchmarks/bench_finetune.py                  # MiniLM-L6-H384, batch 32, <= 64 tokens
    python benchmarks/bench_finetune.py --smoke --json   # seconds; what CI runs to keep this working
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

import common
from lmforge.config import load_config
from lmforge.data.sentiment import LABELS, load_labeled, stratified_split
from lmforge.data.tokenizers import minilm_model_dir
from lmforge.models.classifier import Classifier
from lmforge.tasks.classify import ClassifyTask, init_source

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("lmforge", "hf", "lmforge-random", "hf-grouped")


def lmforge_setup(args):
    """(config, tokenizer, encoder tensors, ClassifyTask without a model): what finetune() builds."""
    overrides = [f"data.seq_len={args.max_len}", f"train.batch_size={args.batch}", f"model.dropout={args.dropout}"]
    cfg = load_config(ROOT / "configs" / "mr-minilm.yaml", overrides)
    data = load_labeled(cfg.data.dataset, cfg.data.cache_dir)
    split = stratified_split([e.label for e in data.examples], cfg.data.split_seed)
    tokenizer, encoder = init_source(cfg)
    task = ClassifyTask(cfg, data, split, tokenizer, model=None)
    return cfg, tokenizer, encoder, task, data


def lmforge_model(cfg, encoder, rating_range, layers: int) -> Classifier:
    torch.manual_seed(cfg.train.seed)
    model = Classifier(cfg.model, len(LABELS), rating_range)
    model.load_state_dict(encoder, strict=False)
    model.bert.layers = model.bert.layers[:layers]
    return model.train()


def hf_model(polarity: torch.nn.Linear, layers: int, dropout: float):
    """BertForSequenceClassification from the MiniLM directory, with lmforge's polarity head."""
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(
        minilm_model_dir(), num_labels=len(LABELS), hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    model.bert.encoder.layer = model.bert.encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    with torch.no_grad():
        model.classifier.weight.copy_(polarity.weight)
        model.classifier.bias.copy_(polarity.bias)
    return model.train()


class Variant:
    """A model + optimizer + the batches of one round. Built inside PeakRSS together with its
    FLOP-counted warm-up round."""

    def __init__(self, name, build, step, batches):
        self.name, self.step_fn, self.batches = name, step, batches
        self.seconds: list[float] = []
        with common.PeakRSS() as mem:
            self.model = build()
            self.opt = common.fused_adamw(self.model, lr=5e-5)
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.flops_per_round = common.count_flops(self.round)
        self.peak_rss_mb = mem.added_mb

    def round(self):
        for b in self.batches:
            loss = self.step_fn(self.model, b)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.last_loss = float(loss.detach())


def main(argv=None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--batch", type=int, default=32, help="examples per step (default 32)")
    p.add_argument("--max-len", type=int, default=64, help="at most this many tokens per example, [CLS]/[SEP] included")
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout (MiniLM's config: 0.1)")
    p.add_argument("--layers", type=int, default=6, help="encoder layers kept of MiniLM's 6 (default all)")
    p.add_argument("--batches-per-round", type=int, default=8, help="steps of each variant per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (interleaved; median reported)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    common.check_choices(p, args.variants, VARIANTS, "variant")
    if args.smoke:
        args.batch, args.max_len, args.layers, args.batches_per_round, args.rounds = 4, 32, 1, 2, 2
    common.setup(args)
    import transformers

    cfg, tokenizer, encoder, task, data = lmforge_setup(args)
    k, b = args.batches_per_round, args.batch
    grouped = [task._examples_of_step(s) for s in range(k)]  # exactly what `lmforge finetune` trains on first
    examples = [i for batch in grouped for i in batch]
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    random_batches = [shuffled[s:s + b] for s in range(0, len(shuffled), b)]

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_model_dir())
    collator = transformers.DataCollatorWithPadding(hf_tokenizer)

    def hf_features(indices):  # what a tokenized `datasets` split holds for Trainer
        return [{"input_ids": task.ids[i], "token_type_ids": [0] * len(task.ids[i]),
                 "attention_mask": [1] * len(task.ids[i]), "labels": int(task.labels[i])} for i in indices]

    def lmforge_step(model, indices):
        batch = task.collate(indices)
        return task.loss(model, batch).loss_sum / batch.num_targets  # as the loop divides it

    def hf_step(model, features):
        return model(**collator(features)).loss

    polarity = lmforge_model(cfg, encoder, data.rating_range, args.layers).polarity  # hf gets a copy

    def build_lmforge():
        return lmforge_model(cfg, encoder, data.rating_range, args.layers)

    def build_hf():
        return hf_model(polarity, args.layers, args.dropout)

    specs = {"lmforge": (build_lmforge, lmforge_step, grouped),
             "hf": (build_hf, hf_step, [hf_features(x) for x in random_batches]),
             "lmforge-random": (build_lmforge, lmforge_step, random_batches),
             "hf-grouped": (build_hf, hf_step, [hf_features(x) for x in grouped])}
    padded = {"lmforge": grouped, "hf": random_batches, "lmforge-random": random_batches, "hf-grouped": grouped}
    peak = common.matmul_peak_flops(n=512 if args.smoke else 2048, reps=2 if args.smoke else 10)
    names = args.variants.split(",")
    variants = [Variant(n, *specs[n]) for n in names]
    common.interleave(variants, args.rounds, lambda v, r: v.round())

    real_tokens = sum(len(task.ids[i]) for i in examples)
    results = []
    for v in variants:
        positions = sum(len(x) * max(len(task.ids[i]) for i in x) for x in padded[v.name])
        results.append({**common.examples_row(v, len(examples), "round", v.flops_per_round, peak),
                        "padding": 1 - real_tokens / positions, "final_loss": v.last_loss})
    common.add_lmforge_speedups(results)
    report = {"benchmark": "finetune-classify", "config": vars(args), "examples_per_round": len(examples),
              **common.environment(peak), "results": results}
    title = (f"Fine-tuning MiniLM-L{args.layers}-H384 on movie reviews: batch {b}, <= {args.max_len} tokens, "
             f"dropout {args.dropout}, fused AdamW, fp32, {torch.get_num_threads()} threads; {len(examples)} examples "
             f"x {args.rounds} rounds; matmul peak {peak / 1e9:.0f} GFLOP/s")
    columns = [("variant", "variant", "s"), ("examples_per_s", "examples/s", ",.1f"),
               ("lmforge_speedup_over_this", "lmforge x", ".2f"), ("mfu", "MFU", ".1%"),
               ("peak_rss_mb", "peak RSS MB", ",.0f"), ("padding", "padding", ".1%"),
               ("gflops_per_round", "GFLOP/round", ",.0f")]
    common.print_report(report, title, columns, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
