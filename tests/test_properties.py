"""Property-based tests (hypothesis): the config parser, BERT masking, and the text/TSV readers.

Each property states a behaviour for *all* inputs of a kind; hypothesis generates the inputs. The
profile below is derandomized (the same examples on every run, so CI cannot flake) and sized for
a 2-core machine; `HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py` searches wider
with fresh random examples.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
import string
import typing
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmforge.config import MOVED, REMOVED_SECTIONS, Config, all_keys, dump_yaml, load_config
from lmforge.data.corpora import open_corpus
from lmforge.data.mlm import cross_entropy_selected, random_mask
from lmforge.data.sentiment import load_labeled_file
from lmforge.errors import LmforgeError
from lmforge.eval.classify import read_inputs

settings.register_profile("lmforge", max_examples=60, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lmforge"))

BOM = "\ufeff"


# =============================================================================================
# (1) Config: YAML file + dotted key=value overrides.


def _key_types() -> dict[str, typing.Any]:
    """Every dotted key and its annotated type, e.g. {'train.max_steps': int, ...}."""
    out = {}
    for key in all_keys():
        obj: typing.Any = Config
        for part in key.split("."):
            t = typing.get_type_hints(obj)[part]
            obj = t
        out[key] = obj
    return out


KEY_TYPES = _key_types()


def _base(t):
    """(base type, optional?) of an annotation: Optional[int] -> (int, True)."""
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return (args[0], True) if args else (t, False)


def _accepts_all(key: str, texts: list[str]) -> bool:
    """Whether `key=text` loads for every text: validate() puts no range on the key."""
    try:
        for text in texts:
            load_config(None, [f"{key}={text}"])
    except LmforgeError:
        return False
    return True


# Keys that constrain each other (heads/hidden, seq_len/positions, arch/task, tokens_per_step, mask
# fractions) are drawn jointly in `valid_overrides`; every other number key takes any value of its
# type if validate() does not range it (found by probing, so new checks do not break these tests),
# else a value in the range every ranged key accepts: ints in [1, 1e6], floats in (0, 0.1].
JOINT = {"model.hidden_size", "model.num_heads", "data.seq_len", "model.max_position_embeddings", "model.arch",
         "task.name", "train.tokens_per_step", "mlm.mask_token_frac", "mlm.random_token_frac",
         "distributed.zero_stage",  # 0-3: drawn from CONSTRAINED
         "mlm.nsp", "model.next_sentence_head",  # the model's head follows the task (load_config)
         # step schedules: bounded by seq_len, positions and batch (test_schedule.py tests their checks)
         "data.long_seq_len", "train.batch_ramp_start_tokens",
         "distill.teacher",  # read only by the distillation tasks: given with task.name=distill below
         "model.num_kv_heads",  # divides model.num_heads (test_models_llama.py)
         "model.local_window", "model.position_buckets",  # even; 0 or >= 2 (test_config.py)
         "optim.name",  # muon refuses optim.bias_correction=false (test_train_optim.py)
         "task.plugin"}  # imported: a module or .py file that exists (test_config.py tests it)
INT_KEYS = [k for k, t in KEY_TYPES.items() if _base(t)[0] is int and k not in JOINT]
FLOAT_KEYS = [k for k, t in KEY_TYPES.items() if _base(t)[0] is float and k not in JOINT]
UNRANGED_INT_KEYS = [k for k in INT_KEYS if _accepts_all(k, ["-7", "0", str(10**15)])]
UNRANGED_FLOAT_KEYS = [k for k in FLOAT_KEYS if _accepts_all(k, ["-1.5", "0", "1e300", "-inf", "inf"])]
POSITIVE_INT = st.integers(1, 10**6)


def keys_from(keys: list[str]):
    """Any of `keys`; nothing at all (that alternative drops out) when validate() ranges every one."""
    return st.sampled_from(keys) if keys else st.nothing()


SMALL_POSITIVE_FLOAT = st.floats(0.0, 0.1, exclude_min=True)
INT_KEY_VALUES = (st.tuples(keys_from(UNRANGED_INT_KEYS), st.integers(-10**30, 10**30))
                  | st.tuples(st.sampled_from(INT_KEYS), POSITIVE_INT))
FLOAT_KEY_VALUES = (st.tuples(keys_from(UNRANGED_FLOAT_KEYS), st.floats(allow_nan=False))
                    | st.tuples(st.sampled_from(FLOAT_KEYS), SMALL_POSITIVE_FLOAT))
# Keys with ranges wider than the common one above, and the enumerations.
UNIT_OPEN = st.floats(1e-6, 1 - 1e-6)
CONSTRAINED = {
    "model.num_layers": POSITIVE_INT, "model.intermediate_size": POSITIVE_INT,
    "model.dropout": st.floats(0.0, 1.0, exclude_max=True),
    "data.val_frac": UNIT_OPEN, "train.max_steps": POSITIVE_INT, "train.max_nonfinite_steps": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT, "train.grad_accum_steps": POSITIVE_INT, "train.eval_every": POSITIVE_INT,
    "train.checkpoint_every": POSITIVE_INT, "train.log_every": POSITIVE_INT,
    "train.max_time_s": st.none() | st.floats(1e-3, 1e9), "train.precision": st.sampled_from(["auto", "fp32", "bf16", "fp16"]),
    "distributed.strategy": st.sampled_from(["ddp"]), "distributed.zero_stage": st.sampled_from([0, 1, 2, 3]),
    "optim.lr": st.floats(1e-9, 10.0), "optim.warmup_frac": st.floats(0.0, 1.0),
    "optim.schedule": st.sampled_from(["linear", "cosine", "constant"]),
    "log.wandb_mode": st.sampled_from(["auto", "online", "offline"]),
    "optim.decay": st.sampled_from(["linear", "2d"]),
    "optim.max_grad_norm": st.none() | st.floats(1e-6, 1e6), "mlm.mask_prob": UNIT_OPEN,
    "model.mlp": st.sampled_from(["swiglu", "relu2"]), "data.packing": st.sampled_from(["stream", "documents"]),
    "model.classifier_pooling": st.sampled_from(["cls", "mean"]),
    "optim.muon_adjust_lr": st.sampled_from(["match_rms_adamw", "original"]),
    "optim.muon_momentum": st.floats(0.0, 1.0, exclude_max=True),
}

# Strings typed on a command line for str keys: paths, device names, tokenizer names. Digits, dots,
# dashes and colons included on purpose: '1.10', '1_0', '2024-01-01', '1:30', 'yes' must stay text.
PLAIN_TEXT = st.text(string.ascii_letters + string.digits + "/._-:~+", min_size=1, max_size=20)


def _is_null_spelling(text: str) -> bool:
    """YAML's spellings of null ('null', '~', '---', ...): documented to mean None, not text."""
    try:
        return yaml.safe_load(text) is None
    except (yaml.YAMLError, ValueError):
        return False


def _value_strategy(key: str):
    if key in CONSTRAINED:
        return CONSTRAINED[key]
    base, optional = _base(KEY_TYPES[key])
    any_float = st.floats(allow_nan=False, allow_infinity=False)
    s = {int: st.integers(-10**12, 10**12) if key in UNRANGED_INT_KEYS else POSITIVE_INT,
         float: any_float if key in UNRANGED_FLOAT_KEYS else SMALL_POSITIVE_FLOAT,
         bool: st.booleans(), str: PLAIN_TEXT.filter(lambda v: not _is_null_spelling(v))}[base]
    return st.none() | s if optional else s


def _spell(value) -> str:
    """The override text a user would type for a value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


@st.composite
def valid_overrides(draw) -> dict:
    """{key: value} for a random set of keys, every combination valid for validate()."""
    free = [k for k in all_keys() if k not in JOINT]
    chosen = draw(st.lists(st.sampled_from(free), unique=True, max_size=12))
    values = {k: draw(_value_strategy(k), label=k) for k in chosen}
    if draw(st.booleans()):
        heads = draw(st.integers(1, 16))
        values["model.num_heads"], values["model.hidden_size"] = heads, heads * draw(st.integers(1, 64))
    if draw(st.booleans()):
        seq_len = draw(st.integers(4, 4096))
        values["data.seq_len"], values["model.max_position_embeddings"] = seq_len, seq_len + draw(st.integers(0, 512))
    if draw(st.booleans()):
        values["model.arch"], values["task.name"] = draw(st.sampled_from(
            [("bert", "mlm"), ("gpt", "clm"), ("bert", "classify"), ("gpt", "classify")]))
    if draw(st.booleans()):
        a = draw(st.floats(0.0, 1.0))
        values["mlm.mask_token_frac"], values["mlm.random_token_frac"] = a, draw(st.floats(0.0, 1.0 - a))
    return values


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


@given(valid_overrides())
def test_any_valid_override_sets_exactly_that_value_and_round_trips_through_yaml(tmp_path_factory, values):
    cfg = load_config(None, [f"{k}={_spell(v)}" for k, v in values.items()])
    for key, value in values.items():
        got = _get(cfg, key)
        assert got == value and type(got) is type(value), (key, value, got)
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(dump_yaml(cfg), encoding="utf-8")
    again = load_config(path)
    assert again == cfg
    assert dump_yaml(again) == dump_yaml(cfg)


STR_KEYS = [k for k, t in KEY_TYPES.items() if _base(t)[0] is str and k not in JOINT and k not in CONSTRAINED]
STR_KEYS.append("distill.teacher")
YAML_LOOKALIKES = st.one_of(
    st.text(string.digits + ".-_:+eExo", min_size=1, max_size=12),
    st.sampled_from(["1.10", "1_000", "2024-01-01", "2024-13-45", "2024-01-01 10:00:00", "12:30", "yes", "off",
                     "True", "0x1F", "0o17", "1e3", "1.5e+3", ".inf", "-.nan", "[a]", "{a: b}", "a:", "-"]),
)


@given(st.sampled_from(STR_KEYS), YAML_LOOKALIKES | PLAIN_TEXT)
def test_a_name_or_path_for_a_str_key_is_kept_exactly_as_typed(key, text):
    # Folders named 2024-01-01 or 1.10, a device or tokenizer name: YAML would make them a date, 1.1, a bool.
    assume(not _is_null_spelling(text))
    task = ["task.name=distill"] if key == "distill.teacher" else []
    got = _get(load_config(None, [*task, f"{key}={text}"]), key)
    assert got == text


BOOL_KEYS = [k for k, t in KEY_TYPES.items() if t is bool and k != "model.next_sentence_head"]  # that one follows mlm.nsp
OPTIONAL_KEYS = [k for k, t in KEY_TYPES.items() if _base(t)[1]]
REQUIRED_NUMBER_KEYS = [k for k, t in KEY_TYPES.items() if t in (int, float)]


@given(INT_KEY_VALUES, st.sampled_from(["{}", "{}.0", " {} ", "+{}"]))
def test_ints_parse_from_decimal_and_integral_float_spellings(key_value, template):
    key, n = key_value
    text = template.format(n).replace("+-", "-")
    if template == "{}.0" and abs(n) > 2**53:
        n = int(float(text))  # an integral float is converted exactly as the float reads
    got = _get(load_config(None, [f"{key}={text}"]), key)
    assert got == n and type(got) is int


@given(FLOAT_KEY_VALUES, st.sampled_from([repr, str, "{:e}".format, "{:.17g}".format]))
def test_floats_parse_in_every_python_spelling_including_exponents_without_a_dot(key_value, spelling):
    key, x = key_value
    # YAML 1.1 reads '3e-4' (no dot) as a string; the float keys must still take it.
    got = _get(load_config(None, [f"{key}={spelling(x)}"]), key)
    assert type(got) is float and got == float(spelling(x))


@given(st.tuples(keys_from(UNRANGED_FLOAT_KEYS), st.integers(-10**6, 10**6))
       | st.tuples(st.sampled_from(["optim.lr", "train.max_time_s", "optim.max_grad_norm"]), POSITIVE_INT))
def test_an_int_given_for_a_float_key_becomes_a_float(key_value):
    key, n = key_value
    got = _get(load_config(None, [f"{key}={n}"]), key)
    assert type(got) is float and got == n


TRUE_WORDS = ["true", "True", "TRUE", "yes", "Yes", "on", "ON"]
FALSE_WORDS = ["false", "False", "FALSE", "no", "No", "off", "OFF"]


@given(st.sampled_from(BOOL_KEYS), st.sampled_from(TRUE_WORDS + FALSE_WORDS))
def test_bools_parse_from_yaml_words(key, word):
    assert _get(load_config(None, [f"{key}={word}"]), key) is (word in TRUE_WORDS)


@given(st.sampled_from(BOOL_KEYS), st.sampled_from(["1", "0", "maybe", "1.0", "[true]", "tru"]))
def test_bools_reject_anything_but_a_yaml_bool(key, text):
    with pytest.raises(LmforgeError, match=f"'{key}' wants bool"):
        load_config(None, [f"{key}={text}"])


@given(st.sampled_from(OPTIONAL_KEYS), st.sampled_from(["null", "Null", "NULL", "~", "", "  "]))
def test_null_spellings_clear_optional_keys(key, text):
    assert _get(load_config(None, [f"{key}={text}"]), key) is None


@given(st.sampled_from(REQUIRED_NUMBER_KEYS), st.sampled_from(["null", "~", ""]))
def test_null_for_a_required_number_is_a_one_line_error(key, text):
    with pytest.raises(LmforgeError, match=f"config key '{key}' wants"):
        load_config(None, [f"{key}={text}"])


def _never_a_key(key: str) -> bool:
    """Neither a key nor one that moved (those get 'moved to' messages: test_config.py)."""
    return key.strip() not in all_keys() and key.strip() not in MOVED and key.strip() not in REMOVED_SECTIONS


@given(st.text(max_size=40).filter(lambda k: "=" not in k and _never_a_key(k)), st.text(max_size=10))
def test_any_string_that_is_not_a_key_is_an_lmforge_error_never_another_exception(key, value):
    # a section's name ('train') gets its own message: set one of its keys
    with pytest.raises(LmforgeError, match="unknown config key|is a config section, not a key"):
        load_config(None, [f"{key}={value}"])


@st.composite
def one_edit_away(draw) -> tuple[str, str]:
    """(a valid key, that key with one character deleted, inserted, replaced or two swapped)."""
    key = draw(st.sampled_from(all_keys()))
    i = draw(st.integers(0, len(key) - 1))
    c = draw(st.sampled_from(string.ascii_lowercase + "_."))
    edit = draw(st.sampled_from(["delete", "insert", "replace", "swap"]))
    if edit == "delete":
        typo = key[:i] + key[i + 1:]
    elif edit == "insert":
        typo = key[:i] + c + key[i:]
    elif edit == "replace":
        typo = key[:i] + c + key[i + 1:]
    else:
        typo = key[:i] + key[i + 1:i + 2] + key[i] + key[i + 2:]
    assume(_never_a_key(typo) and typo.strip())
    return key, typo


@given(one_edit_away())
def test_a_typo_of_a_key_gets_a_did_you_mean_naming_a_real_key_at_least_as_close(pair):
    key, typo = pair
    with pytest.raises(LmforgeError) as info:
        load_config(None, [f"{typo}=1"])
    message = str(info.value)
    assert message.startswith(f"unknown config key '{typo.strip()}'; did you mean '")
    suggested = message.split("did you mean '")[1].split("'")[0]
    assert suggested in all_keys()
    ratio = lambda a: difflib.SequenceMatcher(None, typo.strip(), a).ratio()  # noqa: E731
    assert ratio(suggested) >= ratio(key)


@given(st.sampled_from(all_keys()).filter(lambda k: "." in k),
       st.text(string.ascii_lowercase + "_", min_size=1, max_size=12))
def test_a_wrong_section_with_a_right_leaf_suggests_a_key_with_that_leaf_or_closer(key, section):
    typo = f"{section}.{key.split('.', 1)[1]}"
    assume(_never_a_key(typo))
    with pytest.raises(LmforgeError, match=r"; did you mean '[a-z0-9_.]+'\?"):
        load_config(None, [f"{typo}=1"])


TYPED_KEYS = [k for k, t in KEY_TYPES.items() if _base(t)[0] in (int, float, bool)]
JUNK = st.one_of(
    st.text(max_size=30),
    st.text("0123456789-:.eE+_xob TZ", max_size=20),  # number-, date- and time-like YAML scalars
    st.sampled_from(["2024-13-45", "2024-02-30", "2024-01-01 25:00:00", "1:30:99", "0x", "0b2", "[1, 2]",
                     "{a: 1}", "!!python/object:os.system", "*alias", "&anchor 1", "'unterminated", "- 1",
                     ".nan", ".inf", "-.inf", "1e999", "1.0e+999", "nan", "inf"]),
)


@given(st.sampled_from(TYPED_KEYS), JUNK)
def test_junk_for_a_typed_key_is_accepted_with_the_right_type_or_an_lmforge_error(key, junk):
    try:
        cfg = load_config(None, [f"{key}={junk}"])
    except LmforgeError as e:
        assert "\n" not in str(e)  # the CLI prints it as one line
        return
    base, optional = _base(KEY_TYPES[key])
    got = _get(cfg, key)
    assert (got is None and optional) or type(got) is base, (key, junk, got)


SHAPE_KEYS = ["train.batch_size", "data.seq_len", "train.tokens_per_step", "train.grad_accum_steps",
              "model.hidden_size", "model.num_heads", "model.max_position_embeddings", "model.num_layers"]


@given(st.dictionaries(st.sampled_from(SHAPE_KEYS), st.integers(-3, 64) | st.none(), max_size=len(SHAPE_KEYS)))
def test_any_integers_for_interacting_shape_keys_give_a_valid_config_or_an_lmforge_error(values):
    try:
        cfg = load_config(None, [f"{k}={_spell(v)}" for k, v in values.items()])
    except LmforgeError:
        return
    t = cfg.train
    assert cfg.model.hidden_size % cfg.model.num_heads == 0 and t.batch_size >= 1 and cfg.data.seq_len >= 4
    if t.tokens_per_step is not None:  # grad_accum_steps is derived from it
        assert t.batch_size * cfg.data.seq_len * t.grad_accum_steps == t.tokens_per_step


@given(st.sampled_from(INT_KEYS), st.lists(POSITIVE_INT, min_size=1, max_size=6), POSITIVE_INT)
def test_later_overrides_win_over_earlier_ones_and_over_the_yaml_file(tmp_path_factory, key, values, in_file):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    section, leaf = key.split(".")
    path.write_text(f"{section}:\n  {leaf}: {in_file}\n", encoding="utf-8")
    assert _get(load_config(path), key) == in_file
    assert _get(load_config(path, [f"{key}={v}" for v in values]), key) == values[-1]


@given(st.binary(max_size=200) | st.text(max_size=200).map(lambda s: s.encode("utf-8")))
def test_any_bytes_as_a_config_file_give_a_config_or_an_lmforge_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "junk.yaml"
    path.write_bytes(data)
    try:
        cfg = load_config(path)
    except LmforgeError:
        return
    assert isinstance(cfg, Config)


# =============================================================================================
# (2) Masking: lmforge.data.mlm.random_mask and cross_entropy_selected.


@st.composite
def mask_inputs(draw, max_rows: int = 6, max_cols: int = 48) -> dict:
    """A random vocabulary with random special ids (mask_id among them, at least one ordinary
    id), a batch of ids that mixes both, and random recipe fractions and seed."""
    vocab = draw(st.integers(2, 80))
    special = draw(st.lists(st.booleans(), min_size=vocab, max_size=vocab))
    mask_id = draw(st.integers(0, vocab - 1))
    special[mask_id] = True
    assume(not all(special))
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    ids = draw(st.lists(st.integers(0, vocab - 1), min_size=rows * cols, max_size=rows * cols))
    mask_token_frac = draw(st.floats(0.0, 1.0))
    return {
        "ids": torch.tensor(ids, dtype=torch.int64).view(rows, cols),
        "special": torch.tensor(special), "mask_id": mask_id,
        "mask_prob": draw(st.floats(0.0, 1.0)), "mask_token_frac": mask_token_frac,
        "random_token_frac": draw(st.floats(0.0, 1.0 - mask_token_frac)),
        "seed": draw(st.integers(0, 2**63 - 1)),
    }


def _mask(x: dict, **changes):
    x = {**x, **changes}
    return random_mask(x["ids"], mask_id=x["mask_id"], special_mask=x["special"], mask_prob=x["mask_prob"],
                       mask_token_frac=x["mask_token_frac"], random_token_frac=x["random_token_frac"],
                       generator=torch.Generator().manual_seed(x["seed"]))


@given(mask_inputs())
def test_masking_invariants_hold_for_any_ids_specials_fractions_and_seed(x):
    ids, special = x["ids"], x["special"]
    before = ids.clone()
    masked, selected = _mask(x)
    assert torch.equal(ids, before)  # the input is not modified in place
    assert masked.shape == ids.shape and masked.dtype == torch.int64 and selected.dtype == torch.bool
    assert not selected[special[ids]].any()  # special tokens are never selected
    assert torch.equal(masked[~selected], ids[~selected])  # unselected positions are unchanged
    # A selected position becomes [MASK], a random ordinary token, or stays: never another special.
    out = masked[selected]
    assert ((out == x["mask_id"]) | ~special[out]).all()
    assert (selected | (ids == x["mask_id"]) | (masked != x["mask_id"])).all()  # [MASK] only where selected


@given(mask_inputs())
def test_same_seed_gives_the_same_mask(x):
    a, b = _mask(x), _mask(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@given(mask_inputs())
def test_rate_one_selects_every_ordinary_token_and_rate_zero_none(x):
    maskable = ~x["special"][x["ids"]]
    _, everything = _mask(x, mask_prob=1.0)
    assert torch.equal(everything, maskable)
    masked, nothing = _mask(x, mask_prob=0.0)
    assert not nothing.any() and torch.equal(masked, x["ids"])


@given(mask_inputs())
def test_the_replacement_fractions_at_their_extremes(x):
    x = {**x, "mask_prob": 1.0}
    masked, selected = _mask(x, mask_token_frac=1.0, random_token_frac=0.0)
    assert (masked[selected] == x["mask_id"]).all()
    masked, selected = _mask(x, mask_token_frac=0.0, random_token_frac=0.0)
    assert torch.equal(masked, x["ids"])
    masked, selected = _mask(x, mask_token_frac=0.0, random_token_frac=1.0)
    assert not x["special"][masked[selected]].any()  # random replacements are ordinary ids


def _binomial_ok(observed: int, trials: int, p: float) -> bool:
    """|observed - trials p| within 6 binomial standard deviations (+1 for rounding at p near
    0 or 1): a chance of about 2e-9 of failing per draw, and the profile is derandomized."""
    return abs(observed - trials * p) <= 6 * math.sqrt(trials * p * (1 - p)) + 1


@given(mask_inputs(max_rows=1, max_cols=1), st.floats(0.02, 0.98), st.floats(0.0, 1.0))
def test_selected_and_replaced_fractions_match_the_configured_rates(x, mask_prob, split):
    # A 64 x 128 batch of random ids over the drawn vocabulary: enough trials for a tight bound.
    g = torch.Generator().manual_seed(x["seed"] % 2**32)
    ids = torch.randint(len(x["special"]), (64, 128), generator=g)
    mask_token_frac = split * 0.9
    random_token_frac = (1 - mask_token_frac) * 0.5
    masked, selected = _mask({**x, "ids": ids}, mask_prob=mask_prob, mask_token_frac=mask_token_frac,
                             random_token_frac=random_token_frac)
    maskable = ~x["special"][ids]
    n_maskable, n_selected = int(maskable.sum()), int(selected.sum())
    assert _binomial_ok(n_selected, n_maskable, mask_prob)
    # [MASK] is special, so masked == mask_id exactly where the 80% branch was taken.
    assert _binomial_ok(int((masked[selected] == x["mask_id"]).sum()), n_selected, mask_token_frac)
    # A random replacement draws the original id with chance 1/n_ordinary: it then looks unchanged.
    n_ordinary = int((~x["special"]).sum())
    changed_to_other = int((selected & (masked != x["mask_id"]) & (masked != ids)).sum())
    assert _binomial_ok(changed_to_other, n_selected, random_token_frac * (1 - 1 / n_ordinary))


@lru_cache(maxsize=1)
def _wordpiece():
    from lmforge.data.tokenizers import train_wordpiece
    return train_wordpiece(iter(["the cat sees a red apple", "a dog likes the moon", "the old farmer"] * 20), 120)


@given(st.lists(st.lists(st.sampled_from(["the", "cat", "sees", "a", "red", "apple", "moon", "xyz"]), max_size=12),
                min_size=1, max_size=6), st.integers(0, 2**32), st.floats(0.0, 1.0))
def test_cls_sep_pad_and_mask_of_a_real_tokenizer_are_never_selected_nor_replaced(sentences, seed, mask_prob):
    tok = _wordpiece()
    rows = [[tok.cls_id, *tok.encode(" ".join(words)), tok.sep_id] for words in sentences]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    special = torch.as_tensor(tok.special_mask)
    assert special[[tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.unk_id]].all()
    masked, selected = random_mask(ids, mask_id=tok.mask_id, special_mask=special, mask_prob=mask_prob,
                                   generator=torch.Generator().manual_seed(seed))
    frame = (ids == tok.cls_id) | (ids == tok.sep_id) | (ids == tok.pad_id)
    assert not selected[frame].any() and torch.equal(masked[frame], ids[frame])


@given(st.integers(1, 4), st.integers(1, 12), st.integers(2, 30), st.integers(0, 2**32), st.floats(0.0, 1.0))
def test_loss_is_cross_entropy_with_ignore_index_minus_100_outside_the_selection(rows, cols, vocab, seed, rate):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, vocab, generator=g)
    targets = torch.randint(vocab, (rows, cols), generator=g)
    selected = torch.rand(rows, cols, generator=g) < rate
    labels = torch.where(selected, targets, torch.full_like(targets, -100))  # the Hugging Face convention
    loss = cross_entropy_selected(logits, targets, selected)
    gathered = cross_entropy_selected(logits[selected], targets, selected)
    if not selected.any():
        assert loss.item() == 0.0 and gathered.item() == 0.0  # not NaN
        return
    expected = F.cross_entropy(logits.view(-1, vocab), labels.view(-1), ignore_index=-100)
    assert torch.allclose(loss, expected, atol=1e-5) and torch.allclose(gathered, expected, atol=1e-5)
    total = cross_entropy_selected(logits, targets, selected, reduction="sum")
    assert torch.allclose(total, expected * selected.sum(), rtol=1e-5, atol=1e-4)


# =============================================================================================
# (3) Readers: the text/jsonl corpus readers, read_inputs (classify), load_labeled_file.

# Arbitrary unicode in one line: tabs, quotes, U+2028, NEL, form feed, NUL... but no \r or \n.
LINE = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=25)
NONBLANK_LINE = LINE.filter(lambda s: s.strip() != "")
ENDING = st.sampled_from(["\n", "\r\n", "\r"])


def _write(folder: Path, name: str, text: str, bom: bool) -> Path:
    path = folder / name
    path.write_bytes(((BOM if bom else "") + text).encode("utf-8"))
    return path


@given(st.lists(st.lists(NONBLANK_LINE, min_size=1, max_size=4), min_size=1, max_size=5),
       st.lists(st.sampled_from(["", " ", "\t", " \t "]), min_size=1, max_size=3),
       ENDING, st.booleans(), st.booleans())
def test_a_text_corpus_reads_back_its_blank_line_separated_documents(tmp_path_factory, docs, blank, end, bom,
                                                                      final_newline):
    text = (end.join(blank) + end).join(end.join(lines) + end for lines in docs)
    if not final_newline:
        text = text[: -len(end)]
    path = _write(tmp_path_factory.mktemp("corpus"), "c.txt", text, bom)
    got = [t for _, t in open_corpus(str(path)).documents()]
    expected = ["".join(line + "\n" for line in lines) for lines in docs]
    if not final_newline:
        expected[-1] = expected[-1][:-1]
    assert got == expected


@given(st.lists(st.text(max_size=30), min_size=1, max_size=6), st.sampled_from(["\n", "\r\n"]), st.booleans(),
       st.booleans())
def test_a_jsonl_corpus_reads_back_every_text_field(tmp_path_factory, texts, end, bom, ascii_only):
    lines = [json.dumps({"text": t, "n": i}, ensure_ascii=ascii_only) for i, t in enumerate(texts)]
    path = _write(tmp_path_factory.mktemp("corpus"), "c.jsonl", end.join(lines) + end + end, bom)
    if not any(t.strip() for t in texts):  # a corpus without any text is refused when opened
        with pytest.raises(LmforgeError, match="has no text"):
            open_corpus(str(path))
        return
    assert [t for _, t in open_corpus(str(path)).documents()] == texts


@given(st.lists(LINE, max_size=8), ENDING, st.booleans(), st.booleans())
def test_read_inputs_gives_one_text_per_line_of_a_plain_file(tmp_path_factory, lines, end, bom, final_newline):
    text = "".join(line + end for line in lines)
    if lines and lines[-1] != "" and not final_newline:  # "a\n" and "a" are the same single line
        text = text[: -len(end)]
    path = _write(tmp_path_factory.mktemp("inputs"), "inputs.txt", text, bom)
    _assert_read_inputs(path, lines)


def _assert_read_inputs(path: Path, texts: list[str]) -> None:
    """read_inputs(path) gives `texts`, or, when none of them has any text, a one-line error."""
    if any(t.strip() for t in texts):
        assert read_inputs(path) == texts
    else:
        with pytest.raises(LmforgeError, match="has no text"):
            read_inputs(path)


def _csv_text(header: list[str], rows: list[list[str]], delimiter: str) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter=delimiter)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


@given(st.lists(st.text(max_size=25), min_size=1, max_size=6), st.sampled_from([".csv", ".tsv"]),
       st.sampled_from([["text"], ["text", "id"], ["id", "text"]]), st.booleans())
def test_read_inputs_reads_back_the_text_column_written_by_the_csv_module(tmp_path_factory, texts, suffix, header,
                                                                          bom):
    rows = [[t if col == "text" else str(i) for col in header] for i, t in enumerate(texts)]
    text = _csv_text(header, rows, "\t" if suffix == ".tsv" else ",")
    path = _write(tmp_path_factory.mktemp("inputs"), "inputs" + suffix, text, bom)
    _assert_read_inputs(path, texts)


@given(st.lists(st.tuples(st.text(max_size=25), st.sampled_from([0, 1, "positive", "neg"]),
                          st.floats(-4, 4, allow_nan=False)), min_size=1, max_size=6),
       st.sampled_from([".csv", ".tsv", ".jsonl"]), st.booleans())
def test_labelled_files_read_back_text_label_and_rating(tmp_path_factory, rows, suffix, bom):
    if suffix == ".jsonl":
        text = "".join(json.dumps({"text": t, "label": y, "rating": r}) + "\n" for t, y, r in rows)
    else:
        text = _csv_text(["label", "text", "rating"], [[str(y), t, repr(r)] for t, y, r in rows],
                         "\t" if suffix == ".tsv" else ",")
    path = _write(tmp_path_factory.mktemp("labelled"), "data" + suffix, text, bom)
    data = load_labeled_file(path)
    polarity = {0: 0, 1: 1, "positive": 1, "neg": 0}
    assert [(e.text, e.label, e.rating) for e in data.examples] == [(t, polarity[y], r) for t, y, r in rows]
    assert data.rating_range == (min(r for *_, r in rows), max(r for *_, r in rows))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
JSON_ROWS = st.one_of(JSON_VALUES, st.fixed_dictionaries({}, optional={
    "text": st.text(max_size=10) | JSON_VALUES, "label": st.sampled_from([0, 1, "positive", "neg"]) | JSON_VALUES,
    "rating": st.floats(-4, 4) | JSON_VALUES}))


@given(st.lists(JSON_ROWS.map(json.dumps) | st.just("1" * 5000), min_size=1, max_size=5))
def test_a_jsonl_dataset_of_any_json_lines_gives_examples_or_an_lmforge_error(tmp_path_factory, lines):
    # Lines that are no object (a list, a number, a string), objects without text or label, and an
    # integer longer than Python's 4300-digit limit for int() must all be one-line errors.
    path = tmp_path_factory.mktemp("labelled") / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        data = load_labeled_file(path)
    except LmforgeError:
        return
    assert all(isinstance(e.text, str) and e.label in (0, 1) for e in data.examples)
    assert len(data.examples) == len(lines)


def test_a_csv_field_longer_than_the_csv_module_limit_is_an_lmforge_error(tmp_path):
    long = "x" * (csv.field_size_limit() + 1)
    for name in ("data.csv", "inputs.tsv"):
        path = tmp_path / name
        path.write_text(_csv_text(["text", "label"], [[long, "1"]], "\t" if name.endswith(".tsv") else ","))
        read = load_labeled_file if name == "data.csv" else read_inputs
        with pytest.raises(LmforgeError, match="field larger than field limit"):
            read(path)


INVALID_UTF8 = st.tuples(st.text(max_size=20), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80abc"]),
                         st.text(max_size=20)).map(lambda p: p[0].encode() + p[1] + p[2].encode())
# CPython's utf-8-sig decoder drops a file that is only the start of a BOM (b"\xef", b"\xef\xbb")
# even at the end of input, so those two files read as empty rather than as U+FFFD: left out.
ANY_BYTES = (st.binary(max_size=120) | INVALID_UTF8).filter(lambda b: b not in (b"\xef", b"\xef\xbb"))


def _fffd_per_invalid_byte(data: bytes) -> bytes:
    """`data` with every byte that is not part of valid UTF-8 replaced by U+FFFD (one per byte)."""
    out, start = [], 0
    while True:
        try:
            out.append(data[start:].decode("utf-8"))
            return "".join(out).encode("utf-8")
        except UnicodeDecodeError as e:
            out.append(data[start:start + e.start].decode("utf-8") + "\ufffd" * (e.end - e.start))
            start += e.end


def _result(read, *args):
    """What `read(*args)` returns, or LmforgeError if it raises one (anything else propagates)."""
    try:
        return read(*args)
    except LmforgeError:
        return LmforgeError


@given(ANY_BYTES, st.sampled_from([".txt", ".csv", ".tsv"]))
def test_read_inputs_reads_invalid_utf8_as_u_fffd_and_never_raises_another_exception(tmp_path_factory, data,
                                                                                     suffix):
    # Each invalid byte is one U+FFFD (and a warning): the same texts, or the same LmforgeError, as
    # the file with those replacements made beforehand.
    folder = tmp_path_factory.mktemp("inputs")
    bad, repaired = folder / ("bad" + suffix), folder / ("repaired" + suffix)
    bad.write_bytes(data)
    repaired.write_bytes(_fffd_per_invalid_byte(data))
    assert _result(read_inputs, bad) == _result(read_inputs, repaired)


@given(ANY_BYTES, st.sampled_from([".csv", ".tsv", ".jsonl"]))
def test_load_labeled_file_on_any_bytes_returns_examples_or_raises_lmforge_error(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("labelled") / ("data" + suffix)
    path.write_bytes(data)
    try:
        load_labeled_file(path)
    except LmforgeError:
        return


@given(ANY_BYTES, st.sampled_from([".txt", ".jsonl", "folder"]))
def test_corpus_readers_replace_invalid_utf8_or_raise_lmforge_error(tmp_path_factory, data, kind):
    folder = tmp_path_factory.mktemp("corpus")
    path = folder / "doc.txt" if kind == "folder" else folder / ("c" + kind)
    path.write_bytes(data)
    try:
        docs = list(open_corpus(str(folder if kind == "folder" else path)).documents())
    except LmforgeError:
        return
    # Invalid bytes become U+FFFD and nothing else changes: the same as reading the repaired file.
    other = tmp_path_factory.mktemp("repaired")
    repaired = other / path.name
    repaired.write_bytes(_fffd_per_invalid_byte(data))
    assert [t for _, t in docs] == [t for _, t in open_corpus(str(other if kind == "folder" else repaired)).documents()]
