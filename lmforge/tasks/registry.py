"""The objectives lmforge trains, by `task.name`: one line each, the objective in its own file.

An objective is a `Task` subclass (lmforge/tasks/base.py) that declares, beside its batches, loss,
metrics and evaluation, how a run of it starts (`create`), resumes (`reopen`), builds its model
(`build_model`), is loaded back (`load_run`) and is summed up (`headline`), and which verb trains
it (`verb`: pretrain or finetune). `pretrain`, `finetune`, the CLI and the loaders ask this
registry; none of them compares task names.

Built-in objectives are imported when first asked for (importing torch-heavy modules only when a
run needs them). Another objective, in a user's own file or package, is added with
`@register` on its class; `lmforge.register_objective` is the same function.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING

from lmforge.errors import LmforgeError

if TYPE_CHECKING:  # the registry hands out classes; it does not need them to be defined
    from lmforge.tasks.base import Task

# task.name -> "module:class". Adding a built-in objective: its file, and one line here.
BUILTIN = {
    "mlm": "lmforge.tasks.mlm:MaskedLMTask",
    "clm": "lmforge.tasks.clm:CausalLMTask",
    "electra": "lmforge.tasks.electra:ElectraTask",
    "distill-mlm": "lmforge.tasks.distill:DistillMLMTask",
    "classify": "lmforge.tasks.classify:ClassifyTask",
    "distill": "lmforge.tasks.distill:DistillClassifyTask",
}
VERBS = ("pretrain", "finetune")

_registered: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` the objective of task.name=cls.name. Registering a name again
    replaces the earlier class (a notebook cell run twice); a built-in name cannot be taken."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name` (its task.name)")
    if getattr(cls, "verb", None) not in VERBS:
        raise TypeError(f"{cls.__name__}.verb must be one of {', '.join(VERBS)}")
    if name in BUILTIN and BUILTIN[name] != f"{cls.__module__}:{cls.__qualname__}":
        raise ValueError(f"task.name={name} is a built-in objective; give {cls.__name__} another name")
    _registered[name] = cls
    return cls


def names(verb: str | None = None) -> list[str]:
    """The known task names (those `verb` trains, if given), built-in first."""
    every = list(BUILTIN) + [n for n in _registered if n not in BUILTIN]
    return [n for n in every if verb is None or objective(n).verb == verb]


def objective(name: str) -> type[Task]:
    """The objective class of task.name=`name`, or a one-line error naming the known ones."""
    if name not in _registered:
        if name not in BUILTIN:
            known = list(BUILTIN) + [n for n in _registered if n not in BUILTIN]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise LmforgeError(f"task.name={name!r} is not a known task; known: {', '.join(known)}{hint}")
        module, cls = BUILTIN[name].split(":")
        register(getattr(importlib.import_module(module), cls))
    return _registered[name]
