"""Config: YAML + dotted overrides, type checks, 'did you mean', validation messages."""

import pytest

from lmforge.config import all_keys, dump_yaml, load_config
from lmforge.errors import LmforgeError

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
