"""Checkpoints: safetensors for every tensor, JSON for everything else, nothing executable.

One checkpoint is a folder `checkpoints/step_00001234/`:
    model.safetensors       model weights, names free of wrapper prefixes (_orig_mod., module.)
    optimizer.safetensors   AdamW moments and step counts, keyed `<param index>.<name>`
    ema.safetensors         only with optim.ema_decay: the averaged model (lmforge/train/ema.py),
                            named as model.safetensors; readers of the run prefer it
    state.json              step, data position, optimizer hyper-parameters, metrics needed to
                            continue, the sha256 of both tensor files, and `state_sha256`: the
                            sha256 of state.json's own content without that key (all checked
                            on load; a checkpoint written before that key existed loads as before)
It is written under a temporary name, fsynced and renamed, and only then does the small
`checkpoints/latest` file (also written by rename) point to it. A crash at any moment leaves
either the old or the new checkpoint complete, never half of one. Loading checks the sha256s;
a checkpoint damaged afterwards (truncated by a full disk, edited, half-deleted) is named in a
warning and the newest whole one before it is used (`load_newest_good`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.files import write_text_atomic

WRAPPER_PREFIXES = ("_orig_mod.", "module.")
AVERAGE_FILE = "ema.safetensors"


def clean_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with torch.compile / DDP prefixes removed, contiguous, on the CPU."""
    out = {}
    for name, t in model.state_dict().items():
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        out[name] = t.detach().to("cpu").contiguous()
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile / DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_checksum(state: dict) -> str:
    """sha256 of a checkpoint's state (without `state_sha256`) as JSON with sorted keys: the same
    whether computed before writing state.json or after reading it back, whatever its layout."""
    canonical = json.loads(json.dumps({k: v for k, v in state.items() if k != "state_sha256"}))
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict (keyed by parameter index) as safetensors' tensors + JSON meta."""
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(ckpt_root: Path, step: int, full_state: tuple[dict, dict, dict],
                    state: dict[str, Any], keep: int = 3,
                    average: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep`.
    `full_state` is (model tensors, optimizer tensors, optimizer meta) as an Engine's full_state
    gives them (lmforge/distributed/engine.py); `average`, the weight average's state dict
    (optim.ema_decay), goes into ema.safetensors.

    A write that fails (full disk, read-only or vanished directory) removes its temporary folder
    and raises LmforgeError; the previous checkpoint and `latest` are left as they were."""
    try:
        return _save_checkpoint(ckpt_root, step, full_state, state, keep, average)
    except (OSError, SafetensorError) as e:  # safetensors reports its I/O errors as SafetensorError
        shutil.rmtree(ckpt_root / f".step_{step:08d}.tmp", ignore_errors=True)
        previous = latest_checkpoint(ckpt_root) if ckpt_root.is_dir() else None
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise LmforgeError(f"could not write checkpoint step {step} in {ckpt_root}: {reason} ({kept}); "
                           f"free disk space or make the directory writable, then continue with --resume "
                           f"{ckpt_root.parent}") from None


def _save_checkpoint(ckpt_root: Path, step: int, full_state: tuple[dict, dict, dict],
                     state: dict[str, Any], keep: int, average: Optional[dict[str, torch.Tensor]]) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".step_{step:08d}.tmp"
    if tmp.exists():  # left by a process killed while writing
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights, opt_tensors, opt_meta = full_state
    save_file(weights, tmp / "model.safetensors")
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    names = ["model.safetensors", "optimizer.safetensors"]
    if average is not None:
        save_file(average, tmp / AVERAGE_FILE)
        names.append(AVERAGE_FILE)
    files = {name: _sha256(tmp / name) for name in names}
    payload = {"step": step, "optimizer": opt_meta, "files": files, **state}
    payload["state_sha256"] = state_checksum(payload)  # a changed step or data position is damage too
    (tmp / "state.json").write_text(json.dumps(payload, indent=1))
    for name in (*names, "state.json"):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    replaced = None
    if final.exists():  # the same step again, e.g. retraining past a damaged checkpoint: move it aside
        replaced = ckpt_root / f".step_{step:08d}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    write_text_atomic(ckpt_root / "latest", final.name + "\n")
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    """The folder `latest` points to, or None when the run has no checkpoint yet."""
    pointer = ckpt_root / "latest"
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, with_optimizer: bool = True, average: bool = False
                    ) -> tuple[dict[str, torch.Tensor], Optional[dict[str, torch.Tensor]], dict]:
    """(model tensors, optimizer tensors or None, state) from a checkpoint folder, after checking
    the recorded sha256 of each tensor file read. Nothing here can execute code from the files.
    With `average`, the model tensors are the weight average's (ema.safetensors) where the
    checkpoint has one; on resume the loop reads it with `load_average`."""
    state_path = path / "state.json"
    if not state_path.is_file():
        raise LmforgeError(f"{path} is not a checkpoint (no state.json)")
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LmforgeError(f"{state_path} is damaged (not valid JSON)") from None
    if not isinstance(state, dict):
        raise LmforgeError(f"checkpoint {path} is damaged: state.json is not a JSON object")
    recorded = state.pop("state_sha256", None)  # None: written before lmforge recorded it
    if recorded is not None and recorded != state_checksum(state):
        raise LmforgeError(f"checkpoint {path} is damaged: state.json does not match its recorded sha256")
    files = state.get("files", {})
    model_file = AVERAGE_FILE if average and AVERAGE_FILE in files else "model.safetensors"
    names = [model_file] + (["optimizer.safetensors"] if with_optimizer else [])
    # resuming needs the average too: checked here with the rest, read by load_average
    checked = names + ([AVERAGE_FILE] if with_optimizer and AVERAGE_FILE in files else [])
    for name in checked:
        digest = files.get(name)
        if digest is None or not (path / name).is_file() or _sha256(path / name) != digest:
            raise LmforgeError(f"checkpoint {path} is damaged: {name} is missing or does not match its recorded sha256")
    try:
        tensors = [load_file(path / name) for name in names]
    except Exception as e:  # safetensors refuses a malformed file; never a traceback for the user
        raise LmforgeError(f"checkpoint {path} is damaged: {e}") from None
    return tensors[0], tensors[1] if with_optimizer else None, state


def checkpoints_newest_first(ckpt_root: Path) -> list[Path]:
    """The folder `latest` points to, then every other step_* folder, newest first."""
    latest = latest_checkpoint(ckpt_root)
    steps = sorted((p for p in ckpt_root.glob("step_*") if p.is_dir()), reverse=True) if ckpt_root.is_dir() else []
    return ([latest] if latest else []) + [p for p in steps if p != latest]


def load_newest_good(ckpt_root: Path, with_optimizer: bool = True, average: bool = False):
    """(path, model tensors, optimizer tensors, state) of the newest checkpoint that is whole,
    or None if there is none. A damaged one (truncated, altered, half-deleted) is named in a
    one-line warning and the one before it is used. `average`: as for load_checkpoint."""
    for path in checkpoints_newest_first(ckpt_root):
        try:
            return (path, *load_checkpoint(path, with_optimizer, average))
        except LmforgeError as e:
            print(f"lmforge: warning: {e}; trying the checkpoint before it", file=sys.stderr)
    return None


def load_model_weights(ckpt_root: Path, run_dir: Path) -> dict[str, torch.Tensor]:
    """The model of the newest whole checkpoint under `ckpt_root` (of run `run_dir`): the weight
    average where the run kept one (optim.ema_decay), else the trained weights."""
    found = load_newest_good(ckpt_root, with_optimizer=False, average=True)
    if found is None:
        raise LmforgeError(f"{run_dir} has no usable checkpoint")
    return found[1]


def load_average(path: Path, state: dict) -> Optional[dict[str, torch.Tensor]]:
    """The weight average (ema.safetensors) of the checkpoint `path`, whose state `state` came from
    load_checkpoint(path, with_optimizer=True), which has checked the file's sha256; None where
    the checkpoint has none."""
    if AVERAGE_FILE not in state.get("files", {}):
        return None
    try:
        return load_file(path / AVERAGE_FILE)
    except Exception as e:  # safetensors refuses a malformed file
        raise LmforgeError(f"checkpoint {path} is damaged: {e}") from None


def indexed_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The optimizer state_dict a checkpoint's tensors and meta describe (this module)."""
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of `optimizer_tensors`: rebuild the optimizer's state_dict and load it."""
    optimizer.load_state_dict(indexed_state_dict(tensors, meta))
