"""Shared parts of the benchmark scripts: peak-memory sampling, the measured matmul peak, FLOP
counting, interleaved timing and the printed / JSON report.

Every benchmark here runs lmforge and its transformers reference side by side in ONE process, on
the same data and optimizer, timing them in interleaved rounds (A B C A B C ...) so that clock
changes, cache state or other load affect every variant alike; the median of the rounds is
reported. Nothing here asserts a speed: tests/test_benchmarks.py only runs each script in its
tiny --smoke setting to keep it working.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples resident memory every 2 ms in a thread; `added_mb` is the peak above the start,
    i.e. what the code inside the block (model, optimizer state, activations) added."""

    def __enter__(self):
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # hand freed heap back (glibc) for a common floor
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def added_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def matmul_peak_flops(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 10) -> float:
    """Measured matmul FLOP/s of an (n x n) @ (n x n) product on this machine, in `dtype`, with
    torch's current thread count: the ceiling that MFU is reported against."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that `fn` actually executes, counted by torch's FlopCounterMode: every matmul,
    batched matmul, convolution and SDPA kernel of forward and backward, at the shapes really
    run (so a head on 15% of positions counts 15% of a full head). Elementwise work (softmax,
    GELU, LayerNorm, the optimizer) is not counted: MFU is matmul FLOPs over the matmul peak.
    torch's table has no entry for the in-place `addmm_` (lmforge's fused loss accumulates its
    weight gradient with it), so it is added here."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flops}) as counter:
        fn()
    return counter.get_total_flops()


def autocast(precision: str):
    """bf16 autocast (what lmforge's train.precision=bf16 and transformers' --bf16 do on a CPU) or nothing."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fused_adamw(model: torch.nn.Module, lr: float = 1e-4, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """The optimizer every variant gets: AdamW with lmforge's two parameter groups (no decay on
    biases and LayerNorm), fused kernel: the default of transformers' Trainer on torch >= 2.8
    (adamw_torch_fused) and of lmforge."""
    from lmforge.train.optim import param_groups

    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, eps=1e-6, fused=True)


def interleave(variants: list, rounds: int, work: Callable[[object, int], None]) -> None:
    """Call work(variant, round) for every variant in every round, A B C A B C ..., appending the
    seconds each call took to `variant.seconds`."""
    for r in range(rounds):
        for v in variants:
            start = time.perf_counter()
            work(v, r)
            v.seconds.append(time.perf_counter() - start)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def base_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: what CI runs")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    return p


def check_choices(parser: argparse.ArgumentParser, value: str, known, what: str) -> list[str]:
    """The comma-separated `value` as a list; a usage error (exit 2, one line) names any unknown item."""
    items = value.split(",")
    unknown = [v for v in items if v not in known]
    if unknown:
        parser.error(f"unknown {what} {', '.join(map(repr, unknown))}; use {', '.join(known)}")
    return items


def setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not torch.cuda.is_available():
        # transformers imports DeepSpeed when accelerate is installed, and DeepSpeed's accelerator
        # probe warns on stdout (the report's) unless told it is on a CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:  # no config chatter or load reports (new heads are new on purpose) from transformers in the tables
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def environment(peak_flops: float) -> dict:
    """What a report was measured with: torch's thread count, the measured matmul peak (GFLOP/s)
    and the torch and transformers versions."""
    import transformers

    return {"torch_threads": torch.get_num_threads(), "matmul_peak_gflops": peak_flops / 1e9,
            "transformers": transformers.__version__, "torch": torch.__version__}


def print_report(report: dict, title: str, columns: list[tuple[str, str, str]], as_json: bool,
                 notes: Optional[list[str]] = None) -> None:
    """columns: (key in each result row, header, format spec)."""
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(title)
    rows = [[("-" if row.get(key) is None else format(row[key], fmt)) for key, _, fmt in columns]
            for row in report["results"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, (_, h, _) in enumerate(columns)]
    for cells in [[h for _, h, _ in columns]] + rows:  # first column left-aligned, numbers right-aligned
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    for note in notes or []:
        print(note)


# -- examples/s benchmarks (bench_finetune.py, bench_inference.py) ------------------------------
# A variant there has .name, .seconds (one per timed round) and .peak_rss_mb.

def examples_row(variant, examples: int, per: str, flops: int, peak_flops: float) -> dict:
    """The result row of `variant`, which processed `examples` examples per `per` ("round" or
    "pass") and ran `flops` counted FLOPs each: examples_per_s over the median `{per}_s`,
    `flops_per_{per}` (and `gflops_per_{per}`), MFU against `peak_flops` and peak_rss_mb."""
    seconds = median(variant.seconds)
    return {"variant": variant.name, "examples_per_s": examples / seconds, f"{per}_s": seconds,
            f"flops_per_{per}": flops, f"gflops_per_{per}": flops / 1e9, "mfu": flops / seconds / peak_flops,
            "peak_rss_mb": variant.peak_rss_mb}


def add_lmforge_speedups(results: list[dict], counterpart: Callable[[str], str] = lambda variant: "lmforge") -> None:
    """Set each row's "lmforge_speedup_over_this": the examples/s of its lmforge counterpart (the
    row named counterpart(variant)) over its own; None when that variant was not run."""
    speed = {r["variant"]: r["examples_per_s"] for r in results}
    for r in results:
        ours = counterpart(r["variant"])
        r["lmforge_speedup_over_this"] = speed[ours] / r["examples_per_s"] if ours in speed else None


# -- training benchmarks (bench_bert_mlm.py, bench_gpt_clm.py) ----------------------------------
# A script gives: make_batches(args, n) -> list of batch dicts, build(name, args) -> model, and
# loss_of(name, model, batch) -> the mean loss its users would backpropagate; the rest is here.

PRECISIONS = ("fp32", "bf16")


def add_training_options(parser: argparse.ArgumentParser, variants: tuple[str, ...], rounds: int,
                         **sizes: int) -> None:
    """--NAME for each model and batch size of `sizes` (its default), then --dropout, --rounds
    (`rounds` by default), --variants (of `variants`) and --precision."""
    for name, default in sizes.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=rounds,
                        help="timed steps per variant, interleaved (median reported)")
    parser.add_argument("--variants", default=",".join(variants), help=f"comma-separated, of {', '.join(variants)}")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (CPU bf16 autocast)")


def parse_training_args(parser: argparse.ArgumentParser, argv, variants: tuple[str, ...], smoke: dict,
                        warm_up: dict) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(args, tiny): the parsed command line, its --variants and --precision checked, with the
    sizes of `smoke` and 2 rounds under --smoke; and a copy of it at the sizes of `warm_up`."""
    args = parser.parse_args(argv)
    check_choices(parser, args.variants, variants, "variant")
    check_choices(parser, args.precision, PRECISIONS, "precision")
    if args.smoke:
        vars(args).update(smoke, rounds=2)
    tiny = copy.copy(args)
    vars(tiny).update(warm_up)
    return args, tiny


class TrainVariant:
    """One model + fused AdamW under test. Built inside PeakRSS, so `peak_rss_mb` is what its
    construction and its first two steps (one of them FLOP-counted) added."""

    def __init__(self, name: str, args, precision: str, first: dict, build, loss_of):
        self.name, self.precision, self.loss_of, self.seconds = name, precision, loss_of, []
        torch.manual_seed(0)
        with PeakRSS() as mem:
            self.model = build(name, args).train()
            self.opt = fused_adamw(self.model)
            self.flops_per_step = count_flops(lambda: self.step(first))
            self.step(first)  # a second step: optimizer state and allocator caches now exist
        self.peak_rss_mb = mem.added_mb

    def step(self, b: dict) -> float:
        with autocast(self.precision):
            loss = self.loss_of(self.name, self.model, b)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = loss.item()
        return self.last_loss


def _training_table(args, precision: str, batches: list[dict], tiny, make_batches, build, loss_of) -> dict:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_peak_flops(dtype, *((256, 2) if args.smoke else (2048, 10)))
    names = args.variants.split(",")
    # Two uncounted steps of each variant at `tiny` size first: one-time costs (kernel JIT,
    # thread pools, lazy imports) then fall on no measured variant.
    tiny_batches = make_batches(tiny, 2)
    for name in names:
        TrainVariant(name, tiny, precision, tiny_batches[0], build, loss_of).step(tiny_batches[1])
    variants = [TrainVariant(name, args, precision, batches[0], build, loss_of) for name in names]
    interleave(variants, args.rounds, lambda v, r: v.step(batches[1 + r % (len(batches) - 1)]))
    results = []
    for v in variants:
        seconds = median(v.seconds)
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


def run_training_benchmark(args, benchmark: str, title: str, tiny, make_batches, build, loss_of) -> int:
    """Measure every precision of args.precision (a table each, fresh models) and print the
    report. `tiny` is a copy of args at warm-up size; `title` heads the printed tables."""
    setup(args)
    batches = make_batches(args, min(args.rounds, 8) + 1)
    tables = [_training_table(args, prec, batches, tiny, make_batches, build, loss_of)
              for prec in args.precision.split(",")]
    report = {"benchmark": benchmark, "config": vars(args), "torch_threads": torch.get_num_threads(),
              "tables": tables, "results": [r for t in tables for r in t["results"]]}
    if args.json:
        print_report(report, "", [], as_json=True)
        return 0
    print(f"{title}, dropout {args.dropout}, fused AdamW, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved steps")
    columns = [("variant", "variant", ""), ("tokens_per_s", "tokens/s", ",.0f"), ("lmforge_speedup", "lmforge x", ".2f"),
               ("mfu", "MFU", ".1%"), ("peak_rss_mb", "peak RSS MB", ",.0f"),
               ("lmforge_rss_fraction", "lmforge RSS /", ".2f"), ("flops_per_step", "FLOP/step", ".3g")]
    for t in tables:
        print()
        print_report(t, f"{t['precision']} (matmul peak {t['matmul_peak_gflops']:.0f} GFLOP/s)", columns, as_json=False)
    return 0
