"""The Python API: what the `lmforge` command does, as functions for notebooks and scripts.

    import lmforge
    run = lmforge.pretrain("configs/bert-tiny.yaml", train__max_steps=200)  # or a Config, or None
    print(run.summary["val_loss"], run.dir)
    lmforge.predict(run, ["The United [MASK] of America."])
    model, tokenizer, config = lmforge.load(run.dir)

Overrides are given as keyword arguments, a double underscore for each dot of the config key
(`optim__lr=5e-4` is `optim.lr=5e-4`), or as "key=value" strings in `overrides`; they go through
the same checks as on the command line. Progress bars are tqdm's `auto` bars: widgets in Jupyter,
text in a terminal. Bad input raises `lmforge.LmforgeError` with the same one-line message the
command prints. The CLI (lmforge/cli.py) is a thin layer over these functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lmforge import jobs
from lmforge.config import Config, load_config, to_dict
from lmforge.errors import LmforgeError

ConfigLike = Union[str, Path, Config, None]


@dataclass
class Run:
    """A run directory and what it reports. `summary` is summary.json ({} on a data-parallel rank
    other than 0, and for a run that has not finished)."""

    dir: Path
    summary: dict
    config: Config

    @classmethod
    def open(cls, run_dir: str | Path) -> "Run":
        """An existing run directory."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise LmforgeError(f"{run_dir} is not an lmforge run directory (no config.yaml)")
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        return cls(run_dir, summary, load_config(run_dir / "config.yaml", migrate_run=True))

    def metrics(self, split: Optional[str] = None) -> list[dict]:
        """The records of metrics.jsonl (of one split, "train" or "validation", if given)."""
        from lmforge.train.log import read_metrics

        records = read_metrics(self.dir)
        return [r for r in records if split is None or r.get("split") == split]

    def load(self):
        """(model, tokenizer, config) of this run's newest checkpoint (a classifier run's model:
        interpolated toward its start where classify.wise_alpha did so): `lmforge.load(run.dir)`."""
        return load(self.dir)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.summary.items() if k in ("val_loss", "val_accuracy", "test_accuracy", "steps")}
        return f"Run({str(self.dir)!r}, task={self.config.task.name}, {shown})"


def _overrides(overrides: Optional[list[str]], keywords: dict[str, Any]) -> list[str]:
    """"key=value" strings from `overrides` and from keyword arguments (`train__max_steps=5`)."""
    out = list(overrides or [])
    for key, value in keywords.items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif value is None:
            value = "null"
        out.append(f"{key.replace('__', '.')}={value}")
    return out


def make_config(config: ConfigLike = None, overrides: Optional[list[str]] = None, *,
                default_task: Optional[str] = None, **keywords: Any) -> Config:
    """A checked Config from a YAML path (or None for the defaults, or a Config to start from)
    and overrides, exactly as `lmforge pretrain --config FILE key=value ...` builds it (the
    sections' checks, then its objective's `check_config`).
    `default_task`: the task.name when neither the file nor the overrides set one (finetune:
    classify)."""
    given = _overrides(overrides, keywords)
    if isinstance(config, Config):
        import tempfile

        from lmforge.config import dump_yaml
        with tempfile.TemporaryDirectory() as tmp:  # the same path as a file: every check runs again
            path = Path(tmp) / "config.yaml"
            path.write_text(dump_yaml(config))
            return make_config(path, given, default_task=None)
    if default_task is not None and not _sets_task_name(config, given):
        given = [f"task.name={default_task}", *given]
    cfg = load_config(config, given)
    jobs.objective_for(cfg, None)  # a known task.name, and what its objective needs (check_config)
    return cfg


def _sets_task_name(config: ConfigLike, overrides: list[str]) -> bool:
    """Whether the YAML file or the overrides set task.name."""
    if any(o.split("=", 1)[0].strip() == "task.name" for o in overrides):
        return True
    if config is None or not Path(config).is_file():
        return False  # (a missing file is reported by load_config)
    import yaml

    try:
        data = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError):
        return False  # reported by load_config
    return isinstance(data, dict) and isinstance(data.get("task"), dict) and "name" in data["task"]


def pretrain(config: ConfigLike = None, overrides: Optional[list[str]] = None, **keywords: Any) -> Run:
    """Pretrain (task.name=mlm by default; clm, electra, distill-mlm or a registered objective) and
    return the finished Run. Same as `lmforge pretrain --config CONFIG key=value ...`."""
    cfg = make_config(config, overrides, **keywords)
    run_dir, summary = jobs.start(cfg, "pretrain")
    return Run(run_dir, summary, cfg)


def finetune(config: ConfigLike = None, overrides: Optional[list[str]] = None, **keywords: Any) -> Run:
    """Fine-tune a classifier (task.name=classify unless the config or overrides say distill or a
    registered fine-tuning objective). Same as `lmforge finetune --config CONFIG key=value ...`."""
    cfg = make_config(config, overrides, default_task="classify", **keywords)
    run_dir, summary = jobs.start(cfg, "finetune")
    return Run(run_dir, summary, cfg)


def resume(run: Union[Run, str, Path], overrides: Optional[list[str]] = None, *, verb: Optional[str] = None,
           **keywords: Any) -> Run:
    """Continue a run from its newest checkpoint (`train.max_steps=N` and other train.* keys may
    change); pretraining or fine-tuning, whichever the run is (`verb`: refuse the other kind)."""
    run_dir = Path(run.dir if isinstance(run, Run) else run)
    run_dir, summary = jobs.resume_run(run_dir, _overrides(overrides, keywords), verb)
    return Run(run_dir, summary, load_config(run_dir / "config.yaml", migrate_run=True))


def _lm_kind(loaded) -> Optional[str]:
    """"encoder" or "decoder" when `loaded.model` is its family's masked or causal LM (not a
    classifier, not a plug-in objective's own model), else None."""
    from lmforge.models.registry import ARCHS, family

    if loaded.config.arch not in ARCHS:
        return None
    fam = family(loaded.config.arch)
    return fam.kind if isinstance(loaded.model, fam.lm) else None


def _kind(loaded) -> str:
    """How a loaded model is named in an error: 'a bert model', 'a llama model', 'a MajorityModel'."""
    return f"a {loaded.config.arch} model" if _lm_kind(loaded) else f"a {type(loaded.model).__name__}"


def _path(run: Union[Run, str, Path]) -> Path:
    return Path(run.dir if isinstance(run, Run) else run)


def load(run: Union[Run, str, Path]) -> tuple[torch.nn.Module, Any, Any]:
    """(model in eval mode, tokenizer, config) of an lmforge run (any objective: a masked LM, a
    GPT, a classifier) or a transformers BERT / GPT-2 directory. `config` is the run's Config, or
    the model's ModelConfig for a transformers directory."""
    from lmforge.tasks.loading import load_model, run_config

    path = _path(run)
    loaded = load_model(path, mlm_head_required=False, classifier_ok=True)
    return loaded.model, loaded.tokenizer, run_config(path) or loaded.config


def predict(run: Union[Run, str, Path], texts: Union[str, list[str]], top_k: int = 5) -> list[list[list[dict]]]:
    """Fill-mask with a masked-LM run (BERT, ModernBERT, DeBERTa) or transformers directory: for
    each text, for each [MASK], the
    top_k {"token", "id", "prob"} candidates. Same as `lmforge predict RUN TEXT...`."""
    from lmforge.eval.predict import fill_mask
    from lmforge.tasks.loading import load_model

    texts = [texts] if isinstance(texts, str) else list(texts)
    loaded = load_model(_path(run))
    if _lm_kind(loaded) != "encoder":
        raise LmforgeError(f"{_path(run)} is {_kind(loaded)}; `predict` fills in [MASK] with a masked-LM run (BERT, "
                           f"ModernBERT, DeBERTa; use `lmforge generate` to continue text)")
    return fill_mask(loaded.model, loaded.tokenizer, texts, top_k=top_k)


def generate(run: Union[Run, str, Path], prompt: str, *, max_new_tokens: int = 100, temperature: float = 0.8,
             top_k: Optional[int] = 50, top_p: Optional[float] = None, num_samples: int = 1,
             seed: int = 0, with_token_counts: bool = False) -> list:
    """Continuations of `prompt` (without it) from a GPT run or GPT-2 directory, KV-cached,
    stopping at <|endoftext|>: one string per sample (with `with_token_counts`, (text, number of
    new tokens) pairs). Same as `lmforge generate RUN PROMPT`."""
    from lmforge.eval.generate import check_sampling
    from lmforge.eval.generate import generate as sample
    from lmforge.tasks.loading import load_model

    check_sampling(max_new_tokens, temperature, top_k, top_p, num_samples)
    loaded = load_model(_path(run))
    if _lm_kind(loaded) != "decoder":
        raise LmforgeError(f"{_path(run)} is {_kind(loaded)}; `generate` needs a causal-LM run (GPT, Llama; use "
                           f"`lmforge predict` for fill-mask)")
    tok = loaded.tokenizer
    samples = sample(loaded.model, tok.encode(prompt), max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, num_samples=num_samples, seed=seed, eot_id=tok.eot_id)
    return [(tok.decode(ids), len(ids)) if with_token_counts else tok.decode(ids) for ids in samples]


def classify(run: Union[Run, str, Path], texts: Union[str, list[str]]) -> list[dict]:
    """Label, probability of that label and rating of each text, with a fine-tuning run: one
    dict per text ({"error": ...} for an empty one). Same as `lmforge classify RUN --text ...`."""
    from lmforge.eval.classify import classify_texts
    from lmforge.tasks.classify import load_classifier, read_labels, read_temperature

    texts = [texts] if isinstance(texts, str) else list(texts)
    run_dir = _path(run)
    cfg, tokenizer, model = load_classifier(run_dir)
    return classify_texts(model, tokenizer, texts, cfg.data.seq_len, labels=read_labels(run_dir),
                          temperature=read_temperature(run_dir))


def evaluate(run: Union[Run, str, Path], dataset: str, out: Optional[str | Path] = None, write: bool = True) -> dict:
    """A fine-tuning run's classifier measured on a labelled dataset (movie-reviews' test split,
    vader-tweets, vader-nyt, or a .csv/.tsv/.jsonl file with text and label columns): accuracy,
    macro_f1, per-class f1, ece (15 bins, at the run's fitted temperature) and ece_uncalibrated,
    reliability bins, confusion, accuracy_by_length, majority_accuracy, rating_mae where the data
    has ratings. Writes the JSON and two pictures under OUT (default RUN/evaluations) unless
    write=False. Same as `lmforge evaluate RUN --dataset NAME|FILE`."""
    from lmforge.tasks.classify import evaluate_run

    return evaluate_run(_path(run), dataset, out, write)


def lr_find(config: ConfigLike = None, overrides: Optional[list[str]] = None, *, out: str | Path = "lr-find.png",
            steps: int = 200, start: float = 1e-7, end: float = 10.0, **keywords: Any):
    """The learning-rate range test on the config's own data and objective (lmforge/lrfind.py):
    a RangeTest with .lrs, .losses, .smoothed, .suggested_lr (the steepest-descent point),
    .minimum_lr and .picture (OUT, or the next free name beside it). No run directory is made.
    Same as `lmforge lr-find --config FILE key=value ...`."""
    from lmforge.lrfind import lr_find as find

    cfg = make_config(config, overrides, **keywords)
    return find(cfg, str(config) if isinstance(config, (str, Path)) else "", out, steps=steps, start=start, end=end)


def report(runs: Union[Run, str, Path, list], out: str | Path = "lmforge-report") -> tuple[Path, Path]:
    """One picture and an HTML page comparing runs: (OUT.png, OUT.html). Same as `lmforge report`."""
    from lmforge.eval.report import compare_runs

    runs = runs if isinstance(runs, list) else [runs]
    return compare_runs([_path(r) for r in runs], Path(out))


def config_dict(run: Union[Run, str, Path]) -> dict:
    """A run's resolved config as a plain dict."""
    return to_dict(load_config(_path(run) / "config.yaml", migrate_run=True))
