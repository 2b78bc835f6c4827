"""Bad inputs to every verb: exit code 2, one `error: ...` line that names the problem and the fix,
no traceback, and nothing written or overwritten (issue 6).

Each case runs `lmforge.cli.main(argv)` in-process against tiny runs trained once for the module
(a BERT, a GPT and a fine-tuned classifier, 2 steps each). Every file and folder under the
case's own tmp dir and under those shared runs is snapshotted (path, size, mtime_ns, sha256)
before and after the call; the two must be equal, so a command that creates a run directory,
rewrites a config or leaves a temporary folder behind before failing is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml

from conftest import tiny_config
from lmforge.cli import main
from lmforge.data.corpora import open_corpus
from lmforge.data.shards import PreparedData, prepare
from lmforge.data.tokenizers import BERT_SPECIAL, TextTokenizer, train_bpe
from lmforge.jobs import finetune
from lmforge.jobs import pretrain

TWO_STEPS = ("train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1")


@dataclass
class Runs:
    """What the cases point at; `paths` fills the `{name}` placeholders of a case's argv."""

    root: Path
    paths: dict[str, str]


def _big_bert_tokenizer(path: Path) -> Path:
    """A valid BERT WordPiece tokenizer.json with 505 entries: more than the tiny runs' vocabulary."""
    from tokenizers.implementations import BertWordPieceTokenizer

    vocab = path.with_suffix(".txt")
    vocab.write_text("".join(t + "\n" for t in [*BERT_SPECIAL, *(f"w{i}" for i in range(500))]))
    TextTokenizer(BertWordPieceTokenizer(str(vocab), lowercase=True)._tokenizer, "big").save(path)
    vocab.unlink()
    return path


def _reviews(path: Path) -> Path:
    rng = random.Random(0)
    lines = ["text\tlabel\trating"]
    for _ in range(60):
        label = rng.randrange(2)
        lines.append(f"the cat is {rng.choice(['good', 'great'] if label else ['bad', 'dull'])} .\t{label}\t"
                     f"{2.0 if label else -2.0}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus, tiny_prepared) -> Runs:
    root = tmp_path_factory.mktemp("bad_inputs")
    out = root / "runs"
    bert, _ = pretrain(tiny_config(tiny_prepared, out, *TWO_STEPS))
    corpus = open_corpus(str(tiny_corpus))
    gpt_prepared = prepare(corpus, train_bpe((t for _, t in corpus.documents()), 300), root / "gpt_prepared",
                           val_frac=0.2, split_seed=1, progress=False)
    gpt, _ = pretrain(tiny_config(PreparedData(gpt_prepared), out, "model.arch=gpt", "task.name=clm", *TWO_STEPS))
    reviews = _reviews(root / "reviews.tsv")
    tok = tiny_prepared.folder / "tokenizer.json"
    clf, _ = finetune(tiny_config(tiny_prepared, out, "task.name=classify", f"data.dataset={reviews}",
                                  f"data.tokenizer={tok}", "train.batch_size=16", *TWO_STEPS))
    paths = {"bert": bert, "gpt": gpt, "clf": clf, "prepared": tiny_prepared.folder, "gpt_prepared": gpt_prepared,
             "tok": tok, "big_tok": _big_bert_tokenizer(root / "big_tokenizer.json"), "reviews": reviews}
    return Runs(root, {k: str(v) for k, v in paths.items()})


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots` (the roots too) -> (kind, size, mtime_ns, sha256 of a file's bytes).
    A folder's mtime changes when an entry is added or removed, even if it is removed again."""
    out = {}
    for root in roots:
        for dirpath, _, filenames in os.walk(root):
            for name in [None, *filenames]:
                p = Path(dirpath) if name is None else Path(dirpath) / name
                st = p.lstat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if name is not None and p.is_file() else None
                out[str(p)] = ("dir" if name is None else "file", st.st_size if name else None, st.st_mtime_ns, digest)
    return out


# -- case setup helpers: files a case needs, made before the snapshot ---------------------------


def files_at(contents: dict[str, str | bytes | None]) -> Callable[[Path, Runs], None]:
    """Write each `name: content` under the case's tmp dir (None makes an empty folder)."""
    def setup(tmp: Path, runs: Runs) -> None:
        for name, content in contents.items():
            path = tmp / name
            if content is None:
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
    return setup


def run_copy(run: str, edit: Callable[[Path, Runs], None]) -> Callable[[Path, Runs], None]:
    """Copy the shared run `run` to tmp/<run> and apply `edit` to the copy."""
    def setup(tmp: Path, runs: Runs) -> None:
        copy = tmp / run
        shutil.copytree(runs.paths[run], copy)
        edit(copy, runs)
    return setup


def edit_config(**changes) -> Callable[[Path, Runs], None]:
    """Change `section.key` values in a run's config.yaml (as a user editing it by hand would)."""
    def edit(run_dir: Path, runs: Runs) -> None:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            cfg[section][key] = value
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return edit


def swap_tokenizer(run_dir: Path, runs: Runs) -> None:
    shutil.copy(runs.paths["big_tok"], run_dir / "tokenizer.json")


def edit_one_token(run_dir: Path, runs: Runs) -> None:
    """The same number of tokens, one of them spelled differently: only the recorded sha256 tells."""
    tok = json.loads((run_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    word = next(w for w in vocab if w.isalpha() and len(w) > 3)
    vocab[word[::-1] + "zz"] = vocab.pop(word)
    (run_dir / "tokenizer.json").write_text(json.dumps(tok))


def drop_checkpoints(run_dir: Path, runs: Runs) -> None:
    shutil.rmtree(run_dir / "checkpoints")


def exported_hf(**config_changes) -> Callable[[Path, Runs], None]:
    """The shared BERT run exported to tmp/hf, its config.json then edited (not its weights)."""
    def setup(tmp: Path, runs: Runs) -> None:
        from lmforge.export import export_hf

        export_hf(runs.paths["bert"], tmp / "hf")
        config = json.loads((tmp / "hf" / "config.json").read_text())
        config.update(config_changes)
        (tmp / "hf" / "config.json").write_text(json.dumps(config))
    return setup


# -- the table -------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: list[str]  # `{tmp}` and the keys of Runs.paths are filled in
    expect: str  # a distinctive substring of the one error line
    setup: Optional[Callable[[Path, Runs], None]] = field(default=None)


PRE = ["--tokenizer", "{tok}", "--out", "{tmp}/out"]  # prepare: a local tokenizer (no download)
# pretrain/finetune: a tiny model on the tiny prepared data, so a case gets past validation without a
# download, and fails fast (or trains 2 steps and fails the test) if its bad input is not caught
TINY = ["out_dir={tmp}/runs", "data.corpus={prepared}", "data.tokenizer={tok}", "data.seq_len=32",
        "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64", "model.max_position_embeddings=64",
        "train.progress=false", "train.max_steps=2"]
FT = [*TINY, "data.dataset={reviews}"]

CASES = [
    # -- the command line itself
    Case("unknown-verb", ["frobnicate"], "invalid choice: 'frobnicate'"),
    Case("prepare-without-out", ["prepare", "--corpus", "{tmp}"], "the following arguments are required: --out"),
    Case("predict-top-k-not-a-number", ["predict", "{bert}", "a [MASK]", "--top-k", "many"],
         "argument --top-k: invalid int value: 'many'"),
    # -- prepare
    Case("prepare-empty-folder", ["prepare", "--corpus", "{tmp}/empty", *PRE], "has no .txt or .md files",
         files_at({"empty": None})),
    Case("prepare-folder-of-blank-files", ["prepare", "--corpus", "{tmp}/blank", *PRE], "has no text",
         files_at({"blank/a.txt": "\n  \n", "blank/b.md": ""})),
    Case("prepare-empty-file", ["prepare", "--corpus", "{tmp}/empty.txt", *PRE], "has no text",
         files_at({"empty.txt": ""})),
    Case("prepare-jsonl-without-text-field", ["prepare", "--corpus", "{tmp}/c.jsonl", *PRE],
         "has no string field 'text'", files_at({"c.jsonl": '{"body": "a cat"}\n'})),
    Case("prepare-missing-corpus", ["prepare", "--corpus", "{tmp}/nope.txt", *PRE], "unknown corpus"),
    Case("prepare-missing-tokenizer", ["prepare", "--corpus", "{tmp}/c.txt", "--tokenizer", "{tmp}/nope.json",
                                       "--out", "{tmp}/out"], "tokenizer file not found",
         files_at({"c.txt": "a cat\n"})),
    Case("prepare-out-exists", ["prepare", "--corpus", "{tmp}/c.txt", "--train-tokenizer", "100",
                                "--out", "{tmp}/out"], "already exists and is not empty; choose another --out",
         files_at({"c.txt": "a cat\n", "out/keep.txt": "mine"})),
    Case("prepare-out-is-a-file", ["prepare", "--corpus", "{tmp}/c.txt", *PRE, "--force"],
         "already exists and is a file", files_at({"c.txt": "a cat\n", "out": "mine"})),
    Case("prepare-val-frac-zero", ["prepare", "--corpus", "{tmp}/c.txt", "--val-frac", "0", *PRE],
         "--val-frac=0.0 must be between 0 and 1", files_at({"c.txt": "a cat\n"})),
    Case("prepare-tokenizer-too-small", ["prepare", "--corpus", "{tmp}/c.txt", "--train-tokenizer", "5",
                                         "--out", "{tmp}/out"], "too small; use at least 100",
         files_at({"c.txt": "a cat\n"})),
    # -- pretrain: config keys, types, sizes
    Case("misspelt-key", ["pretrain", *TINY, "train.max_step=5"], "did you mean 'train.max_steps'"),
    Case("misspelt-key-in-yaml", ["pretrain", "--config", "{tmp}/c.yaml", *TINY], "did you mean 'model.hidden_size'",
         files_at({"c.yaml": "model:\n  hiden_size: 64\n"})),
    Case("wrong-section", ["pretrain", *TINY, "training.max_steps=5"], "did you mean 'train.max_steps'"),
    Case("not-key-value", ["pretrain", "train.max_steps"], "is not of the form key=value"),
    Case("section-given-a-value", ["pretrain", "model=5"],
         "'model' is a config section, not a key; set one of its keys"),
    Case("int-given-a-word", ["pretrain", *TINY, "train.batch_size=many"],
         "'train.batch_size' wants int, got 'many'; e.g. train.batch_size=32"),
    Case("int-given-a-fraction", ["pretrain", *TINY, "train.max_steps=2.5"], "'train.max_steps' wants int, got 2.5"),
    Case("float-given-a-word-in-yaml", ["pretrain", "--config", "{tmp}/c.yaml", *TINY], "'optim.lr' wants float",
         files_at({"c.yaml": "optim:\n  lr: fast\n"})),
    Case("bool-given-a-word", ["pretrain", *TINY, "train.progress=maybe"], "'train.progress' wants bool"),
    Case("batch-size-zero", ["pretrain", *TINY, "train.batch_size=0"], "train.batch_size=0 must be at least 1"),
    Case("layers-zero", ["pretrain", *TINY, "model.num_layers=0"], "model.num_layers=0 must be at least 1"),
    Case("hidden-negative", ["pretrain", *TINY, "model.hidden_size=-64"], "model.hidden_size=-64 must be positive"),
    Case("heads-zero", ["pretrain", *TINY, "model.num_heads=0"], "model.num_heads=0 must be at least 1"),
    Case("seq-len-zero", ["pretrain", *TINY, "data.seq_len=0"], "data.seq_len=0 is too short"),
    Case("max-steps-negative", ["pretrain", *TINY, "train.max_steps=-1"], "train.max_steps=-1 must be at least 1"),
    Case("lr-zero", ["pretrain", *TINY, "optim.lr=0"], "optim.lr=0.0 must be positive"),
    Case("lr-negative", ["pretrain", *TINY, "optim.lr=-1e-3"], "optim.lr=-0.001 must be positive"),
    Case("vocab-size-zero", ["pretrain", *TINY, "model.vocab_size=0"], "model.vocab_size=0 must be positive"),
    Case("eval-batch-size-zero", ["pretrain", *TINY, "train.eval_batch_size=0"], "train.eval_batch_size=0 must be"),
    Case("beta2-above-one", ["pretrain", *TINY, "optim.beta2=1.5"], "optim.beta2=1.5 must be in [0, 1)"),
    Case("dropout-one", ["pretrain", *TINY, "model.dropout=1"], "model.dropout=1.0 must be in [0, 1)"),
    Case("heads-do-not-divide-hidden", ["pretrain", "model.num_heads=3"],
         "model.num_heads=3 does not divide model.hidden_size=128; pick a divisor"),
    Case("seq-len-above-positions", ["pretrain", "data.seq_len=600"],
         "data.seq_len=600 exceeds model.max_position_embeddings=512; lower data.seq_len or raise "
         "model.max_position_embeddings"),
    Case("mlm-with-gpt", ["pretrain", *TINY, "model.arch=gpt"], "task.name=mlm trains an encoder (model.arch=bert"),
    Case("moved-key", ["pretrain", *TINY, "task.nsp=true"], "config key 'task.nsp' moved to 'mlm.nsp'"),
    Case("moved-key-in-yaml", ["finetune", "--config", "{tmp}/c.yaml", *FT],
         "config key 'loss.rating_weight' moved to 'classify.rating_weight'",
         files_at({"c.yaml": "loss:\n  rating_weight: 0.1\n"})),
    Case("plugin-missing", ["pretrain", *TINY, "task.plugin={tmp}/nope.py"], "nope.py does not exist"),
    Case("plugin-not-importable", ["pretrain", *TINY, "task.plugin=no_such_lmforge_plugin"],
         "task.plugin=no_such_lmforge_plugin cannot be imported (No module named 'no_such_lmforge_plugin')"),
    Case("pretrain-a-classifier", ["pretrain", "task.name=classify", *TINY], "use `lmforge finetune`"),
    # -- pretrain: files
    Case("config-missing", ["pretrain", "--config", "{tmp}/nope.yaml"], "config file not found"),
    Case("config-bad-yaml", ["pretrain", "--config", "{tmp}/c.yaml", *TINY],
         "is not valid YAML at line 3, column 6: expected ',' or ']'",
         files_at({"c.yaml": "model:\n  hidden_size: [64\ntrain: {}\n"})),
    Case("config-not-a-mapping", ["pretrain", "--config", "{tmp}/c.yaml", *TINY], "must be a mapping of sections",
         files_at({"c.yaml": "- model\n- train\n"})),
    Case("config-not-utf8", ["pretrain", "--config", "{tmp}/c.yaml", *TINY], "is not UTF-8 text",
         files_at({"c.yaml": b"train:\n  max_steps: 5 \xff\xfe\n"})),
    Case("corpus-empty-folder", ["pretrain", *TINY, "data.corpus={tmp}/empty"], "has no .txt or .md files",
         files_at({"empty": None})),
    Case("corpus-empty-file", ["pretrain", *TINY, "data.corpus={tmp}/empty.txt"], "has no text",
         files_at({"empty.txt": "\n\n"})),
    Case("corpus-missing", ["pretrain", *TINY, "data.corpus={tmp}/nope"], "unknown corpus"),
    Case("tokenizer-missing", ["pretrain", *TINY, "data.corpus={tmp}/c.txt", "data.tokenizer={tmp}/nope.json"],
         "tokenizer file not found", files_at({"c.txt": "a cat\n"})),
    Case("vocab-smaller-than-tokenizer", ["pretrain", *TINY, "model.vocab_size=50"],
         "is smaller than the tokenizer's"),
    Case("mlm-on-gpt-tokens", ["pretrain", *TINY, "data.corpus={gpt_prepared}"],
         "task.name=mlm needs a BERT tokenizer"),
    Case("seq-len-longer-than-the-data", ["pretrain", *TINY, "model.max_position_embeddings=8192",
                                          "data.seq_len=8000"], "tokens; use a bigger corpus or a shorter"),
    Case("out-dir-is-a-run", ["pretrain", *TINY, "out_dir={bert}"], "is a run directory"),
    Case("out-dir-is-a-file", ["pretrain", *TINY, "out_dir={tmp}/f"], "is a file", files_at({"f": "mine"})),
    # -- pretrain --resume
    Case("resume-with-config", ["pretrain", "--resume", "{bert}", "--config", "{tmp}/c.yaml"], "drop --config"),
    Case("resume-missing-run", ["pretrain", "--resume", "{tmp}/nope"], "is not an lmforge run directory"),
    Case("resume-changing-the-model", ["pretrain", "--resume", "{bert}", "model.hidden_size=64"],
         "'model.hidden_size' cannot change when resuming"),
    Case("resume-with-edited-model-config", ["pretrain", "--resume", "{tmp}/bert"],
         "model.hidden_size=64 in", run_copy("bert", edit_config(model__hidden_size=64))),
    Case("resume-finished-run-lower-max-steps", ["pretrain", "--resume", "{bert}", "train.max_steps=1"],
         "already finished at step 2"),
    Case("resume-a-classifier-as-pretraining", ["pretrain", "--resume", "{clf}", "train.max_steps=5"],
         "is a fine-tuning run; continue it with `lmforge finetune --resume`"),
    # -- finetune
    Case("finetune-misspelt-key", ["finetune", *FT, "optim.lr_=1e-4"], "did you mean 'optim.lr'"),
    Case("finetune-other-task", ["finetune", *FT, "task.name=mlm"], "`lmforge finetune` runs task.name=classify, distill, not 'mlm'"),
    Case("finetune-tsv-without-text", ["finetune", *FT, "data.dataset={tmp}/r.tsv"], "has no column 'text'",
         files_at({"r.tsv": "review\tlabel\nfine\t1\n"})),
    Case("finetune-empty-dataset", ["finetune", *FT, "data.dataset={tmp}/r.tsv"], "has no rows",
         files_at({"r.tsv": ""})),
    Case("finetune-bad-label", ["finetune", *FT, "data.dataset={tmp}/r.csv"],
         "label 'maybe' is not a sentiment class, but 'positive' is",
         files_at({"r.csv": "text,label\nfine,positive\ndull,maybe\n"})),
    Case("finetune-one-class", ["finetune", *FT, "data.dataset={tmp}/r.csv"], "examples of one class only",
         files_at({"r.csv": "text,label\nfine,maybe\ndull,maybe\n"})),
    Case("finetune-missing-dataset", ["finetune", *FT, "data.dataset={tmp}/nope.tsv"], "unknown dataset"),
    Case("finetune-missing-tokenizer", ["finetune", *FT, "data.tokenizer={tmp}/nope.json"],
         "tokenizer file not found"),
    Case("finetune-tokenizer-does-not-match-init-run", ["finetune", *FT, "model.init_from={bert}",
                                                        "data.tokenizer={big_tok}"],
         "does not match the tokenizer of model.init_from"),
    Case("finetune-init-from-missing", ["finetune", *FT, "model.init_from={tmp}/nope"],
         "is neither an lmforge run directory"),
    Case("finetune-init-from-a-gpt-run", ["finetune", *FT, "data.tokenizer=bert-base-uncased",  # the default:
                                          "model.init_from={gpt}"],  # the source's own tokenizer is taken
         "is a gpt model; a classifier is fine-tuned from an encoder"),
    Case("finetune-seq-len-above-init-positions", ["finetune", *FT, "model.init_from={bert}",
                                                   "model.max_position_embeddings=512", "data.seq_len=100"],
         "data.seq_len=100 exceeds the 64 positions of"),
    Case("finetune-resume-a-pretraining-run", ["finetune", "--resume", "{bert}", "train.max_steps=5"],
         "is a pretraining run; continue it with `lmforge pretrain --resume`"),
    Case("finetune-resume-with-config", ["finetune", "--resume", "{clf}", "--config", "{tmp}/c.yaml"],
         "drop --config"),
    Case("finetune-resume-with-edited-model-config", ["finetune", "--resume", "{tmp}/clf"],
         "model.num_layers=1 in", run_copy("clf", edit_config(model__num_layers=1))),
    # -- classify
    Case("classify-neither-text-nor-input", ["classify", "{clf}"], "give exactly one of --text"),
    Case("classify-both-text-and-input", ["classify", "{clf}", "--text", "fine", "--input", "{tmp}/in.txt"],
         "give exactly one of --text", files_at({"in.txt": "fine\n"})),
    Case("classify-missing-input", ["classify", "{clf}", "--input", "{tmp}/nope.txt"], "input file not found"),
    Case("classify-entirely-empty-input", ["classify", "{clf}", "--input", "{tmp}/in.txt"], "has no text",
         files_at({"in.txt": ""})),
    Case("classify-input-of-blank-lines", ["classify", "{clf}", "--input", "{tmp}/in.txt"], "has no text",
         files_at({"in.txt": "\n  \n\n"})),
    Case("classify-empty-text", ["classify", "{clf}", "--text", " "], "--text is empty"),
    Case("classify-empty-tsv", ["classify", "{clf}", "--input", "{tmp}/in.tsv"], "has no text",
         files_at({"in.tsv": ""})),
    Case("classify-tsv-without-text-column", ["classify", "{clf}", "--input", "{tmp}/in.tsv"],
         "has no 'text' column", files_at({"in.tsv": "review\tid\nfine\t1\n"})),
    Case("classify-a-pretraining-run", ["classify", "{bert}", "--text", "fine"],
         "is not an lmforge fine-tuning run directory"),
    Case("classify-missing-run", ["classify", "{tmp}/nope", "--text", "fine"],
         "is not an lmforge fine-tuning run directory"),
    Case("classify-tokenizer-does-not-match-checkpoint", ["classify", "{tmp}/clf", "--text", "fine"],
         "is not the tokenizer this run was trained with", run_copy("clf", swap_tokenizer)),
    Case("classify-tokenizer-of-the-same-size-edited", ["classify", "{tmp}/clf", "--text", "fine"],
         "put back the run's own tokenizer.json", run_copy("clf", edit_one_token)),
    # -- predict
    Case("predict-without-mask", ["predict", "{bert}", "no mask here"], "no [MASK] in 'no mask here'"),
    Case("predict-top-k-negative", ["predict", "{bert}", "a [MASK]", "--top-k", "-1"], "--top-k must be at least 1"),
    Case("predict-missing-run", ["predict", "{tmp}/nope", "a [MASK]"], "is neither an lmforge run directory"),
    Case("predict-a-classifier", ["predict", "{clf}", "a [MASK]"], "use `lmforge classify` with it"),
    Case("predict-with-gpt", ["predict", "{gpt}", "a [MASK]"], "`predict` fills in [MASK] with a masked-LM run"),
    Case("predict-tokenizer-does-not-match-checkpoint", ["predict", "{tmp}/bert", "a [MASK]"],
         "is not the tokenizer this run was trained with", run_copy("bert", swap_tokenizer)),
    Case("predict-tokenizer-of-the-same-size-edited", ["predict", "{tmp}/bert", "a [MASK]"],
         "put back the run's own tokenizer.json", run_copy("bert", edit_one_token)),
    Case("predict-config-does-not-match-checkpoint", ["predict", "{tmp}/bert", "a [MASK]"],
         "does not match its checkpoint", run_copy("bert", edit_config(model__hidden_size=64))),
    Case("predict-hf-config-with-fewer-layers-than-its-weights", ["predict", "{tmp}/hf", "a [MASK]"],
         "config.json does not describe its weights: bert.layers.1.", exported_hf(num_hidden_layers=1)),
    Case("predict-hf-config-of-another-width", ["predict", "{tmp}/hf", "a [MASK]"],
         "config.json does not describe its weights", exported_hf(hidden_size=64, intermediate_size=128)),
    Case("predict-hf-config-without-a-size", ["predict", "{tmp}/hf", "a [MASK]"],
         "config.json lacks hidden_size", exported_hf(hidden_size=None)),
    # -- generate
    Case("generate-with-bert", ["generate", "{bert}", "the"], "`generate` needs a causal-LM run"),
    Case("generate-with-a-classifier", ["generate", "{clf}", "the"], "is a fine-tuning run"),
    Case("generate-missing-run", ["generate", "{tmp}/nope", "the"], "is neither an lmforge run directory"),
    Case("generate-top-k-negative", ["generate", "{gpt}", "the", "--top-k", "-1"], "--top-k=-1 must be at least 1"),
    Case("generate-max-new-tokens-negative", ["generate", "{gpt}", "the", "--max-new-tokens", "-5"],
         "--max-new-tokens=-5 must be at least 1"),
    Case("generate-temperature-negative", ["generate", "{gpt}", "the", "--temperature", "-1"],
         "--temperature=-1.0 must be at least 0"),
    Case("generate-top-p-zero", ["generate", "{gpt}", "the", "--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
    Case("generate-num-samples-zero", ["generate", "{gpt}", "the", "--num-samples", "0"],
         "--num-samples=0 must be at least 1"),
    Case("generate-empty-prompt", ["generate", "{gpt}", ""], "the prompt is empty"),
    # -- export
    Case("export-out-exists", ["export", "{bert}", "--out", "{tmp}/out"],
         "already exists and is not empty; choose another --out or pass --force",
         files_at({"out/keep.txt": "mine"})),
    Case("export-out-is-a-file", ["export", "{bert}", "--out", "{tmp}/out", "--force"],
         "already exists and is a file", files_at({"out": "mine"})),
    Case("export-missing-model", ["export", "{tmp}/nope", "--out", "{tmp}/out"], "is neither an lmforge run"),
    Case("export-run-without-checkpoint", ["export", "{tmp}/bert", "--out", "{tmp}/out"],
         "has no checkpoint (it stopped before its first one", run_copy("bert", drop_checkpoints)),
    Case("export-config-does-not-match-checkpoint", ["export", "{tmp}/clf", "--out", "{tmp}/out"],
         "does not match its checkpoint", run_copy("clf", edit_config(model__intermediate_size=32))),
    # -- plan, plot-schedule, report
    Case("plan-without-budget", ["plan", "--tokens-per-s", "10"],
         "give --config FILE (what a run costs), or exactly one of --flops F or --hours H (a budget)"),
    Case("plan-negative-hours", ["plan", "--hours", "-1", "--tokens-per-s", "10"], "--hours must be a positive number"),
    Case("plan-zero-throughput", ["plan", "--flops", "1e18", "--tokens-per-s", "0"],
         "--tokens-per-s must be a positive number"),
    Case("plan-flops-not-a-number", ["plan", "--flops", "lots"], "argument --flops: invalid float value"),
    Case("plan-vocab-zero", ["plan", "--flops", "1e18", "--tokens-per-s", "5", "--vocab", "0"],
         "--vocab must be at least 1"),
    Case("plot-schedule-out-exists", ["plot-schedule", "--out", "{tmp}/lr.png"], "exists; choose another --out",
         files_at({"lr.png": "mine"})),
    Case("plot-schedule-not-png", ["plot-schedule", "--out", "{tmp}/lr.jpg"], "must name a .png file"),
    Case("plot-schedule-bad-key", ["plot-schedule", "optim.lrr=3", "--out", "{tmp}/lr.png"],
         "unknown config key 'optim.lrr'"),
    Case("plot-schedule-missing-folder", ["plot-schedule", "--out", "{tmp}/no/lr.png"], "does not exist"),
    Case("report-not-a-run", ["report", "{tmp}", "--out", "{tmp}/r"], "is not an lmforge run directory"),
    Case("report-same-run-twice", ["report", "{bert}", "{bert}", "--out", "{tmp}/r"], "is given twice"),
    Case("report-out-exists", ["report", "{bert}", "--out", "{tmp}/r"], "exists; choose another --out",
         files_at({"r.html": "mine"})),
    Case("doctor-unknown-option", ["doctor", "--gpu", "A100"], "unrecognized arguments: --gpu A100"),
]


def test_the_table_covers_every_verb_with_at_least_30_cases():
    verbs = {c.argv[0] for c in CASES}
    assert {"prepare", "pretrain", "finetune", "classify", "predict", "generate", "export", "plan",
            "plot-schedule", "report", "doctor"} <= verbs
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(case, runs, tmp_path, monkeypatch, capsys):
    _isolate(tmp_path, monkeypatch)
    if case.setup:
        case.setup(tmp_path, runs)
    err = _one_line_refusal([a.format(tmp=tmp_path, **runs.paths) for a in case.argv], tmp_path, runs, capsys)
    assert case.expect in err, err


def _isolate(tmp_path, monkeypatch) -> None:
    """Run in tmp_path with a cache of its own: a relative out_dir (runs/) or any cache write
    lands inside the snapshot that `_one_line_refusal` compares."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()


def _one_line_refusal(argv: list[str], tmp_path, runs, capsys) -> str:
    """Run `lmforge argv`: it must exit 2 with one `error:` line, no traceback, and write
    nothing under tmp_path or the shared runs. Returns that line."""
    before = snapshot(tmp_path, runs.root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert snapshot(tmp_path, runs.root) == before
    return err


# -- every verb x a path that is not what it expects ------------------------------------------
# kind -> (the bad path under the case's tmp dir, what makes it)

BAD_PATHS = {
    "a-file": ("notes.txt", files_at({"notes.txt": "hello\n"})),
    "an-empty-dir": ("bad", files_at({"bad": None})),
    "a-missing-path": ("bad", files_at({})),
    "a-dir-with-metrics-but-no-config": ("bad", files_at({  # e.g. a run's metrics.jsonl copied on its own
        "bad/metrics.jsonl": '{"split": "train", "step": 1, "tokens": 64, "loss": 5.0, "lr": 0.001, '
                             '"grad_norm": 1.0, "tokens_per_s": 10.0}\n'})),
    "a-dir-with-only-a-hand-written-config": ("bad", files_at({"bad/config.yaml": "train:\n  max_steps: 5\n"})),
    "a-hf-dir-whose-download-was-cut-short": ("bad", files_at({  # config.json, a truncated model.safetensors
        "bad/config.json": '{"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, '
                           '"num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}',
        "bad/model.safetensors": b"\x08\x00\x00\x00"})),
}


@dataclass
class PathArgument:
    id: str
    argv: list[str]  # {bad} is the bad path; `{tmp}` and the keys of Runs.paths as in CASES
    valid: tuple[str, ...] = ()  # kinds of BAD_PATHS that are a valid input here (a text file is a corpus)
    setup: Optional[Callable[[Path, Runs], None]] = field(default=None)


PATH_ARGUMENTS = [
    PathArgument("prepare-corpus", ["prepare", "--corpus", "{bad}", *PRE],
                 valid=("a-file", "a-dir-with-metrics-but-no-config")),
    PathArgument("prepare-tokenizer", ["prepare", "--corpus", "{tmp}/c.txt", "--tokenizer", "{bad}",
                                       "--out", "{tmp}/out"], setup=files_at({"c.txt": "a cat\n"})),
    PathArgument("pretrain-resume", ["pretrain", "--resume", "{bad}"]),
    PathArgument("pretrain-config", ["pretrain", "--config", "{bad}", *TINY]),
    PathArgument("finetune-resume", ["finetune", "--resume", "{bad}"]),
    PathArgument("finetune-config", ["finetune", "--config", "{bad}", *FT]),
    PathArgument("finetune-init-from", ["finetune", *FT, "model.init_from={bad}"]),
    PathArgument("classify-run", ["classify", "{bad}", "--text", "fine"]),
    PathArgument("classify-input", ["classify", "{clf}", "--input", "{bad}"], valid=("a-file",)),
    PathArgument("evaluate-run", ["evaluate", "{bad}", "--dataset", "vader-nyt"]),
    PathArgument("evaluate-dataset", ["evaluate", "{clf}", "--dataset", "{bad}"]),
    PathArgument("predict", ["predict", "{bad}", "a [MASK]"]),
    PathArgument("generate", ["generate", "{bad}", "the"]),
    PathArgument("report", ["report", "{bad}", "--out", "{tmp}/r"]),
    PathArgument("plot-schedule-config", ["plot-schedule", "--config", "{bad}", "--out", "{tmp}/lr.png"]),
    PathArgument("lr-find-config", ["lr-find", "--config", "{bad}", "--out", "{tmp}/lr.png"]),
    PathArgument("plan-config", ["plan", "--config", "{bad}", "--gpu", "H100"]),
    PathArgument("export", ["export", "{bad}", "--out", "{tmp}/out"]),
]
PATH_CASES = [pytest.param(arg, kind, id=f"{arg.id}-given-{kind}")
              for arg in PATH_ARGUMENTS for kind in BAD_PATHS if kind not in arg.valid]


def test_the_path_table_covers_every_verb_that_takes_a_path():
    from lmforge.cli import build_parser

    verbs = set(next(a for a in build_parser()._actions if a.dest == "verb").choices)
    # doctor reports on its paths (an error line, exit 1: tests/test_doctor.py)
    assert verbs - {"doctor"} == {arg.argv[0] for arg in PATH_ARGUMENTS}


@pytest.mark.parametrize("arg, kind", PATH_CASES)
def test_every_verb_given_a_path_that_is_not_what_it_expects_answers_in_one_line(arg, kind, runs, tmp_path,
                                                                                  monkeypatch, capsys):
    _isolate(tmp_path, monkeypatch)
    if arg.setup:
        arg.setup(tmp_path, runs)
    name, make = BAD_PATHS[kind]
    make(tmp_path, runs)
    _one_line_refusal([a.format(tmp=tmp_path, bad=tmp_path / name, **runs.paths) for a in arg.argv], tmp_path, runs,
                      capsys)


# -- not exit 2: reported and carried on ---------------------------------------------------------


def test_classify_reports_an_empty_line_and_classifies_the_rest(runs, tmp_path, capsys):
    inputs = tmp_path / "in.txt"
    inputs.write_text("the cat is good .\n\nthe cat is dull .\n")
    capsys.readouterr()
    assert main(["classify", runs.paths["clf"], "--input", str(inputs)]) == 0
    out, err = capsys.readouterr()
    rows = out.splitlines()
    assert len(rows) == 3 and rows[1] == "error (empty input)\t" and rows[0].split("\t")[0] in ("positive", "negative")
    assert err.splitlines() == ["warning: input 2 is empty; skipped"]


def test_invalid_utf8_in_a_corpus_is_replaced_with_one_warning(runs, tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text("the cat sees the hill .\n" * 20)
    (folder / "bad1.txt").write_bytes(b"the dog \xff\xfe likes the city .\n" * 20)
    (folder / "bad2.txt").write_bytes(b"a small bird \xc3 finds the moon .\n" * 20)
    capsys.readouterr()  # --train-tokenizer: the corpus is read twice, and still warned about once
    assert main(["prepare", "--corpus", str(folder), "--train-tokenizer", "100", "--val-frac", "0.4",
                 "--split-seed", "3", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 60 invalid UTF-8 bytes in 2 of 3 files of corpus " + str(folder)
                        + " were replaced by U+FFFD"]
    assert (tmp_path / "out" / "manifest.json").is_file()
    single = tmp_path / "single.txt"  # one text file: the bytes are counted the same way
    single.write_bytes(b"the cat \xe2\x82 sees the hill .\n\nthe dog likes the city .\n" * 10)
    assert main(["prepare", "--corpus", str(single), "--tokenizer", runs.paths["tok"], "--val-frac", "0.5",
                 "--out", str(tmp_path / "out2")]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: 20 invalid UTF-8 bytes in corpus {single} were replaced by U+FFFD"]


def test_invalid_utf8_in_classify_input_is_replaced_with_one_warning(runs, tmp_path, capsys):
    inputs = tmp_path / "in.txt"
    inputs.write_bytes(b"the cat is good \xff.\nthe cat is dull .\n")
    capsys.readouterr()
    assert main(["classify", runs.paths["clf"], "--input", str(inputs)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and "\ufffd" in out
    assert err.splitlines() == [f"warning: 1 invalid UTF-8 byte in {inputs} was replaced by U+FFFD"]
