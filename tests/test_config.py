"""Config: YAML + dotted overrides, type checks, 'did you mean', validation messages; keys that
moved to their objective's section, plug-in sections and task.plugin."""

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest
import yaml

from conftest import tiny_config
from lmforge import api
from lmforge.cli import main
from lmforge.config import MOVED, all_keys, dump_yaml, load_config, register_section, to_dict
from lmforge.errors import LmforgeError
from lmforge.jobs import pretrain
from lmforge.tasks import registry
from lmforge.train.machine import check_environment

REQUIRED_KEYS = ["train.max_steps", "train.max_time_s", "train.seed", "train.eval_every", "train.checkpoint_every",
                 "train.batch_size", "train.grad_accum_steps", "optim.lr", "optim.weight_decay", "optim.warmup_frac",
                 "model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_heads",
                 "model.intermediate_size", "model.max_position_embeddings", "model.type_vocab_size",
                 "model.dropout", "data.corpus", "data.tokenizer", "data.seq_len", "out_dir"]


def test_every_contract_key_exists_and_out_dir_defaults_to_runs():
    keys = set(all_keys())
    assert [k for k in REQUIRED_KEYS if k not in keys] == []
    assert load_config().out_dir == "runs/"


def test_overrides_are_typed_and_win_over_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 10\n  batch_size: 4\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(path, ["train.max_steps=50", "optim.lr=3e-4", "train.max_time_s=null", "optim.weight_decay=0"])
    assert cfg.train.max_steps == 50 and cfg.train.batch_size == 4
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.weight_decay, float)
    assert cfg.train.max_time_s is None


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(LmforgeError, match=r"unknown config key 'train.max_step'; did you mean 'train.max_steps'"):
        load_config(None, ["train.max_step=3"])
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(LmforgeError, match="did you mean 'model.hidden_size'"):
        load_config(path)


def test_wrong_types_and_impossible_shapes_are_one_line_errors():
    with pytest.raises(LmforgeError, match="train.max_steps' wants int, got 'many'"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(LmforgeError, match="model.num_heads=3 does not divide model.hidden_size=128"):
        load_config(None, ["model.num_heads=3"])
    with pytest.raises(LmforgeError, match="data.seq_len=1024 exceeds model.max_position_embeddings=512"):
        load_config(None, ["data.seq_len=1024"])
    with pytest.raises(LmforgeError, match="not of the form key=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(LmforgeError, match="config file not found"):
        load_config("/nonexistent.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "model.vocab_size=1000", "optim.max_grad_norm=1.0"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("out_dir: !!python/object/apply:os.system ['echo pwned > %s']\n" % (tmp_path / "pwned"))
    with pytest.raises(LmforgeError, match="not valid YAML"):
        load_config(path)
    assert not (tmp_path / "pwned").exists()


# -- keys that moved to their objective's section ------------------------------------------------

def test_a_moved_key_is_a_one_line_error_naming_its_new_key_in_an_override_and_in_yaml(tmp_path):
    with pytest.raises(LmforgeError, match=r"^config key 'task.nsp' moved to 'mlm.nsp'; write mlm.nsp=\.\.\. "):
        load_config(None, ["task.nsp=true"])
    with pytest.raises(LmforgeError, match="config key 'loss.soft_weight' moved to 'distill.soft_weight'"):
        load_config(None, ["loss.soft_weight=1"])
    path = tmp_path / "c.yaml"
    path.write_text("task:\n  name: electra\n  rtd_weight: 20\n")
    with pytest.raises(LmforgeError, match="'task.rtd_weight' moved to 'electra.rtd_weight'.*`rtd_weight:` under "
                                           "`electra:`"):
        load_config(path)
    path.write_text("loss:\n  rating_weight: 0.1\n")
    with pytest.raises(LmforgeError, match="'loss.rating_weight' moved to 'classify.rating_weight'"):
        load_config(path)
    with pytest.raises(LmforgeError, match="config section 'loss' is gone; its keys moved: loss.rating_weight to "
                                           "classify.rating_weight"):
        load_config(None, ["loss=1"])
    assert all(new in all_keys() and old not in all_keys() for old, new in MOVED.items())


def _old_layout(data: dict) -> dict:
    """A config.yaml mapping as lmforge wrote it before the keys moved: task.* and loss.*."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    data["task"].pop("plugin", None)
    data["loss"] = {}
    for old, new in MOVED.items():
        (section, key), (new_section, new_key) = old.split("."), new.split(".")
        data[section][key] = data[new_section].pop(new_key)
    return {k: v for k, v in data.items() if v != {}}


def test_an_old_layout_run_config_loads_with_its_keys_in_their_new_sections(tmp_path):
    today = load_config(None, ["mlm.nsp=true", "mlm.mask_prob=0.2", "clm.sample_tokens=7", "classify.rating_weight=0.3",
                               "distill.soft_weight=4", "electra.share_embeddings=false"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_old_layout(to_dict(today)), sort_keys=False))
    assert "nsp: true" in path.read_text() and "loss:" in path.read_text()
    with pytest.raises(LmforgeError, match="moved to"):  # a user's own file is not migrated
        load_config(path)
    assert load_config(path, migrate_run=True) == today  # a run directory's own config.yaml is


def test_a_run_directory_written_before_the_keys_moved_still_resumes_and_loads(tiny_prepared, tmp_path):
    run_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "runs", "mlm.mask_prob=0.2", "train.max_steps=2",
                                      "train.eval_every=2", "train.checkpoint_every=2"))
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(_old_layout(yaml.safe_load(config.read_text())), sort_keys=False))
    assert "mask_prob: 0.2" in config.read_text().split("task:")[1].split("optim:")[0]
    assert api.Run.open(run_dir).config.mlm.mask_prob == 0.2
    assert api.load(run_dir)[2].mlm.mask_prob == 0.2 and api.config_dict(run_dir)["mlm"]["mask_prob"] == 0.2
    assert len(api.predict(run_dir, ["the [MASK] is here"])[0]) == 1
    run = api.resume(run_dir, train__max_steps=4)
    assert run.summary["steps"] == 4 and run.config.mlm.mask_prob == 0.2
    assert yaml.safe_load(config.read_text())["mlm"]["mask_prob"] == 0.2  # written back in today's layout


# -- environment checks: when a run starts, not in validation --------------------------------------

def test_a_missing_wandb_package_is_refused_when_a_run_starts_not_by_validation(tiny_prepared, tmp_path, monkeypatch,
                                                                                capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    cfg = load_config(None, ["log.wandb=true"])  # a config is checked the same on any machine
    with pytest.raises(LmforgeError, match="log.wandb=true needs the wandb package"):
        check_environment(cfg, 1)
    assert main(["pretrain", f"data.corpus={tiny_prepared.folder}", "data.seq_len=32", "log.wandb=true",
                 f"out_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: log.wandb=true needs the wandb package") and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before the run directory


# -- plug-in sections and task.plugin -------------------------------------------------------------

@pytest.fixture
def plugin_registries(monkeypatch):
    """What a test registers (config sections, objectives, imported plug-ins) is gone after it."""
    from lmforge import config

    monkeypatch.setattr(config, "_PLUGIN_SECTIONS", dict(config._PLUGIN_SECTIONS))
    monkeypatch.setattr(config, "_IMPORTED_PLUGINS", dict(config._IMPORTED_PLUGINS))
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))


@dataclass
class ToySection:
    width: int = 3  # bits per row
    label: str = "bits"
    rate: Optional[float] = None

    def check(self, cfg) -> None:
        if self.width < 1:
            raise LmforgeError(f"toy.width={self.width} must be at least 1")


def test_a_registered_section_works_like_a_built_in_one(plugin_registries, tmp_path, capsys):
    register_section("toy", ToySection)
    cfg = load_config(None, ["toy.width=5", "toy.label=1.10"])
    assert cfg.toy == ToySection(width=5, label="1.10")  # a name kept as typed, as for any str key
    path = tmp_path / "c.yaml"
    path.write_text("toy:\n  width: 7\n  rate: 3e-4\n")
    assert load_config(path).toy == ToySection(width=7, rate=3e-4)
    with pytest.raises(LmforgeError, match="config key 'toy.width' wants int, got 'many'; e.g. toy.width=3"):
        load_config(None, ["toy.width=many"])
    with pytest.raises(LmforgeError, match="did you mean 'toy.width'"):
        load_config(None, ["toy.widht=5"])
    with pytest.raises(LmforgeError, match="^toy.width=0 must be at least 1$"):  # its own check, from validate
        load_config(None, ["toy.width=0"])
    # dump and load: config.yaml holds it (after the built-in sections) and reads it back
    assert list(to_dict(cfg))[-2:] == ["toy", "out_dir"]
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg
    # the command line: --list-keys, --print-config, a one-line refusal
    assert main(["pretrain", "--list-keys"]) == 0
    assert {"toy.width", "toy.label", "toy.rate"} <= set(capsys.readouterr().out.split())
    assert main(["pretrain", "--print-config", "toy.width=9"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["toy"] == {"width": 9, "label": "bits", "rate": None}
    assert main(["pretrain", "toy.width=0"]) == 2
    assert capsys.readouterr().err == "error: toy.width=0 must be at least 1\n"
    with pytest.raises(ValueError, match="not one of"):
        register_section("model", ToySection)  # a built-in section's name
    with pytest.raises(TypeError, match="needs a dataclass"):
        register_section("bits", dict)


PLUGIN = """
from dataclasses import dataclass

import lmforge
from lmforge.config import register_section
from lmforge.errors import LmforgeError


@dataclass
class CoinsConfig:
    coins: int = 4


register_section("coins", CoinsConfig)


@lmforge.register_objective
class CoinsObjective:  # what the registry asks of an objective here; a real one is a lmforge.tasks.base.Task
    name, verb = "coins", "pretrain"

    @classmethod
    def check_config(cls, cfg):
        if cfg.coins.coins > 100:
            raise LmforgeError("task.name=coins counts at most 100 coins")
"""


def test_task_plugin_imports_a_py_file_that_registers_an_objective_and_a_section(plugin_registries, tmp_path,
                                                                                 monkeypatch, capsys):
    path = tmp_path / "coins_plugin.py"
    path.write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    cfg = api.make_config(None, ["task.plugin=coins_plugin.py", "task.name=coins", "coins.coins=7"])
    assert cfg.coins.coins == 7 and cfg.task.plugin == str(path.resolve())  # recorded as an absolute path
    objective = registry.objective("coins")
    load_config(None, [f"task.plugin={path}"])
    assert registry.objective("coins") is objective  # imported once, not run again
    with pytest.raises(LmforgeError, match="counts at most 100 coins"):  # the objective's check_config
        api.make_config(None, [f"task.plugin={path}", "task.name=coins", "coins.coins=101"])
    (tmp_path / "c.yaml").write_text("coins:\n  coins: 9\ntask:\n  name: coins\n  plugin: coins_plugin.py\n")
    assert load_config(tmp_path / "c.yaml").coins.coins == 9  # imported before the sections are read
    assert main(["pretrain", "--list-keys", "--config", str(tmp_path / "c.yaml")]) == 0
    assert "coins.coins" in capsys.readouterr().out.split()
    # a new process (a resume, a load): config.yaml names the plug-in, and reading it imports it there
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    code = ("import sys; from lmforge.config import load_config; from lmforge.tasks import registry; "
            "cfg = load_config(sys.argv[1]); print(cfg.coins.coins, registry.objective(cfg.task.name).__name__)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "config.yaml")], capture_output=True,
                          text=True, cwd="/", timeout=120)
    assert proc.stdout.split() == ["7", "CoinsObjective"], proc.stderr[-2000:]


def test_a_plugin_that_cannot_be_imported_is_a_one_line_error_and_a_bug_in_one_keeps_its_traceback(
        plugin_registries, tmp_path):
    with pytest.raises(LmforgeError, match="task.plugin=no_such_lmforge_plugin cannot be imported"):
        load_config(None, ["task.plugin=no_such_lmforge_plugin"])
    with pytest.raises(LmforgeError, match="nope.py does not exist"):
        load_config(None, [f"task.plugin={tmp_path / 'nope.py'}"])
    (tmp_path / "needs.py").write_text("import no_such_lmforge_dependency\n")
    with pytest.raises(LmforgeError, match="cannot be imported: No module named 'no_such_lmforge_dependency'"):
        load_config(None, [f"task.plugin={tmp_path / 'needs.py'}"])
    (tmp_path / "buggy.py").write_text("1 / 0\n")
    with pytest.raises(ZeroDivisionError):
        load_config(None, [f"task.plugin={tmp_path / 'buggy.py'}"])


@pytest.mark.parametrize("override,message", [
    ("model.local_window=7", "model.local_window=7 must be an even number of at least 2"),
    ("model.position_buckets=1", "model.position_buckets=1 must be 0 (no bucketing) or at least 2"),
    ("model.num_kv_heads=3", "model.num_kv_heads=3 must divide model.num_heads=2"),
    ("model.mlp=geglu", "model.mlp='geglu' is not known; known: swiglu, relu2"),
    ("optim.name=lion", "optim.name='lion': use adamw or muon"),
    ("model.type_vocab_size=0", "model.type_vocab_size=0 must be at least 1 (0 for model.arch=deberta)"),
])
def test_the_modern_families_keys_are_checked_in_one_line(override, message):
    with pytest.raises(LmforgeError, match=re.escape(message)):
        load_config(None, [override])
    load_config(None, ["model.arch=deberta", "model.type_vocab_size=0", "model.position_buckets=0"])  # allowed
