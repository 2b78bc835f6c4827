"""The experiment directory: one folder per run that explains itself (seed HelloDeepSpeed).

    runs/<task>.<YYYY>.<MM>.<DD>.<HH>.<MM>.<SS>.<short-uuid>/
        config.yaml   the resolved config (feed it back with --config to repeat the run)
        hparams.json  the same, flattened to dotted keys
        githash.log   commit of the lmforge code that ran ("not a git checkout" otherwise)
        gitdiff.log   uncommitted changes to that code at start
        env.json      python, torch and package versions, CPU/GPU, threads, command line
        metrics.jsonl, tb/, checkpoints/, samples.md, summary.json, report.png  (written later)
A new run always gets a new folder; nothing in another run is ever overwritten.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import uuid
from pathlib import Path

import torch

from lmforge.config import Config, dump_yaml, to_dict
from lmforge.errors import LmforgeError

CODE_DIR = Path(__file__).resolve().parents[2]  # the checkout lmforge runs from


def check_out_dir(out_dir: str) -> None:
    """Refuse an out_dir that cannot hold run folders, before any work is done: a file (or a path
    through one), or a run directory itself (the new run would be made inside the old one)."""
    root = Path(out_dir).expanduser()
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        raise LmforgeError(f"out_dir={out_dir}: {existing} is a file; set out_dir to a folder (runs are made in it)")
    if (root / "config.yaml").is_file():
        raise LmforgeError(f"out_dir={out_dir} is a run directory; set out_dir to the folder that holds runs "
                           f"(e.g. its parent), or continue that run with --resume {out_dir}")


def create_run_dir(cfg: Config, task: str) -> Path:
    """Make a fresh, uniquely named run folder under cfg.out_dir and write the provenance files."""
    check_out_dir(cfg.out_dir)
    root = Path(cfg.out_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y.%m.%d.%H.%M.%S")
    while True:
        run = root / f"{task}.{stamp}.{uuid.uuid4().hex[:8]}"
        try:
            run.mkdir()  # exist_ok=False: two runs can never share a folder
            break
        except FileExistsError:
            continue
    (run / "config.yaml").write_text(dump_yaml(cfg))
    (run / "hparams.json").write_text(json.dumps(flatten(to_dict(cfg)), indent=2) + "\n")
    (run / "githash.log").write_text(_git("rev-parse", "HEAD") + "\n")
    (run / "gitdiff.log").write_text(_git("diff", "HEAD"))
    (run / "env.json").write_text(json.dumps(environment(), indent=2) + "\n")
    return run


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _git(*args: str) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=CODE_DIR, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "git not available"
    return proc.stdout.strip() if proc.returncode == 0 else f"not a git checkout ({CODE_DIR})"


def environment() -> dict:
    """What a reader needs to reproduce the numbers: versions, hardware, threads."""
    packages = {}
    for name in ("lmforge", "torch", "numpy", "tokenizers", "safetensors", "transformers", "tensorboard",
                 "matplotlib", "PyYAML", "tqdm"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": packages,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "argv": sys.argv,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
