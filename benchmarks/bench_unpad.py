"""What ModernBERT's unpadding saves in fine-tuning: `model.unpad` on against off, side by side.

One ModernBERT classifier (lmforge's Classifier over models/modernbert.py, MiniLM's shape by
default: L6 H384 A12 FFN 1536, dropout 0 as ModernBERT ships), fine-tuned on movie-review
batches as `lmforge finetune` builds them (configs/mr-scratch.yaml's data, tokenizer and
128-token cut, ClassifyTask's collate and loss), with fused AdamW and gradient clipping at 1.0.
Variants, each built from the same seeded weights:
  unpad            model.unpad=true (the default): per-token work (projections, MLP, norms)
                   runs on the real tokens only, attention on the padded layout
  padded           model.unpad=false: the same masks, every position computed
each on two batch orders:
  bucketed         ClassifyTask's own first batches (chunks of 50 batches sorted by length):
                   what `lmforge finetune` trains on, little padding left to skip
  random           the same examples in random batches: what a plain DataLoader gives
Rounds are interleaved (one round of every variant in turn), examples/s is the round's examples
over the median round time. "padding" is the share of the round's input positions that are pads.
"max |loss diff|" is the largest difference between a variant's losses and its unpadded twin's
on the same batches, step by step: unpadding must change the speed, never the numbers.

    python benchmarks/bench_unpad.py                   # L6 H384, batch 32, <= 128 tokens
    python benchmarks/bench_unpad.py --layers 2 --hidden 128 --heads 2 --ffn 384   # modernbert-tiny's shape
    python benchmarks/bench_unpad.py --smoke --json    # seconds; what CI runs to keep this working
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

import common
from lmforge.config import load_config
from lmforge.data.sentiment import LABELS, load_labeled, stratified_split
from lmforge.models.classifier import Classifier
from lmforge.tasks.classify import ClassifyTask, init_source

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("unpad-bucketed", "padded-bucketed", "unpad-random", "padded-random")


class Variant:
    """A classifier + optimizer + the batches of one round, built inside PeakRSS."""

    def __init__(self, name: str, cfg, task: ClassifyTask, num_labels: int, rating_range, batches):
        self.name, self.task, self.batches = name, task, batches
        self.seconds: list[float] = []
        self.losses: list[float] = []
        with common.PeakRSS() as mem:
            torch.manual_seed(cfg.train.seed)  # the same weights for every variant
            self.model = Classifier(cfg.model, num_labels, rating_range).train()
            self.opt = common.fused_adamw(self.model, lr=cfg.optim.lr)
            self.round()  # warm-up (its losses are the ones compared)
        self.peak_rss_mb = mem.added_mb

    def round(self) -> None:
        for indices in self.batches:
            batch = self.task.collate(indices)
            loss = self.task.loss(self.model, batch).loss_sum / batch.num_targets  # as the loop divides it
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.losses.append(float(loss.detach()))


def main(argv=None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--batch", type=int, default=32, help="examples per step (default 32)")
    p.add_argument("--max-len", type=int, default=128, help="at most this many tokens per example (default 128)")
    p.add_argument("--layers", type=int, default=6, help="encoder layers (default 6)")
    p.add_argument("--hidden", type=int, default=384, help="hidden size (default 384)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--ffn", type=int, default=1536, help="GeGLU intermediate size (default 1536)")
    p.add_argument("--batches-per-round", type=int, default=6, help="steps of each variant per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (interleaved; median reported)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    names = common.check_choices(p, args.variants, VARIANTS, "variant")
    if args.smoke:
        args.batch, args.max_len, args.layers, args.hidden, args.heads, args.ffn = 4, 32, 1, 32, 2, 64
        args.batches_per_round, args.rounds = 2, 2
    common.setup(args)

    overrides = ["model.arch=modernbert", f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                 f"model.num_heads={args.heads}", f"model.intermediate_size={args.ffn}", "model.dropout=0.0",
                 f"data.seq_len={args.max_len}", f"train.batch_size={args.batch}"]
    cfg = load_config(ROOT / "configs" / "mr-scratch.yaml", overrides)
    data = load_labeled(cfg.data.dataset, cfg.data.cache_dir)
    split = stratified_split([e.label for e in data.examples], cfg.data.split_seed)
    tokenizer, _ = init_source(cfg)
    task = ClassifyTask(cfg, data, split, tokenizer, model=None)

    bucketed = [task._examples_of_step(s) for s in range(args.batches_per_round)]
    examples = [i for b in bucketed for i in b]
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    random_batches = [shuffled[s:s + args.batch] for s in range(0, len(shuffled), args.batch)]
    orders = {"bucketed": bucketed, "random": random_batches}

    variants = []
    for name in names:
        mode, order = name.split("-")
        vcfg = load_config(ROOT / "configs" / "mr-scratch.yaml", overrides + [f"model.unpad={mode == 'unpad'}"])
        vcfg.model.vocab_size = cfg.model.vocab_size
        variants.append(Variant(name, vcfg, task, len(LABELS), data.rating_range, orders[order]))
    common.interleave(variants, args.rounds, lambda v, r: v.round())

    by_name = {v.name: v for v in variants}
    real_tokens = sum(len(task.ids[i]) for i in examples)
    results = []
    for v in variants:
        order = v.name.split("-")[1]
        positions = sum(len(x) * max(len(task.ids[i]) for i in x) for x in orders[order])
        twin = by_name.get(f"unpad-{order}")
        diff = max(abs(a - b) for a, b in zip(v.losses, twin.losses)) if twin is not None else None
        seconds = common.median(v.seconds)
        results.append({"variant": v.name, "examples_per_s": len(examples) / seconds, "round_s": seconds,
                        "peak_rss_mb": v.peak_rss_mb, "padding": 1 - real_tokens / positions,
                        "max_loss_diff": diff, "final_loss": v.losses[-1]})
    speed = {r["variant"]: r["examples_per_s"] for r in results}
    for r in results:
        twin = "unpad-" + r["variant"].split("-")[1]
        r["unpad_speedup_over_this"] = speed[twin] / r["examples_per_s"] if twin in speed else None
    report = {"benchmark": "finetune-unpad", "config": vars(args), "examples_per_round": len(examples),
              **common.environment(common.matmul_peak_flops(n=256 if args.smoke else 1024, reps=2)),
              "results": results}
    title = (f"Fine-tuning a ModernBERT classifier L{args.layers} H{args.hidden} on movie reviews: batch {args.batch}, "
             f"<= {args.max_len} tokens, fused AdamW, fp32, {torch.get_num_threads()} threads; {len(examples)} "
             f"examples x {args.rounds} rounds")
    columns = [("variant", "variant", "s"), ("examples_per_s", "examples/s", ",.1f"),
               ("unpad_speedup_over_this", "unpad x", ".2f"), ("padding", "padding", ".1%"),
               ("max_loss_diff", "max |loss diff|", ".2e"), ("peak_rss_mb", "peak RSS MB", ",.0f")]
    common.print_report(report, title, columns, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
