"""lmforge: pretrain and fine-tune transformer language models with one loop, one config system
and self-explaining run directories. Start with `lmforge --help`, or from Python:

    import lmforge
    run = lmforge.pretrain("configs/bert-tiny.yaml", train__max_steps=200)
    lmforge.predict(run, ["The United [MASK] of America."])

The functions (lmforge/api.py) are imported on first use, so `import lmforge` stays light.

Packages, from the top down (each may import only those below it; pyproject.toml's import-linter
contracts check this in `make test`):
    cli, api, jobs, export, plan, doctor, lrfind   the verbs and the Python API
    tasks        objectives: model + batches + loss + metrics, and the registry of them
    eval         baselines, predictions, generation, reports
    train        the one loop, optimizer, schedules, logging, the machine
    distributed  DDP, FSDP2, DeepSpeed: applied to the model from outside
    runs         run directories, checkpoints, reading runs and Hugging Face directories
    models       the model families (bert, gpt, electra, classifier), Hugging Face name maps
    data         corpora, tokenizers, shards, masking, labelled data
    ops          fused kernels with their slow references
    config, errors, rng   the typed config, the one user-error type, seeded randomness
"""

__version__ = "0.1.0"

_API = ("pretrain", "finetune", "resume", "load", "predict", "generate", "classify", "evaluate", "report", "lr_find",
        "make_config", "Run")


def __getattr__(name: str):
    if name in _API:
        from lmforge import api

        return getattr(api, name)
    if name == "LmforgeError":
        from lmforge.errors import LmforgeError

        return LmforgeError
    if name == "register_objective":
        from lmforge.tasks.registry import register

        return register
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API, "LmforgeError", "register_objective"])
