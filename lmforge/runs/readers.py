"""Reading models back: a run's checkpoint weights and tokenizer, and Hugging Face directories.

An lmforge run is loaded by its objective (lmforge/tasks/loading.py asks the registry which one,
and the objective builds its model and calls the readers here); a transformers BERT or GPT-2
directory (of any family in lmforge/models/registry.py) is read here into the same `LoadedModel`. Loading never executes code from the files
(safetensors, JSON, weights-only torch.load). This module knows no task names.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmforge.config import ModelConfig
from lmforge.data.tokenizers import TextTokenizer, load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models.classifier import Classifier
from lmforge.models.hf import from_hf_state_dict, model_config_from_hf
from lmforge.models.registry import family_for_model_type
from lmforge.runs.checkpoint import checkpoints_newest_first, load_model_weights


# ---------------------------------------------------------------------------------------------
# Transformers directories: config.json + model.safetensors, or pytorch_model.bin read with
# torch.load(weights_only=True), which refuses pickled code from torch 2.6 on and is refused here
# on an older torch (CVE-2025-32434).

def is_hf_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file() and any(
        (Path(path) / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))


# torch.load(weights_only=True) can be made to run code before torch 2.6 (CVE-2025-32434)
SAFE_TORCH_LOAD = (2, 6)


def torch_load_is_safe() -> bool:
    """Whether this torch's weights-only unpickler refuses code (torch >= 2.6)."""
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= SAFE_TORCH_LOAD


def _weights_only_load(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled state dict, read by torch's weights-only unpickler (never code),
    or a one-line LmforgeError; never on a torch whose unpickler can be bypassed."""
    if not torch_load_is_safe():
        raise LmforgeError(f"refusing {path}: reading a pickle is safe only with torch>=2.6 (CVE-2025-32434) and "
                           f"this is torch {torch.__version__}; upgrade torch, or give the model as model.safetensors")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": many lines before our one
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler refuses anything but tensors and containers
        text = str(e)  # torch says what it refused after "WeightsUnpickler error:", else on its first line
        reason = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
        reason = next((line.strip() for line in reason.splitlines() if line.strip()), type(e).__name__)
        raise LmforgeError(f"refusing {path}: it is not a plain tensor file ({reason[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise LmforgeError(f"refusing {path}: it is not a state dict of named tensors")
    return state


def read_hf_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of a transformers model directory, loaded without running code.
    A config.json or weights file that is damaged is a one-line LmforgeError."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LmforgeError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        hf_cfg = json.loads((path / "config.json").read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise LmforgeError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(hf_cfg, dict):
        raise LmforgeError(f"{path / 'config.json'} is not a JSON object of model settings")
    if (path / "model.safetensors").is_file():
        try:
            return hf_cfg, load_file(path / "model.safetensors")
        except SafetensorError as e:  # a truncated or malformed file
            raise LmforgeError(f"{path / 'model.safetensors'} is damaged ({str(e).splitlines()[0][:200]})") from None
    if (path / "pytorch_model.bin").is_file():
        return hf_cfg, _weights_only_load(path / "pytorch_model.bin")
    raise LmforgeError(f"{path} has config.json but neither model.safetensors nor pytorch_model.bin")


# ---------------------------------------------------------------------------------------------
# lmforge run directories

def summary_covers(run_dir: Path, step: int) -> bool:
    """Whether the run's summary.json is of its training up to `step`: a run resumed to train
    longer keeps its earlier summary until it finishes again, and a kill in between must not make
    it look finished. A summary that cannot be read counts as covering (the run is left alone)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return False
    try:
        steps = json.loads(path.read_text()).get("steps")
    except (OSError, ValueError, AttributeError):
        return True
    return not isinstance(steps, int) or steps >= step


def run_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the newest whole checkpoint of the lmforge run `run_dir`."""
    if not checkpoints_newest_first(run_dir / "checkpoints"):
        raise LmforgeError(f"{run_dir} has no checkpoint (it stopped before its first one was written); "
                           f"continue it with `--resume {run_dir}` or train it again")
    return load_model_weights(run_dir / "checkpoints", run_dir)


def load_checkpoint_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], run_dir: Path) -> None:
    """Load a run's checkpoint tensors into `model` (built from the run's config.yaml), or say in one
    line where they differ: config.yaml was edited after training, or the checkpoint is another's."""
    expected = model.state_dict()
    for name in sorted(set(expected) | set(weights)):
        if name not in weights or name not in expected or weights[name].shape != expected[name].shape:
            there = tuple(weights[name].shape) if name in weights else "missing"
            here = tuple(expected[name].shape) if name in expected else "absent"
            raise LmforgeError(f"{run_dir / 'config.yaml'} does not match its checkpoint: {name} is {there} in the "
                               f"checkpoint but {here} by the config; restore the config the run was trained with")
    model.load_state_dict(weights)


def load_run_tokenizer(run_dir: Path, record: str) -> TextTokenizer:
    """The run's tokenizer.json, checked against the sha256 the run recorded in `record` (data.json
    or dataset.json) when it started: a tokenizer swapped in later, even one of the same size,
    would silently give wrong predictions."""
    tokenizer = load_tokenizer(str(run_dir / "tokenizer.json"))
    info = json.loads((run_dir / record).read_text()) if (run_dir / record).is_file() else {}
    recorded = info.get("tokenizer_sha256")
    if recorded is not None and recorded != tokenizer.sha256:
        raise LmforgeError(f"{run_dir / 'tokenizer.json'} is not the tokenizer this run was trained with (its sha256 "
                           f"differs from the one in {record}); put back the run's own tokenizer.json")
    return tokenizer


def check_tokenizer_fits(tokenizer: TextTokenizer, cfg: ModelConfig, where: Path) -> None:
    """A tokenizer with more tokens than the model's vocabulary is not the one it was trained with
    (its ids would index past the embedding table)."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LmforgeError(f"{where} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                           f"{cfg.vocab_size}: it is not the tokenizer this model was trained with; put back the "
                           f"model's own tokenizer")


def load_hf_tensors(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Load a transformers directory's tensors (already in lmforge names) into `model`, built
    from that directory's config.json; returns the names of the model's tensors it lacks. A tensor
    with no place in that model (a layer beyond num_hidden_layers) or of another shape means the
    config.json is not the one saved with these weights: said in one line."""
    expected = model.state_dict()
    for name, tensor in sorted(state.items()):
        here = tuple(expected[name].shape) if name in expected else None
        if here != tuple(tensor.shape):
            by_config = "absent" if here is None else here
            raise LmforgeError(f"{path / 'config.json'} does not describe its weights: {name} is "
                               f"{tuple(tensor.shape)} in the weights but {by_config} by config.json; "
                               f"use the config.json saved with these weights")
    missing, _ = model.load_state_dict(state, strict=False)
    return list(missing)


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a masked or causal LM of any family (a fine-tuning run: its classifier)
    config: ModelConfig
    tokenizer: TextTokenizer
    source: str  # "lmforge" or "hf"
    notes: list[str] = field(default_factory=list)  # what a user should know (e.g. a fresh MLM head)
    electra: Optional[torch.nn.Module] = None  # an ELECTRA run's whole model; `model` is then its discriminator
    fresh_mlm_head: bool = False  # the MLM head was initialised here, not loaded (an encoder-only source)


def load_hf_model(path: str | Path, *, mlm_head_required: bool = True) -> LoadedModel:
    """Model, config and tokenizer from a transformers directory of any family lmforge reads
    (BERT, ModernBERT, DeBERTa-v2, GPT-2, Llama, Qwen3, Arcee: lmforge/models/registry.py), read
    by that family's `from_hf`.

    A transformers encoder without an MLM head (a `BertModel`, such as the bundled MiniLM) gets a
    freshly initialised head; with `mlm_head_required` that is said on stderr, since its fill-mask
    output is then noise until the head is trained.
    """
    path = Path(path)
    if not is_hf_dir(path):
        raise LmforgeError(f"{path} is not a Hugging Face model directory (config.json + model.safetensors or "
                           f"pytorch_model.bin)")
    hf_cfg, hf_state = read_hf_dir(path)
    fam = family_for_model_type(hf_cfg.get("model_type"))
    cfg, state, ignored = fam.from_hf(hf_cfg, hf_state)
    model = fam.lm(cfg)  # initialised, so a missing MLM head starts as the family's init
    missing = load_hf_tensors(model, state, path)
    notes = []
    fresh_head = False
    if missing:
        if fam.kind == "decoder" or not all(name.startswith("mlm_head.") for name in missing):
            raise LmforgeError(f"{path} lacks {fam.arch} tensors: {', '.join(missing[:5])}")
        fresh_head = True
        notes.append(f"{path} has no masked-LM head (it is an encoder only); the head was initialised "
                     f"randomly and must be trained before fill-mask predictions mean anything")
        if mlm_head_required:
            print(f"warning: {notes[-1]}", file=sys.stderr)
    if ignored:
        notes.append(f"not used from {path}: {', '.join(sorted(ignored)[:6])}")
    tokenizer = load_tokenizer(str(path))
    check_tokenizer_fits(tokenizer, cfg, path)
    return LoadedModel(model.eval(), cfg, tokenizer, "hf", notes, fresh_mlm_head=fresh_head)


def is_hf_classifier_dir(path: str | Path) -> bool:
    """A transformers directory whose architecture is a BertForSequenceClassification."""
    path = Path(path)
    if not is_hf_dir(path):
        return False
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def load_hf_classifier(path: str | Path, labels: tuple[str, ...]) -> tuple[ModelConfig, TextTokenizer,
                                                                            Classifier, list[str]]:
    """(config, tokenizer, classifier in eval mode, notes) from a transformers
    BertForSequenceClassification directory: a Classifier with BERT's pooler ([CLS] -> dense,
    tanh -> dropout -> classifier) and no rating head, its `cls` state the final [CLS] hidden
    state before the pooler; its output rows put in the order of `labels`: by the
    names of its id2label when they are those labels in any case (NEGATIVE / POSITIVE), else in its
    own order (LABEL_0, LABEL_1: said in the notes)."""
    path = Path(path)
    hf_cfg, hf_state = read_hf_dir(path)
    cfg = model_config_from_hf(hf_cfg)
    head = {"pooler": "bert.pooler.dense", "polarity": "classifier"}
    if any(f"{name}.weight" not in hf_state for name in head.values()):
        raise LmforgeError(f"{path} lacks the pooler or classifier tensors of a BertForSequenceClassification")
    num_labels = hf_state["classifier.weight"].size(0)
    if num_labels != len(labels):
        raise LmforgeError(f"{path} predicts {num_labels} labels, not the {len(labels)} of this task "
                           f"({', '.join(labels)})")
    state, _ = from_hf_state_dict({k: v for k, v in hf_state.items() if not k.startswith("classifier.")})
    for ours, theirs in head.items():
        state.update({f"{ours}.{p}": hf_state[f"{theirs}.{p}"] for p in ("weight", "bias")})
    names = [str((hf_cfg.get("id2label") or {}).get(str(i), f"LABEL_{i}")).lower() for i in range(num_labels)]
    notes = []
    if sorted(names) == sorted(labels):
        order = [names.index(label) for label in labels]
        state["polarity.weight"], state["polarity.bias"] = state["polarity.weight"][order], state["polarity.bias"][order]
    else:
        notes.append(f"{path} names its labels {', '.join(names)}: taken in that order as {', '.join(labels)}")
    cfg.classifier_pooling = "pooler"
    model = Classifier(cfg, num_labels)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LmforgeError(f"{path} is not a complete BertForSequenceClassification: "
                           + "; ".join(f"{what} {', '.join(keys[:4])}" for what, keys in
                                       (("missing", missing), ("unexpected", unexpected)) if keys))
    tokenizer = load_tokenizer(str(path))
    check_tokenizer_fits(tokenizer, cfg, path)
    return cfg, tokenizer, model.eval(), notes
