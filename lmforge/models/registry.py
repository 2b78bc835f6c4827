"""Model families by `model.arch`: one line each, the family in its own file.

`build_model(cfg)` makes a freshly initialised language model of the family and shape `cfg`
describes (what a pretraining objective trains by default, and what `lmforge plan` counts);
`family(arch)` is what the rest of lmforge knows of it (lmforge/models/family.py).
Adding a family: its file under lmforge/models/, ending with `FAMILY = Family(...)`, and one line here.
"""

from __future__ import annotations

import importlib

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.family import Family

ARCHS = {  # model.arch -> the module whose FAMILY describes it
    "bert": "lmforge.models.bert",  # Devlin et al. 2019: post-norm encoder, learned positions
    "gpt": "lmforge.models.gpt",  # GPT-2: pre-norm decoder, learned positions
    "llama": "lmforge.models.llama",  # RoPE, RMSNorm, SwiGLU or ReLU², optional QK-norm
    "modernbert": "lmforge.models.modernbert",  # RoPE, GeGLU, pre-norm, local/global attention
    "deberta": "lmforge.models.deberta",  # DeBERTa-v3: disentangled relative-position attention
}


def family(arch: str) -> Family:
    if arch not in ARCHS:
        raise LmforgeError(f"model.arch={arch!r} is not known; known: {', '.join(ARCHS)}")
    return importlib.import_module(ARCHS[arch]).FAMILY


def families(kind: str | None = None) -> list[Family]:
    """Every known family (of `kind`: encoder | decoder), in ARCHS order."""
    return [f for f in map(family, ARCHS) if kind is None or f.kind == kind]


def family_for_model_type(model_type: str | None) -> Family:
    """The family that reads a transformers config.json of this `model_type`."""
    for f in families():
        if model_type in f.hf_model_types:
            return f
    known = ", ".join(t for f in families() for t in f.hf_model_types)
    raise LmforgeError(f"model_type {model_type!r} is not supported here; lmforge reads {known}")


def model_class(arch: str) -> type[torch.nn.Module]:
    return family(arch).lm


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """A freshly initialised model of family cfg.arch and shape cfg."""
    return family(cfg.arch).lm(cfg)


def check_family(task: str, arch: str, kind: str, archs: tuple[str, ...] = ()) -> None:
    """Refuse, in one line, a model.arch that task `task` cannot train: not of `kind` (encoder |
    decoder), or not one of `archs` when the task is written for those families only."""
    fam = family(arch)
    if archs and arch not in archs:
        raise LmforgeError(f"task.name={task} trains model.arch={' or '.join(archs)} only, not {arch!r}")
    if fam.kind != kind:
        fits = " or ".join(f.arch for f in families(kind))
        article = "an" if kind == "encoder" else "a"
        raise LmforgeError(f"task.name={task} trains {article} {kind} (model.arch={fits}), not model.arch={arch} "
                           f"(a{'n' if fam.kind == 'encoder' else ''} {fam.kind})")
