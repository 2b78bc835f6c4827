"""Model families by `model.arch`: one line each, the family in its own file.

`build_model(cfg)` makes a freshly initialised language model of the family and shape `cfg`
describes (what a pretraining objective trains by default, and what `lmforge plan` counts).
Adding a family: its file under lmforge/models/, and one line here.
"""

from __future__ import annotations

import importlib

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

ARCHS = {  # model.arch -> "module:class", the class taking a ModelConfig
    "bert": "lmforge.models.bert:BertForMaskedLM",
    "gpt": "lmforge.models.gpt:GPT",
}


def model_class(arch: str) -> type[torch.nn.Module]:
    if arch not in ARCHS:
        raise LmforgeError(f"model.arch={arch!r} is not known; known: {', '.join(ARCHS)}")
    module, cls = ARCHS[arch].split(":")
    return getattr(importlib.import_module(module), cls)


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """A freshly initialised model of family cfg.arch and shape cfg."""
    return model_class(cfg.arch)(cfg)
