"""Load a model from wherever the user points: an lmforge run directory or a Hugging Face directory.

Both give the same thing: a `BertForMaskedLM`, its `ModelConfig`, and the tokenizer that goes
with it. Loading never executes code from the files (safetensors, JSON, weights-only torch.load).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.config import ModelConfig, load_config
from lmforge.data.tokenizers import TextTokenizer, load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models.bert import BertForMaskedLM
from lmforge.models.gpt import GPT
from lmforge.models.hf import (from_hf_state_dict, gpt2_from_hf_state_dict, gpt2_model_config_from_hf, is_hf_dir,
                               model_config_from_hf, read_hf_dir)
from lmforge.train.checkpoint import load_model_weights


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """A freshly initialised pretraining model for `cfg.arch`: BertForMaskedLM or GPT."""
    if cfg.arch == "bert":
        return BertForMaskedLM(cfg)
    if cfg.arch == "gpt":
        return GPT(cfg)
    raise LmforgeError(f"model.arch={cfg.arch!r} is not known; known: bert, gpt")


@dataclass
class LoadedModel:
    model: torch.nn.Module  # BertForMaskedLM or GPT
    config: ModelConfig
    tokenizer: TextTokenizer
    source: str  # "lmforge" or "hf"
    notes: list[str] = field(default_factory=list)  # what a user should know (e.g. a fresh MLM head)


def load_model(path: str | Path, *, mlm_head_required: bool = True) -> LoadedModel:
    """Model, config and tokenizer from an lmforge pretraining run directory (BERT or GPT) or a
    transformers BERT or GPT-2 (GPT2LMHeadModel) directory.

    A transformers encoder without an MLM head (a `BertModel`, such as the bundled MiniLM) gets a
    freshly initialised head; with `mlm_head_required` that is said on stderr, since its fill-mask
    output is then noise until the head is trained.
    """
    path = Path(path)
    if (path / "config.yaml").is_file():
        cfg = load_config(path / "config.yaml")
        if cfg.task.name == "classify":
            raise LmforgeError(f"{path} is a fine-tuning run: use `lmforge classify` with it, or `lmforge export` "
                               f"for its encoder")
        model = build_model(cfg.model)
        model.load_state_dict(load_model_weights(path / "checkpoints", path))
        return LoadedModel(model.eval(), cfg.model, load_tokenizer(str(path / "tokenizer.json")), "lmforge")
    if is_hf_dir(path):
        hf_cfg, hf_state = read_hf_dir(path)
        if hf_cfg.get("model_type") == "gpt2":
            cfg = gpt2_model_config_from_hf(hf_cfg)
            model = GPT(cfg)
            state, ignored = gpt2_from_hf_state_dict(hf_state, model.token.weight.size(0))
            model.load_state_dict(state)
            notes = [f"not used from {path}: {', '.join(sorted(ignored)[:6])}"] if ignored else []
            return LoadedModel(model.eval(), cfg, load_tokenizer(str(path)), "hf", notes)
        cfg = model_config_from_hf(hf_cfg)
        state, ignored = from_hf_state_dict(hf_state)
        model = BertForMaskedLM(cfg)  # initialised, so a missing head starts as N(0, 0.02)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected  # from_hf_state_dict only yields our names
        notes = []
        if missing:
            if not all(name.startswith("mlm_head.") for name in missing):
                raise LmforgeError(f"{path} lacks encoder tensors: {', '.join(missing[:5])}")
            notes.append(f"{path} has no masked-LM head (it is an encoder only); the head was initialised "
                         f"randomly and must be trained before fill-mask predictions mean anything")
            if mlm_head_required:
                print(f"warning: {notes[-1]}", file=sys.stderr)
        if ignored:
            notes.append(f"not used from {path}: {', '.join(sorted(ignored)[:6])}")
        return LoadedModel(model.eval(), cfg, load_tokenizer(str(path)), "hf", notes)
    raise LmforgeError(f"{path} is neither an lmforge run directory (config.yaml) nor a Hugging Face model "
                       f"directory (config.json + model.safetensors or pytorch_model.bin)")

