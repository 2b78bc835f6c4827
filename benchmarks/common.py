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
    try:  # no config chatter from transformers in the printed tables
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


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
