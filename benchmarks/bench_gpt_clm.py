"""GPT causal-LM training speed: lmforge against transformers' GPT2LMHeadModel, in one process.

Variants, on the same config, the same token windows, the same fused AdamW (two parameter
groups, lr 1e-4) and the same precision:
  lmforge   lmforge's GPT through the CLM task's loss (tasks/clm.py): the vocabulary projection
            and cross-entropy fused and chunked (ops/linear_cross_entropy.py), no logits kept
  hf        transformers' GPT2LMHeadModel, default (sdpa) attention, as run_clm.py runs it
            (labels = input ids, shifted inside the model)
Both read the same (batch, seq) input ids; lmforge predicts the next token at all seq positions
(its targets come from the window's next token), transformers at seq - 1 (its internal shift):
tokens/s counts batch x seq for both. Each precision (fp32; bf16 = CPU bf16 autocast) is a
separate table with freshly built models; steps are timed in interleaved rounds, median
reported; MFU and peak RSS as in bench_bert_mlm.py (see common.py).

    python benchmarks/bench_gpt_clm.py                  # L4 H256 A4, vocab 50,257, seq 256, batch 16
    python benchmarks/bench_gpt_clm.py --smoke --json   # seconds; what CI runs
"""

from __future__ import annotations

import copy
import gc

import torch

import common
from lmforge.config import ModelConfig
from lmforge.models.gpt import GPT
from lmforge.tasks.clm import clm_loss

VARIANTS = ("lmforge", "hf")


def make_batches(args, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        window = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        out.append({"input_ids": window[:, :-1], "targets": window[:, 1:]})
    return out


def build(name: str, args) -> torch.nn.Module:
    if name == "lmforge":
        return GPT(ModelConfig(arch="gpt", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=args.heads, intermediate_size=4 * args.hidden,
                               max_position_embeddings=max(1024, args.seq), dropout=args.dropout,
                               layer_norm_eps=1e-5))
    import transformers

    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=max(1024, args.seq), n_embd=args.hidden,
                                  n_layer=args.layers, n_head=args.heads, resid_pdrop=args.dropout,
                                  embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                                  bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1)
    return transformers.GPT2LMHeadModel(cfg)


def loss_of(name: str, model, b: dict) -> torch.Tensor:
    if name == "lmforge":  # the CLM task's loss; the loop divides by the target count
        return clm_loss(model, b).loss_sum / b["targets"].numel()
    return model(input_ids=b["input_ids"], labels=b["input_ids"]).loss


class Variant:
    """One model + optimizer under test, built inside PeakRSS."""

    def __init__(self, name: str, args, precision: str, first: dict):
        self.name, self.precision, self.seconds = name, precision, []
        torch.manual_seed(0)
        with common.PeakRSS() as mem:
            self.model = build(name, args).train()
            self.opt = common.fused_adamw(self.model)
            self.flops_per_step = common.count_flops(lambda: self.step(first))
            self.step(first)
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
    """Uncounted tiny steps of each variant, so one-time costs fall on no measured variant."""
    tiny = copy.copy(args)
    tiny.layers, tiny.hidden, tiny.heads, tiny.vocab, tiny.seq, tiny.batch = 1, 32, 2, 500, 16, 2
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
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=8, help="timed steps per variant, interleaved (median reported)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (CPU bf16 autocast)")
    args = p.parse_args(argv)
    common.check_choices(p, args.variants, VARIANTS, "variant")
    common.check_choices(p, args.precision, ("fp32", "bf16"), "precision")
    if args.smoke:
        args.layers, args.hidden, args.heads, args.vocab, args.seq, args.batch, args.rounds = 1, 32, 2, 1000, 16, 2, 2
    common.setup(args)
    batches = make_batches(args, min(args.rounds, 8) + 1)
    tables = [measure(args, prec, batches) for prec in args.precision.split(",")]
    report = {"benchmark": "gpt-clm-train", "config": vars(args), "torch_threads": torch.get_num_threads(),
              "tables": tables, "results": [r for t in tables for r in t["results"]]}
    if args.json:
        common.print_report(report, "", [], as_json=True)
        return 0
    print(f"GPT causal-LM training: L{args.layers} H{args.hidden} A{args.heads}, vocab {args.vocab:,}, seq {args.seq}, "
          f"batch {args.batch}, dropout {args.dropout}, fused AdamW, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved steps")
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
