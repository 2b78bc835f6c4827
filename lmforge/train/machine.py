"""Settings that suit the machine a run is on: CPU threads and native bf16; and what a run
cannot do on it (check_environment: a missing package, a precision the launcher's processes refuse).

- Threads: torch's default (one per physical core) is right for training; `train.num_threads`
  overrides it, e.g. to leave a core free for the data pipeline or another job.
- No allocator tuning: lmforge's step keeps no large temporaries (ops/linear_cross_entropy.py,
  fused AdamW), and raising glibc's mmap threshold measured no gain for it here (it did help
  transformers' dense-logits step).
- bf16: worth it on CUDA GPUs with bf16 and on CPUs with native bf16 matmuls (AVX512-BF16 or
  AMX); elsewhere bf16 autocast is emulated and far slower than fp32 (~25x on an AVX2 machine).
  `train.precision=auto` therefore picks bf16 on a CPU only when the CPU reports native bf16 AND
  a quick matmul timing confirms bf16 is faster (measured on an AVX512-BF16 EPYC: bf16 matmuls
  2.2x fp32, a whole BERT training step 2.4x). The timing is taken once per machine and kept in
  the cache (machine.json), so every run there makes the same choice.
- Memory: `memory_mb` is logged with every train record (resident set size; the GPU's peak
  allocation too on CUDA), so a leak shows as a rising curve long before an OOM kill. Batches are
  made in the training process from memmaps: no loader workers, no prefetch queue to grow.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import resource
import sys
import time
from typing import Optional

import torch

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.train.schedule import check_batch_ramp
from lmforge.files import write_text_atomic


def precision_refusal(precision: str, strategy: str, world: int) -> Optional[str]:
    """Why `precision` (fp32 | bf16 | fp16) cannot train under `strategy` with `world`
    processes, or None. The one rule: a run refuses what a user asks for with it
    (check_environment), and `resolve_precision` never picks what it refuses."""
    if precision == "fp16" and strategy == "fsdp" and world > 1:
        # FSDP2 keeps sharded fp32 gradients that torch's GradScaler cannot unscale across ranks
        return "train.precision=fp16 with distributed.strategy=fsdp is not supported; use bf16 (or fp32)"
    return None


def check_environment(cfg: Config, world: int) -> None:
    """Refuse, in one line, what `cfg` cannot run with here: under the launcher's `world`
    processes (WORLD_SIZE) or without a package it needs. Called when a run starts or resumes,
    once the process group is joined and before anything is read or written; the config's own
    checks (lmforge/config.py validate) are those that hold on any machine."""
    refusal = precision_refusal(cfg.train.precision, cfg.distributed.strategy, world)
    if refusal is not None:
        raise LmforgeError(refusal)
    check_batch_ramp(cfg, world)
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise LmforgeError("log.wandb=true needs the wandb package: pip install wandb (or set log.wandb=false)")


def set_threads(num_threads: Optional[int]) -> None:
    """torch's intra-op threads: `num_threads` if given, else torch's default."""
    if num_threads:
        torch.set_num_threads(num_threads)


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None)]
    return any(check() for check in checks if check is not None)


def _matmul_seconds(dtype: torch.dtype, n: int = 512, reps: int = 5) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, 4 * n).to(dtype)
    a @ b  # warm-up: oneDNN builds its kernel on first use
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return "cpu"


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a (512 x 512) @ (512 x 2048) matmul on this CPU, 0.0 when the CPU
    has no native bf16 (then it is not even timed: emulated bf16 is always far slower).

    Measured once per machine (CPU model, torch version, thread count) and remembered in the
    lmforge cache (machine.json): a timing taken while something else loads the machine could
    otherwise make two runs of the same config pick different precisions."""
    if not cpu_has_native_bf16():
        return 0.0
    from lmforge.data.packages import cache_root, cached_item_lock

    key = f"{_cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    with contextlib.ExitStack() as locked:
        try:
            path = cache_root() / "machine.json"
            # Read, time and write under machine.json's lock: runs started together time once (not
            # side by side, which would load the machine and skew the timing), and none drops the
            # entry another process wrote in between.
            locked.enter_context(cached_item_lock(path, "timing bf16 matmuls on this CPU"))
            known = json.loads(path.read_text()) if path.is_file() else {}
            if isinstance(known.get(key), (int, float)):
                return float(known[key])
        except (OSError, ValueError):
            path, known = None, {}
        speedup = _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)
        if path is not None and isinstance(known, dict):
            with contextlib.suppress(OSError):  # a read-only cache is no error: the next run measures again
                write_text_atomic(path, json.dumps({**known, key: speedup}, indent=1) + "\n")
        return speedup


def resolve_precision(device: torch.device, precision: str, strategy: str = "ddp", world: int = 1) -> str:
    """'bf16', 'fp16' or 'fp32' for `train.precision` (auto | fp32 | bf16 | fp16) on `device`.
    auto: bf16 on a CUDA GPU that supports it (Ampere and later), fp16 with loss scaling on an
    older one (V100, T4) unless the strategy refuses fp16 (FSDP: then fp32), bf16 on a CPU with
    native bf16 that a timing shows 1.2x faster."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32" if precision_refusal("fp16", strategy, world) else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_speedup() >= 1.2 else "fp32"
    return "fp32"


def memory_mb(device: torch.device) -> dict[str, float]:
    """{'rss_mb': resident set size now} (+ 'cuda_peak_mb' on CUDA) for the train log."""
    try:  # Linux: current RSS, in pages
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # elsewhere: the peak so far (macOS reports bytes, Linux KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    out = {"rss_mb": round(rss, 1)}
    if device.type == "cuda":
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
