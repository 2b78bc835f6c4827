"""Load a model back from wherever the user points: an lmforge run directory or a transformers one.

An lmforge run is read by its own objective (`Task.load_run`, found in the registry by the run's
task.name), so a new objective is loadable with no change here; a transformers BERT or GPT-2
directory is read by lmforge/runs/readers.py. Both give a `LoadedModel`: the model in eval mode,
its `ModelConfig` and its tokenizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from lmforge.config import Config, ModelConfig, load_config
from lmforge.data.tokenizers import TextTokenizer, minilm_model_dir
from lmforge.errors import LmforgeError
from lmforge.runs.readers import LoadedModel, is_hf_dir, load_hf_model
from lmforge.tasks import registry

BUNDLED_MODELS = {"minilm": minilm_model_dir}  # names model.init_from accepts besides paths
# What a run starting from model.init_from keeps of its own model section (the source gives the
# family and shape): dropout and the keys about starting and fine-tuning
KEPT_FROM_CONFIG = ("dropout", "init_from", "init_std", "reinit_layers", "next_sentence_head", "classifier_pooling")


def take_source_shape(cfg: Config, source: ModelConfig) -> None:
    """cfg.model becomes `source`'s family and shape, but for KEPT_FROM_CONFIG."""
    for f in dataclasses.fields(ModelConfig):
        if f.name not in KEPT_FROM_CONFIG:
            setattr(cfg.model, f.name, getattr(source, f.name))


def same_vocabulary(a: TextTokenizer, b: TextTokenizer) -> bool:
    return a.tok.get_vocab(with_added_tokens=True) == b.tok.get_vocab(with_added_tokens=True)


def source_path(spec: str, cache_dir: Optional[str] = None) -> Path:
    """Where model.init_from=`spec` is: a bundled model by name (minilm), else the path given."""
    return BUNDLED_MODELS[spec](cache_dir) if spec in BUNDLED_MODELS else Path(spec).expanduser()


def run_config(path: str | Path) -> Config | None:
    """The config of the lmforge run at `path`, or None when `path` is not a run directory."""
    path = Path(path)
    return load_config(path / "config.yaml", migrate_run=True) if (path / "config.yaml").is_file() else None


def load_model(path: str | Path, *, mlm_head_required: bool = True, classifier_ok: bool = False) -> LoadedModel:
    """A language model (BERT masked LM, GPT), its config and tokenizer, from an lmforge run
    directory (read by its objective) or a transformers BERT or GPT-2 directory. A fine-tuning
    run's classifier is refused unless `classifier_ok` (export, the Python API's `load`).
    `mlm_head_required`: say on stderr when a masked LM's head had to be initialised here (an
    encoder-only source), since fill-mask is then noise."""
    path = Path(path)
    cfg = run_config(path)
    if cfg is not None:
        objective = registry.objective(cfg.task.name)
        if objective.loads_as == "classifier" and not classifier_ok:
            raise LmforgeError(f"{path} is a fine-tuning run: use `lmforge classify` with it, or `lmforge export` "
                               f"for its encoder")
        return objective.load_run(path, cfg, mlm_head_required=mlm_head_required)
    if is_hf_dir(path):
        return load_hf_model(path, mlm_head_required=mlm_head_required)
    raise LmforgeError(f"{path} is neither an lmforge run directory (config.yaml) nor a Hugging Face model "
                       f"directory (config.json + model.safetensors or pytorch_model.bin)")
