"""What `train.activation_checkpointing` saves and costs: one lmforge BERT masked-LM training
step with every block's activations kept (plain) against the same model with each block
recomputed in the backward (checkpointed: lmforge/train/recompute.py, as the loop applies it),
side by side in one process, on the same batches, fused AdamW and precision.

Activation memory grows with layers x batch x sequence; the default shape (12 layers, sequence
512) makes activations most of a step's memory, as in a real run. Columns: tokens/s, MFU (matmul
FLOPs of the step counted by FlopCounterMode: the checkpointed step really runs ~1/3 more),
peak RSS (what building the model and its optimizer and three steps added, measured in a fresh
process per variant: in one process the second variant would reuse the first one's freed heap);
then checkpointed / plain for the step time (interleaved steps in one process) and the peak memory. The losses of the two are equal
(tests/test_activation_checkpointing.py: bit for bit).

    python benchmarks/bench_activation_checkpointing.py                # L12 H256 A4, seq 512, batch 8
    python benchmarks/bench_activation_checkpointing.py --precision fp32 --rounds 6
    python benchmarks/bench_activation_checkpointing.py --smoke --json # seconds: what CI runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

import common
from bench_bert_mlm import SMOKE, make_batches
from lmforge.config import ModelConfig
from lmforge.models.bert import BertForMaskedLM
from lmforge.tasks.mlm import mlm_loss
from lmforge.train.recompute import checkpoint_blocks

VARIANTS = ("plain", "checkpointed")


def build(name: str, args):
    model = BertForMaskedLM(ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                                        num_heads=args.heads, intermediate_size=args.ffn,
                                        max_position_embeddings=max(512, args.seq), dropout=args.dropout))
    if name == "checkpointed":
        assert checkpoint_blocks(model) == args.layers
    return model


def loss_of(name: str, model, b: dict):
    return mlm_loss(model, b).loss_sum / b["selected"].sum()


def peak_memory_mb(variant: str, precision: str, argv: list[str]) -> float:
    """Peak RSS added by `variant` in `precision`, measured in a child process of this script."""
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-of", variant, "--precision", precision],
                         capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_rss_mb"])


def measure_memory(args, variant: str) -> int:
    """The child's work: build, three steps, print the peak RSS added as one JSON line."""
    common.setup(args)
    batches = make_batches(args, 3)
    torch.manual_seed(0)
    with common.PeakRSS() as mem:
        model = build(variant, args).train()
        opt = common.fused_adamw(model)
        for b in batches:
            with common.autocast(args.precision):
                loss = loss_of(variant, model, b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    print(json.dumps({"peak_rss_mb": mem.added_mb}))
    return 0


def main(argv=None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--memory-of", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    common.add_training_options(p, VARIANTS, rounds=6, layers=12, hidden=256, heads=4, ffn=1024, vocab=30522,
                                seq=512, batch=8)
    argv = list(sys.argv[1:] if argv is None else argv)
    args, tiny = common.parse_training_args(p, argv, VARIANTS, smoke=SMOKE, warm_up=SMOKE)
    if args.memory_of is not None:
        return measure_memory(args, args.memory_of)
    common.setup(args)
    batches = make_batches(args, min(args.rounds, 8) + 1)
    tables = [common._training_table(args, prec, batches, tiny, make_batches, build, loss_of)
              for prec in args.precision.split(",")]
    child_argv = [a for a in argv if a != "--json"]
    for t in tables:
        for r in t["results"]:
            r["peak_rss_mb"] = peak_memory_mb(r["variant"], t["precision"], child_argv)
        plain, ckpt = (next(r for r in t["results"] if r["variant"] == v) for v in VARIANTS)
        ckpt["time_vs_plain"] = ckpt["step_s"] / plain["step_s"]
        ckpt["memory_vs_plain"] = ckpt["peak_rss_mb"] / plain["peak_rss_mb"] if plain["peak_rss_mb"] > 0 else None
    report = {"benchmark": "activation-checkpointing", "config": vars(args), "tables": tables,
              "results": [r for t in tables for r in t["results"]]}
    if args.json:
        common.print_report(report, "", [], as_json=True)
        return 0
    print(f"BERT-MLM step, L{args.layers} H{args.hidden} A{args.heads} FFN{args.ffn}, seq {args.seq}, batch "
          f"{args.batch}, median of {args.rounds} interleaved steps", file=sys.stdout)
    columns = [("variant", "variant", ""), ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU", ".1%"),
               ("peak_rss_mb", "peak RSS MB", ",.0f"), ("time_vs_plain", "time /", ".2f"),
               ("memory_vs_plain", "memory /", ".2f"), ("final_loss", "loss", ".4f")]
    for t in tables:
        print()
        common.print_report(t, f"{t['precision']} (matmul peak {t['matmul_peak_gflops']:.0f} GFLOP/s)", columns,
                            as_json=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
