"""Settings that suit the machine a run is on: CPU threads, the C allocator, native bf16.

- Threads: torch's default (one per physical core) is right for training; `train.num_threads`
  overrides it, e.g. to leave a core free for the data pipeline or another job.
- Allocator: glibc's malloc serves every allocation above 32 MB (and, by default, many smaller
  ones) with a fresh `mmap`, whose pages the kernel must zero and fault in on first touch. A
  training step allocates and frees the same big tensors (embedding gradients, optimizer
  temporaries, chunks of logits) every step, so it pays that again each time: measured here,
  filling a fresh 200 MB tensor took 64 ms with the default and 15 ms once freed memory is reused.
  `tune_allocator` raises glibc's mmap and trim thresholds so freed memory stays in the heap for
  the next step (what jemalloc / tcmalloc preloading achieves, without a preload).
- bf16: worth it on CUDA GPUs with bf16 and on CPUs with native bf16 matmuls (AVX512-BF16 or
  AMX); elsewhere bf16 autocast is emulated and far slower than fp32 (~25x on an AVX2 machine).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
_tuned = False


def tune_allocator() -> bool:
    """Keep freed memory for reuse instead of returning it to the OS (glibc only; once per
    process). Returns True if the settings were applied."""
    global _tuned
    if _tuned:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    return _tuned


def set_threads(num_threads: Optional[int]) -> None:
    """torch's intra-op threads: `num_threads` if given, else torch's default."""
    if num_threads:
        torch.set_num_threads(num_threads)


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None)]
    return any(check() for check in checks if check is not None)
