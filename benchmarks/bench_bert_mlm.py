"""BERT masked-LM training speed: lmforge against transformers, side by side in one process.

Variants, all on the same config, the same batches (same token ids, same masks) and the same
AdamW (two parameter groups, lr 1e-4):
  lmforge            lmforge's BertForMaskedLM (MLM head only on the selected positions)
  hf                 transformers' BertForMaskedLM, as run_mlm.py uses it (head on every position)
  hf-selected        the same transformers model given the selected-positions trick by hand
Steps are timed in interleaved rounds (one step of each variant per round, median reported), so
that the order of variants does not favour any. For each: tokens/s, the ratio to lmforge, the
resident memory its model, optimizer and first two steps added (peak), and the model-FLOPs
utilisation against the fp32 matmul peak measured in this run. FLOPs are counted,
not estimated: torch.utils.flop_counter.FlopCounterMode records every matmul, convolution and
attention kernel of one real training step (forward + backward) of each variant.

    python benchmarks/bench_bert_mlm.py                 # L4 H256 A4 FFN1024, vocab 30,522, seq 128, batch 32
    python benchmarks/bench_bert_mlm.py --smoke --json  # seconds; what CI runs to keep this working
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import threading
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lmforge.config import ModelConfig
from lmforge.data.mlm import cross_entropy_selected, random_mask
from lmforge.models.bert import BertForMaskedLM


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples resident memory every 5 ms in a thread; `peak - start` is what a variant added."""

    def __enter__(self):
        gc.collect()
        try:  # give freed heap back to the OS so each variant starts from the same floor
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def matmul_peak_flops(n: int = 2048, reps: int = 10) -> float:
    """Measured fp32 matmul FLOP/s on this machine with torch's current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def make_batches(args, special: torch.Tensor) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(min(args.steps, 8) + 1):
        ids = torch.randint(1000, args.vocab, (args.batch, args.seq), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102
        masked, selected = random_mask(ids, mask_id=103, special_mask=special, generator=g)
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        out.append({"ids": ids, "masked": masked, "selected": selected, "labels": labels})
    return out


def hf_model(args):
    import transformers

    cfg = transformers.BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                  num_attention_heads=args.heads, intermediate_size=args.ffn,
                                  max_position_embeddings=max(512, args.seq), hidden_dropout_prob=args.dropout,
                                  attention_probs_dropout_prob=args.dropout)
    return transformers.BertForMaskedLM(cfg)


def step_functions(args):
    """name -> (build model, loss of one batch)."""
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      intermediate_size=args.ffn, max_position_embeddings=max(512, args.seq), dropout=args.dropout)

    def ours(model, b):
        logits = model(b["masked"], selected=b["selected"])
        return cross_entropy_selected(logits, b["ids"], b["selected"])

    def hf_full(model, b):  # what run_mlm.py does: logits for all positions, -100 labels elsewhere
        return model(input_ids=b["masked"], labels=b["labels"]).loss

    def hf_selected(model, b):
        hidden = model.bert(input_ids=b["masked"]).last_hidden_state
        logits = model.cls(hidden[b["selected"]])
        return F.cross_entropy(logits, b["ids"][b["selected"]])

    return {"lmforge": (lambda: BertForMaskedLM(cfg), ours), "hf": (lambda: hf_model(args), hf_full),
            "hf-selected": (lambda: hf_model(args), hf_selected)}


def adamw(model):
    from lmforge.train.optim import param_groups

    return torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, eps=1e-6)


class Variant:
    """One model + optimizer under test. Built inside PeakRSS, so `peak_rss_mb` is the memory its
    construction and its first (FLOP-counted) training step added."""

    def __init__(self, name, build, loss_fn, first_batch):
        self.name, self.loss_fn = name, loss_fn
        torch.manual_seed(0)
        with PeakRSS() as mem:
            self.model = build().train()
            self.opt = adamw(self.model)
            with FlopCounterMode(display=False) as counter:
                self.step(first_batch)
            self.step(first_batch)  # a second step: AdamW state and allocator caches now exist
        self.flops_per_step = counter.get_total_flops()
        self.peak_rss_mb = (mem.peak - mem.start) / 2**20
        self.seconds: list[float] = []

    def step(self, b):
        loss = self.loss_fn(self.model, b)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def run(variants: list[Variant], batches: list[dict], rounds: int) -> None:
    """Time the variants in interleaved rounds (A B C A B C ...), so that machine state (clock,
    caches, other load) affects every variant alike; each round is one step of each."""
    for r in range(rounds):
        for v in variants:
            b = batches[r % len(batches)]
            start = time.perf_counter()
            v.last_loss = v.step(b)
            v.seconds.append(time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant (interleaved; median reported)")
    p.add_argument("--variants", default="lmforge,hf,hf-selected")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.heads, args.ffn, args.vocab = 1, 32, 2, 64, 2000
        args.seq, args.batch, args.steps = 16, 4, 2
    special = torch.zeros(args.vocab, dtype=torch.bool)
    special[:1000] = True
    batches = make_batches(args, special)
    peak = matmul_peak_flops(512 if args.smoke else 2048, 2 if args.smoke else 10)
    funcs = step_functions(args)
    variants = [Variant(n, *funcs[n], batches[0]) for n in args.variants.split(",")]
    run(variants, batches[1:], args.steps)
    results = []
    for v in variants:
        seconds = sorted(v.seconds)[len(v.seconds) // 2]  # median step time
        results.append({"variant": v.name, "tokens_per_s": args.batch * args.seq / seconds, "step_s": seconds,
                        "flops_per_step": v.flops_per_step, "mfu": v.flops_per_step / seconds / peak,
                        "peak_rss_mb": v.peak_rss_mb, "final_loss": v.last_loss})
    base = next(r for r in results if r["variant"] == "lmforge")["tokens_per_s"]
    for r in results:
        r["lmforge_speedup_over_this"] = base / r["tokens_per_s"]
    report = {"benchmark": "bert-mlm-train", "config": vars(args), "torch_threads": torch.get_num_threads(),
              "matmul_peak_gflops": peak / 1e9, "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"BERT-MLM training, L{args.layers} H{args.hidden} A{args.heads} FFN{args.ffn} vocab {args.vocab} "
          f"seq {args.seq} batch {args.batch}, fp32, {torch.get_num_threads()} threads; "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"{'variant':<12} {'tokens/s':>10} {'lmforge x':>10} {'MFU':>6} {'peak RSS MB':>12} {'GFLOP/step':>11}")
    for r in results:
        print(f"{r['variant']:<12} {r['tokens_per_s']:>10,.0f} {r['lmforge_speedup_over_this']:>10.2f} "
              f"{r['mfu']:>6.1%} {r['peak_rss_mb']:>12,.0f} {r['flops_per_step'] / 1e9:>11.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
