"""What the rest of lmforge needs to know of a model family besides its nn.Module.

Each family's file (bert.py, gpt.py, llama.py, modernbert.py, deberta.py) ends with one
`FAMILY = Family(...)`, and lmforge/models/registry.py lists it by `model.arch`. Tasks ask for a
kind ("encoder": a masked LM, fine-tuned as a classifier; "decoder": a causal LM that generates),
export and the transformers reader go through `to_hf` / `from_hf`, so none of them names a family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lmforge.config import ModelConfig

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SpecialIds:
    """The tokenizer's special-token ids a transformers config.json records (None: not in the vocabulary)."""

    pad: Optional[int] = None
    cls: Optional[int] = None
    sep: Optional[int] = None
    mask: Optional[int] = None
    eot: Optional[int] = None  # a causal LM's end of text (bos = eos for GPT-2's tokenizer)


@dataclass(frozen=True)
class Family:
    arch: str  # model.arch
    kind: str  # "encoder" or "decoder"
    lm: Callable[[ModelConfig], torch.nn.Module]  # the masked / causal LM, freshly initialised
    hf_model_types: tuple[str, ...]  # transformers config.json `model_type`s read as this family
    # (lmforge tensors, config, special ids, encoder_only) -> (transformers config.json, tensors under
    # transformers' names). encoder_only: just the encoder (a fine-tuned classifier's), e.g. `BertModel`.
    to_hf: Callable[[Tensors, ModelConfig, SpecialIds, bool], tuple[dict, Tensors]]
    # (config.json, tensors) -> (ModelConfig, tensors under lmforge's names, names not used)
    from_hf: Callable[[dict, Tensors], tuple[ModelConfig, Tensors, list[str]]]
    # why a model of this config cannot be written as a transformers model (None: it can)
    export_refusal: Callable[[ModelConfig], Optional[str]] = lambda cfg: None

    @property
    def encoder_attr(self) -> str:
        """The attribute of the LM holding its encoder (an encoder family's; also the state-dict prefix)."""
        return getattr(self.lm, "encoder_attr")
