"""Hugging Face transformers layouts <-> lmforge's models: tensor-name maps and config maps only.

Reading a transformers directory's files (safely: no pickled code) is lmforge/runs/readers.py's;
writing one is lmforge/export.py's. The maps here turn transformers' names and config.json into
lmforge's and back: BERT (both `BertModel`, encoder only, e.g. the bundled MiniLM: names without a
"bert." prefix, and `BertForMaskedLM` / `BertForPreTraining` layouts), ELECTRA's discriminator and
GPT-2.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

# (lmforge name pattern, transformers name pattern) for one BertForMaskedLM; `{i}` is a layer.
_BERT_NAMES = [
    ("bert.embeddings.token.weight", "bert.embeddings.word_embeddings.weight"),
    ("bert.embeddings.position.weight", "bert.embeddings.position_embeddings.weight"),
    ("bert.embeddings.token_type.weight", "bert.embeddings.token_type_embeddings.weight"),
    ("bert.embeddings.norm.{p}", "bert.embeddings.LayerNorm.{p}"),
    ("bert.layers.{i}.attention.query.{p}", "bert.encoder.layer.{i}.attention.self.query.{p}"),
    ("bert.layers.{i}.attention.key.{p}", "bert.encoder.layer.{i}.attention.self.key.{p}"),
    ("bert.layers.{i}.attention.value.{p}", "bert.encoder.layer.{i}.attention.self.value.{p}"),
    ("bert.layers.{i}.attention.out.{p}", "bert.encoder.layer.{i}.attention.output.dense.{p}"),
    ("bert.layers.{i}.attention_norm.{p}", "bert.encoder.layer.{i}.attention.output.LayerNorm.{p}"),
    ("bert.layers.{i}.ffn_in.{p}", "bert.encoder.layer.{i}.intermediate.dense.{p}"),
    ("bert.layers.{i}.ffn_out.{p}", "bert.encoder.layer.{i}.output.dense.{p}"),
    ("bert.layers.{i}.ffn_norm.{p}", "bert.encoder.layer.{i}.output.LayerNorm.{p}"),
    ("mlm_head.dense.{p}", "cls.predictions.transform.dense.{p}"),
    ("mlm_head.norm.{p}", "cls.predictions.transform.LayerNorm.{p}"),
    ("mlm_head.bias", "cls.predictions.bias"),
]
# transformers tensors with no lmforge counterpart: buffers, the tied decoder, NSP/pooler heads.
_IGNORED = re.compile(r"(position_ids|cls\.predictions\.decoder\.(weight|bias)|cls\.seq_relationship\..*|"
                      r"bert\.pooler\..*)$")


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(regex + "$")


class NameMap:
    """One model family's tensor names, lmforge <-> transformers, from (lmforge, transformers)
    templates; the one rename loop each way that every family uses."""

    def __init__(self, names: list[tuple[str, str]], ignored: re.Pattern, family: str, prefixes: tuple[str, ...]):
        self.to_hf_table = [(_pattern(ours), theirs) for ours, theirs in names]
        self.from_hf_table = [(_pattern(theirs), ours) for ours, theirs in names]
        self.ignored, self.family = ignored, family
        self.prefixes = prefixes  # transformers' top-level prefixes; an encoder-only file lacks the first

    def to_hf(self, state: dict[str, torch.Tensor], transform=lambda hf_name, tensor: tensor
              ) -> dict[str, torch.Tensor]:
        """lmforge tensors -> transformers names (`transform(hf_name, tensor)` e.g. transposes)."""
        out = {}
        for name, tensor in state.items():
            hf_name = _rename(name, self.to_hf_table)
            if hf_name is None:
                raise KeyError(f"no transformers name for lmforge tensor {name}")
            out[hf_name] = transform(hf_name, tensor).contiguous()
        return out

    def from_hf(self, state: dict[str, torch.Tensor], transform=lambda full, tensor: tensor
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """transformers tensors (with or without the family's top-level prefix) -> lmforge names.
        Returns (tensors, names that were ignored: buffers, tied or unused heads)."""
        out, ignored = {}, []
        for name, tensor in state.items():
            full = name if name.startswith(self.prefixes) else self.prefixes[0] + name
            ours = _rename(full, self.from_hf_table)
            if ours is None:
                if not self.ignored.search(full):
                    raise LmforgeError(f"unexpected tensor '{name}' in the Hugging Face checkpoint; is it a "
                                       f"{self.family}?")
                ignored.append(name)
                continue
            out[ours] = transform(full, tensor)
        return out, ignored


BERT_NAMES = NameMap(_BERT_NAMES, _IGNORED, "BERT", ("bert.", "cls."))


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> Optional[str]:
    for pattern, template in table:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmforge BertForMaskedLM tensors -> transformers BertForMaskedLM names (decoder stays tied)."""
    return BERT_NAMES.to_hf(state)


def electra_to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An lmforge ELECTRA's discriminator (`bert.*`, `rtd_dense`, `rtd_out`) -> transformers'
    ElectraForPreTraining names: BERT's encoder names under "electra." (with the embedding size
    equal to the hidden size there is no embeddings_project), and its discriminator_predictions
    head. The generator is not exported."""
    out = {"electra." + k[len("bert."):]: v
           for k, v in to_hf_state_dict({k: v for k, v in state.items() if k.startswith("bert.")}).items()}
    for ours, theirs in (("rtd_dense", "dense"), ("rtd_out", "dense_prediction")):
        for p in ("weight", "bias"):
            out[f"discriminator_predictions.{theirs}.{p}"] = state[f"{ours}.{p}"].contiguous()
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers BERT tensors (with or without the "bert." prefix) -> lmforge names.
    Returns (tensors, names that were ignored)."""
    return BERT_NAMES.from_hf(state)


def model_config_from_hf(hf: dict, dropout: Optional[float] = None) -> ModelConfig:
    """A transformers BertConfig dict -> ModelConfig, refusing variants lmforge does not implement."""
    if hf.get("model_type") != "bert":
        raise LmforgeError(f"model_type {hf.get('model_type')!r} is not supported here; expected a BERT (model_type "
                           f"'bert')")
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise LmforgeError("only BERTs with hidden_act 'gelu' and absolute position embeddings are supported")
    require_keys(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings")
    return ModelConfig(
        arch="bert", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
        dropout=hf.get("hidden_dropout_prob", 0.1) if dropout is None else dropout,
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), init_std=hf.get("initializer_range", 0.02))


def require_keys(hf: dict, *keys: str) -> None:
    """A transformers config.json without one of the sizes a model is built from: one line."""
    lacking = [k for k in keys if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool)]
    if lacking:
        raise LmforgeError(f"the Hugging Face config.json lacks {', '.join(lacking)} (a whole number each); use "
                           f"the config.json saved with the model")


def hf_config_from_model(cfg: ModelConfig, architecture: str = "BertForMaskedLM", pad_token_id: int = 0) -> dict:
    return {
        "architectures": [architecture], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout, "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size, "initializer_range": cfg.init_std, "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": pad_token_id, "position_embedding_type": "absolute", "tie_word_embeddings": True,
    }


# ---------------------------------------------------------------------------------------------
# GPT-2: transformers' GPT2LMHeadModel <-> lmforge's GPT. GPT-2 stores its matmuls as Conv1D,
# weight shaped (in, out): the transpose of nn.Linear's (out, in). The token embedding is
# padded to a multiple of 64 rows in lmforge and cut back to the real vocabulary on export.

_GPT2_NAMES = [
    ("position.weight", "transformer.wpe.weight"),
    ("blocks.{i}.attn_norm.{p}", "transformer.h.{i}.ln_1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "transformer.h.{i}.attn.c_attn.{p}"),
    ("blocks.{i}.attn.out.{p}", "transformer.h.{i}.attn.c_proj.{p}"),
    ("blocks.{i}.mlp_norm.{p}", "transformer.h.{i}.ln_2.{p}"),
    ("blocks.{i}.mlp.up.{p}", "transformer.h.{i}.mlp.c_fc.{p}"),
    ("blocks.{i}.mlp.down.{p}", "transformer.h.{i}.mlp.c_proj.{p}"),
    ("final_norm.{p}", "transformer.ln_f.{p}"),
]
_GPT2_CONV1D = re.compile(r"(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_GPT2_IGNORED = re.compile(r"(lm_head\.weight|attn\.bias|attn\.masked_bias)$")
GPT2_NAMES = NameMap(_GPT2_NAMES, _GPT2_IGNORED, "GPT-2", ("transformer.", "lm_head."))


def _conv1d(hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D weights are the transpose of nn.Linear's (both ways)."""
    return tensor.t() if _GPT2_CONV1D.search(hf_name) else tensor


def gpt2_to_hf_state_dict(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": state["token.weight"][:vocab_size].contiguous()}
    out.update(GPT2_NAMES.to_hf({k: v for k, v in state.items() if k != "token.weight"}, _conv1d))
    return out


def gpt2_from_hf_state_dict(state: dict[str, torch.Tensor], padded_vocab: int
                            ) -> tuple[dict[str, torch.Tensor], list[str]]:
    embedding = {"wte.weight", "transformer.wte.weight"}
    out, ignored = GPT2_NAMES.from_hf({k: v for k, v in state.items() if k not in embedding}, _conv1d)
    for name in embedding & set(state):  # the token embedding, padded to lmforge's row count
        tensor = state[name]
        padded = torch.zeros(padded_vocab, tensor.size(1), dtype=tensor.dtype)
        padded[: tensor.size(0)] = tensor
        out["token.weight"] = padded
    return out, ignored


def gpt2_model_config_from_hf(hf: dict, dropout: Optional[float] = None) -> ModelConfig:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise LmforgeError(f"GPT-2 activation {hf.get('activation_function')!r} is not supported (gelu_new only)")
    require_keys(hf, "vocab_size", "n_embd", "n_layer", "n_head", "n_positions")
    h = hf["n_embd"]
    return ModelConfig(arch="gpt", vocab_size=hf["vocab_size"], hidden_size=h, num_layers=hf["n_layer"],
                       num_heads=hf["n_head"], intermediate_size=hf.get("n_inner") or 4 * h,
                       max_position_embeddings=hf["n_positions"], type_vocab_size=1,
                       dropout=hf.get("resid_pdrop", 0.1) if dropout is None else dropout,
                       layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02))


def hf_gpt2_config_from_model(cfg: ModelConfig, eot_id: Optional[int]) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
        "n_inner": cfg.intermediate_size, "n_positions": cfg.max_position_embeddings,
        "activation_function": "gelu_new", "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout, "layer_norm_epsilon": cfg.layer_norm_eps, "initializer_range": cfg.init_std,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "tie_word_embeddings": True,
    }


# ---------------------------------------------------------------------------------------------
# The Family interop functions (lmforge/models/family.py) of BERT and GPT-2.

def bert_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, special, encoder_only: bool
               ) -> tuple[dict, dict[str, torch.Tensor]]:
    """A BertForMaskedLM (the pooler and NSP head of a mlm.nsp run are left out: transformers'
    BertForMaskedLM has none), or with `encoder_only` a BertModel (names without "bert.")."""
    if encoder_only:
        tensors = {k[len("bert."):]: v for k, v in to_hf_state_dict(
            {k: v for k, v in state.items() if k.startswith("bert.")}).items()}
        return hf_config_from_model(cfg, "BertModel", pad_token_id=special.pad), tensors
    tensors = to_hf_state_dict({k: v for k, v in state.items() if not k.startswith(("pooler.", "nsp_head."))})
    return hf_config_from_model(cfg, "BertForMaskedLM", pad_token_id=special.pad), tensors


def bert_from_hf(hf: dict, state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str]]:
    cfg = model_config_from_hf(hf)
    tensors, ignored = from_hf_state_dict(state)
    return cfg, tensors, ignored


def gpt2_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, special, encoder_only: bool
               ) -> tuple[dict, dict[str, torch.Tensor]]:
    return hf_gpt2_config_from_model(cfg, special.eot), gpt2_to_hf_state_dict(state, cfg.vocab_size)


def gpt2_from_hf(hf: dict, state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str]]:
    cfg = gpt2_model_config_from_hf(hf)
    padded = ((cfg.vocab_size + 63) // 64) * 64  # lmforge/models/gpt.py padded_vocab_size
    tensors, ignored = gpt2_from_hf_state_dict(state, padded)
    return cfg, tensors, ignored
