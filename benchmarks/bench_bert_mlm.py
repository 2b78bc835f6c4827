"""BERT masked-LM training speed: lmforge against transformers, side by side in one process.

Variants, all on the same config, the same batches (same token ids, same masks), the same
fused AdamW (two parameter groups, lr 1e-4) and the same precision:
  lmforge       lmforge's BertForMaskedLM through the MLM task's loss (tasks/mlm.py): the
                vocabulary head runs on the selected positions only, fused with the loss
  hf            transformers' BertForMaskedLM, default (sdpa) attention, as run_mlm.py runs it:
                logits for every position, labels -100 elsewhere
  hf-selected   the same transformers model given the selected-positions trick by hand
Each precision (fp32; bf16 = CPU bf16 autocast, what lmforge's precision=auto picks on a CPU
with native bf16 and transformers' --bf16 flag does) is a separate table with freshly built
models. Steps are timed in interleaved rounds (one step of each variant per round), median
reported. Columns: tokens/s; "lmforge x" = lmforge's tokens/s over this variant's; MFU = matmul
FLOPs per step (counted by FlopCounterMode on one real step, see common.count_flops) / step time
/ the matmul peak measured in this run in the same dtype; peak RSS = resident memory the model,
its optimizer state and its first two steps added.

    python benchmarks/bench_bert_mlm.py                 # L4 H256 A4 FFN1024, vocab 30,522, seq 128, batch 32
    python benchmarks/bench_bert_mlm.py --precision fp32 --rounds 20
    python benchmarks/bench_bert_mlm.py --smoke --json  # seconds; what CI runs to keep this working
"""

from __future__ import annotations

import copy
import gc

import torch
import torch.nn.functional as F

import common
from lmforge.config import ModelConfig
from lmforge.data.mlm import random_mask
from lmforge.models.bert import BertForMaskedLM
from lmforge.tasks.mlm import mlm_loss

VARIANTS = ("lmforge", "hf", "hf-selected")


def make_batches(args, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    special = torch.zeros(args.vocab, dtype=torch.bool)
    special[:1000] = True  # ids below 1000 play [PAD]/[CLS]/[SEP]/[MASK]/unused
    out = []
    for _ in range(n):
        ids = torch.randint(1000, args.vocab, (args.batch, args.seq), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102
        masked, selected = random_mask(ids, mask_id=103, special_mask=special, generator=g)
        out.append({"masked_ids": masked, "input_ids": ids, "selected": selected,
                    "labels": torch.where(selected, ids, torch.full_like(ids, -100))})
    return out


def build(name: str, args) -> torch.nn.Module:
    if name == "lmforge":
        return BertForMaskedLM(ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                                           num_heads=args.heads, intermediate_size=args.ffn,
                                           max_position_embeddings=max(512, args.seq), dropout=args.dropout))
    import transformers

    cfg = transformers.BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                  num_attention_heads=args.heads, intermediate_size=args.ffn,
                                  max_position_embeddings=max(512, args.seq), hidden_dropout_prob=args.dropout,
                                  attention_probs_dropout_prob=args.dropout)
    return transformers.BertForMaskedLM(cfg)


def loss_of(name: str, model, b: dict) -> torch.Tensor:
    if name == "lmforge":  # exactly what the MLM task's loss is; the loop divides by the target count
        return mlm_loss(model, b).loss_sum / b["selected"].sum()
    if name == "hf":
        return model(input_ids=b["masked_ids"], labels=b["labels"]).loss
    hidden = model.bert(input_ids=b["masked_ids"]).last_hidden_state
    return F.cross_entropy(model.cls(hidden[b["selected"]]), b["input_ids"][b["selected"]])


class Variant:
    """One model + optimizer under test, built inside PeakRSS."""

    def __init__(self, name: str, args, precision: str, first: dict):
        self.name, self.precision, self.seconds = name, precision, []
        torch.manual_seed(0)
        with common.PeakRSS() as mem:
            self.model = build(name, args).train()
            self.opt = common.fused_adamw(self.model)
            self.flops_per_step = common.count_flops(lambda: self.step(first))
            self.step(first)  # a second step: optimizer state and allocator caches now exist
        self.peak_rss_mb = mem.added_mb

    def step(self, b: dict) -> float:
        with common.autocast(self.precision):
            loss = loss_of(self.name, self.model, b)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = loss.item()
        return self.last_loss


def warm_up(args, precision: str) -> None:
    """Two steps of each variant at a tiny size, uncounted: one-time costs (kernel JIT, thread
    pools, lazy imports) then fall on no measured variant."""
    tiny = copy.copy(args)
    tiny.layers, tiny.hidden, tiny.heads, tiny.ffn, tiny.vocab, tiny.seq, tiny.batch = 1, 32, 2, 64, 2000, 16, 4
    batches = make_batches(tiny, 2)
    for name in args.variants.split(","):
        Variant(name, tiny, precision, batches[0]).step(batches[1])


def measure(args, precision: str, batches: list[dict]) -> dict:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = common.matmul_peak_flops(dtype, *((256, 2) if args.smoke else (2048, 10)))
    warm_up(args, precision)
    variants = [Variant(name, args, precision, batches[0]) for name in args.variants.split(",")]
    common.interleave(variants, args.rounds, lambda v, r: v.step(batches[1 + r % (len(batches) - 1)]))
    results = []
    for v in variants:
        seconds = common.median(v.seconds)
        results.append({"variant": v.name, "precision": precision, "tokens_per_s": args.batch * args.seq / seconds,
                        "step_s": seconds, "flops_per_step": v.flops_per_step,
                        "mfu": v.flops_per_step / seconds / peak, "peak_rss_mb": v.peak_rss_mb,
                        "final_loss": v.last_loss})
    ours = next((r for r in results if r["variant"] == "lmforge"), None)
    for r in results:
        if ours is not None:
            r["lmforge_speedup"] = ours["tokens_per_s"] / r["tokens_per_s"]
            r["lmforge_rss_fraction"] = ours["peak_rss_mb"] / r["peak_rss_mb"] if r["peak_rss_mb"] > 0 else None
    del variants
    gc.collect()
    return {"precision": precision, "matmul_peak_gflops": peak / 1e9, "results": results}


def main(argv=None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=12, help="timed steps per variant, interleaved (median reported)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (CPU bf16 autocast)")
    args = p.parse_args(argv)
    common.check_choices(p, args.variants, VARIANTS, "variant")
    common.check_choices(p, args.precision, ("fp32", "bf16"), "precision")
    if args.smoke:
        args.layers, args.hidden, args.heads, args.ffn, args.vocab = 1, 32, 2, 64, 2000
        args.seq, args.batch, args.rounds = 16, 4, 2
    common.setup(args)
    batches = make_batches(args, min(args.rounds, 8) + 1)
    tables = [measure(args, prec, batches) for prec in args.precision.split(",")]
    report = {"benchmark": "bert-mlm-train", "config": vars(args), "torch_threads": torch.get_num_threads(),
              "tables": tables, "results": [r for t in tables for r in t["results"]]}
    if args.json:
        common.print_report(report, "", [], as_json=True)
        return 0
    print(f"BERT-MLM training: L{args.layers} H{args.hidden} A{args.heads} FFN{args.ffn}, vocab {args.vocab:,}, "
          f"seq {args.seq}, batch {args.batch}, dropout {args.dropout}, fused AdamW, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved steps")
    columns = [("variant", "variant", ""), ("tokens_per_s", "tokens/s", ",.0f"), ("lmforge_speedup", "lmforge x", ".2f"),
               ("mfu", "MFU", ".1%"), ("peak_rss_mb", "peak RSS MB", ",.0f"),
               ("lmforge_rss_fraction", "lmforge RSS /", ".2f"), ("flops_per_step", "FLOP/step", ".3g")]
    for t in tables:
        print()
        common.print_report(t, f"{t['precision']} (matmul peak {t['matmul_peak_gflops']:.0f} GFLOP/s)", columns,
                            as_json=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
