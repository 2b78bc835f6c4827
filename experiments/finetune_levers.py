"""Which fine-tuning levers make the movie-review classifier more accurate? Fine-tunes the bundled
MiniLM encoder with configs/mr-minilm.yaml, changing one lever at a time, over several seeds, and
prints for each variant its validation accuracy (what a choice is made on), then its test
accuracy and its accuracy on the out-of-domain sets vader-tweets and vader-nyt (reported, never
chosen on), with the time each run took.

    python experiments/finetune_levers.py                         # every variant, seeds 0 1: hours
    python experiments/finetune_levers.py --only shipped mean pooler --seeds 0 1 2 --json
    python experiments/finetune_levers.py --smoke                  # tiny models: checks the script runs

`dapt` first continues MiniLM's masked-LM pretraining on the train split's texts (the corpus
`train-texts:movie-reviews`: never the validation or test texts; MiniLM has no MLM head, so the
head starts from BERT's init with its decoder tied to MiniLM's embeddings), then fine-tunes that
run as `shipped` does; its seconds are both stages'.

The seed changes the heads' initialisation, the dropout masks and the batch order; the split
(data.split_seed) stays the same for every run.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

import common
from lmforge.config import load_config, to_dict
from lmforge.data.sentiment import EVALUATION_ONLY
from lmforge.jobs import finetune, pretrain

# name -> (overrides of configs/mr-minilm.yaml, what the lever is)
# The levers were measured one at a time on the recipe shipped until 2026-12-02 ("v1": [CLS]
# pooling, lr 5e-5, 3 epochs); they keep that base, so that every recorded row means what it did.
# The recipe they chose (mean pooling, lr 1e-4, 5 epochs: "S2") was configs/mr-minilm.yaml from
# then until 2026-12-03, when LP-FT and 10% token noise were added to it (lpft+noise0.1, chosen on
# validation); the out-of-domain levers were measured on S2 and keep it. On 2026-12-04 WiSE-FT at
# alpha 0.9 was added (wise0.9, chosen on validation over 3 seeds with experiments/wise_ft.py).
S2 = ("classify.probe_first=false", "classify.token_noise=0", "classify.wise_alpha=1")
V1 = ("model.classifier_pooling=cls", "optim.lr=5e-5", "train.max_steps=792", "train.eval_every=264",
      "train.checkpoint_every=264", *S2)
EPOCHS5 = ("train.max_steps=1320", "train.eval_every=1320", "train.checkpoint_every=1320")
VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "shipped": ((), "configs/mr-minilm.yaml as shipped (= wise0.9; 2026-12-03 = lpft+noise0.1; until then "
                    "mean+lr1e-4+epochs5)"),
    "v1": (V1, "the recipe shipped before: [CLS] pooling, lr 5e-5, 3 epochs; the levers below change it"),
    "mean": ((*V1, "model.classifier_pooling=mean"), "mean of the tokens' final states (MiniLM's own pooling)"),
    "pooler": ((*V1, "model.classifier_pooling=pooler"), "BERT's pretrained pooler on [CLS] (transformers')"),
    "llrd0.8": ((*V1, "optim.layer_lr_decay=0.8"), "layer-wise lr decay 0.8"),
    "llrd0.9": ((*V1, "optim.layer_lr_decay=0.9"), "layer-wise lr decay 0.9"),
    "ema0.99": ((*V1, "optim.ema_decay=0.99"), "evaluate and keep an exponential moving average of the weights, 0.99"),
    "ema0.998": ((*V1, "optim.ema_decay=0.998"), "the same, 0.998 (over the run's ~800 steps: mostly the warm-up term)"),
    "smooth0.1": ((*V1, "classify.label_smoothing=0.1"), "label smoothing 0.1"),
    "rdrop1": ((*V1, "classify.rdrop=1.0"), "R-Drop, weight 1 (two passes a step)"),
    "rating0": ((*V1, "classify.rating_weight=0"), "no rating head"),
    "rating0.2": ((*V1, "classify.rating_weight=0.2"), "rating weight 0.2"),
    "lr1e-4": ((*V1, "optim.lr=1e-4"), "2x the learning rate"),
    "epochs5": ((*V1, *EPOCHS5), "5 epochs"),
    "dapt": (V1, "continued masked-LM pretraining on the train split's texts first (400 steps)"),
    "fp32": ((*V1, "train.precision=fp32"), "fp32 instead of bf16 autocast"),
    "nobuckets": ((*V1, "classify.length_buckets=false"), "batches of the plain shuffle, not of similar lengths"),
    "len64": ((*V1, "data.seq_len=64"), "inputs cut to 64 tokens"),
    # the levers that helped one at a time, together
    "mean+lr1e-4": ((*V1, "model.classifier_pooling=mean", "optim.lr=1e-4"), "mean pooling and 2x the learning rate"),
    "mean+lr1e-4+epochs5": ((*V1, "model.classifier_pooling=mean", "optim.lr=1e-4", *EPOCHS5),
                            "mean pooling, 2x the learning rate, 5 epochs"),
    # levers for out of the domain (docs/finetuning.md, "Out of its domain"), on S2
    "noise0.1": ((*S2, "classify.token_noise=0.1"), "S2 + 10% of the tokens replaced by random ones"),
    "noise0.3": ((*S2, "classify.token_noise=0.3"), "S2 + 30% of the tokens replaced by random ones"),
    "lpft": (("classify.probe_first=true", "classify.token_noise=0", "classify.wise_alpha=1"),
             "S2, the heads a linear probe first (LP-FT)"),
    "lpft+noise0.1": (("classify.probe_first=true", "classify.token_noise=0.1", "classify.wise_alpha=1"),
                      "LP-FT and 10% token noise together: shipped 2026-12-03 to 12-04"),
    "lpft+noise0.3": (("classify.probe_first=true", "classify.token_noise=0.3", "classify.wise_alpha=1"),
                      "LP-FT and 30% token noise: an end point for WiSE-FT (experiments/wise_ft.py)"),
    "epochs15": (("classify.probe_first=true", "classify.token_noise=0.1", "classify.wise_alpha=1",
                  "train.max_steps=3960", "train.eval_every=3960", "train.checkpoint_every=3960"),
                 "lpft+noise0.1 for 15 epochs: the compute of a soup of three 5-epoch runs in one run"),
    "wise0.9": (("classify.probe_first=true", "classify.token_noise=0.1", "classify.wise_alpha=0.9"),
                "lpft+noise0.1, then the weights 0.1 of the way back to the start (WiSE-FT): shipped since 2026-12-04"),
}
# the continued pretraining of `dapt` (Gururangan et al. 2020): ~3.4 passes over the train texts
# (~240k tokens, in windows of 64: two or three snippets each), at BERT's continued-pretraining lr
DAPT = ["task.name=mlm", "model.init_from=minilm", "data.corpus=train-texts:movie-reviews", "data.seq_len=64",
        "train.batch_size=32", "train.max_steps=400", "train.eval_every=400", "train.checkpoint_every=400",
        "optim.lr=1e-4", "optim.warmup_frac=0.06", "optim.min_lr_frac=0", "optim.max_grad_norm=1.0",
        "optim.weight_decay=0.01"]
PRETRAINED = {"dapt": DAPT}
# --smoke: a tiny encoder pretrained from scratch on the train texts stands in for MiniLM's continuation
SMOKE_DAPT = ["model.init_from=null", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
              "model.intermediate_size=64", "train.max_steps=1", "train.eval_every=1", "train.checkpoint_every=1", "data.seq_len=32",
              "train.batch_size=4", "train.eval_batches=1"]
SMOKE = ["model.init_from=null", "data.tokenizer=bert-base-uncased", "model.hidden_size=32", "model.num_layers=1",
         "model.num_heads=2", "model.intermediate_size=64", "data.train_examples=64", "train.max_steps=2",
         "train.eval_every=2", "train.checkpoint_every=2", "train.eval_batch_size=256"]
SETS = ("val", "test", *EVALUATION_ONLY)


def run(name: str, seed: int, out: Path, extra: list[str], smoke: bool = False) -> dict:
    overrides, _ = VARIANTS[name]
    common_keys = [f"train.seed={seed}", "train.progress=false", "train.keep_checkpoints=1"]
    started = time.time()
    if name in PRETRAINED:
        pretrained, _ = pretrain(load_config(None, [*PRETRAINED[name], *common_keys, f"out_dir={out / name / 'pretrain'}",
                                                    *(SMOKE_DAPT if smoke else [])]))
        # the fine-tuning starts from it: its shape is the pretrained run's, not the smoke's tiny one
        extra = [k for k in extra if not k.startswith("model.")] + [f"model.init_from={pretrained}"]
    cfg = load_config(common.CONFIGS / "mr-minilm.yaml", [*overrides, *common_keys, f"out_dir={out / name}", *extra])
    run_dir, s = finetune(cfg)
    if s.get("stopped_by") != "max_steps":  # a signal or a time budget: not a run to compare, nor to keep
        raise SystemExit(f"finetune_levers: {name} seed {seed} stopped by {s.get('stopped_by')} at step {s['steps']} "
                         f"({run_dir}); not recorded")
    return {"variant": name, "seed": seed, "seconds": round(time.time() - started, 1),
            "val": s["val_accuracy"], "test": s["test_accuracy"],
            **{n: s[f"{n.replace('-', '_')}_accuracy"] for n in EVALUATION_ONLY},
            "test_ece": s["test_ece"], "test_ece_calibrated": s["test_ece_calibrated"], "run_dir": str(run_dir)}


def recipe_id(name: str, extra: list[str]) -> str:
    """A digest of what variant `name` trains with these overrides: the resolved config (but the
    seed and where runs go) and its continued pretraining. A row is reused only for the same one,
    so a row recorded before configs/mr-minilm.yaml changed is never taken for the new recipe."""
    cfg = to_dict(load_config(common.CONFIGS / "mr-minilm.yaml", [*VARIANTS[name][0], *extra]))
    cfg["train"].pop("seed"), cfg.pop("out_dir")
    return hashlib.sha256(json.dumps([cfg, PRETRAINED.get(name)], sort_keys=True).encode()).hexdigest()[:16]


def _finished_rows(path: Path, extra: list[str]) -> dict[tuple[str, int], dict]:
    """{(variant, seed): row} of the runs in `path` (rows.jsonl) made with the same overrides and
    recipe (recipe_id)."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["variant"], r["seed"]): {k: v for k, v in r.items() if k not in ("overrides", "recipe")}
            for r in rows if r.get("overrides") == extra and r["variant"] in VARIANTS
            and r.get("recipe") == recipe_id(r["variant"], extra)}


def _append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def summarise(rows: list[dict]) -> dict:
    out = {}
    for name in VARIANTS:
        rs = [r for r in rows if r["variant"] == name]
        if rs:
            out[name] = {**{k: common.accuracy_summary([r[k] for r in rs]) for k in SETS},
                         "seconds": statistics.mean(r["seconds"] for r in rs), "runs": len(rs)}
    return out


def print_text(report: dict) -> None:
    print(f"accuracy, mean over seeds {report['seeds']} (choose on val; out-of-domain sets are never trained on)")
    print(f"{'variant':<11} {'seconds':>7} " + " ".join(f"{k:>13}" for k in SETS) + "  lever")
    for name, s in report["summary"].items():
        print(f"{name:<11} {s['seconds']:>7.0f} " + " ".join(f"{s[k]['mean']:>13.4f}" for k in SETS)
              + f"  {VARIANTS[name][1]}")


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), default=None, metavar="VARIANT",
                   help=f"variants to run (default all: {', '.join(VARIANTS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default 0 1)")
    common.add_run_options(p, smoke="tiny models on a few examples: checks the script runs", overrides="every run")
    args = p.parse_args()
    names = args.only or list(VARIANTS)
    extra = list(args.overrides)
    seeds = args.seeds
    if args.smoke:
        names, seeds, extra = [n for n in names if n in ("shipped", "pooler", "dapt")] or names[:1], seeds[:1], extra + SMOKE
    rows = []
    with common.runs_folder(args, "lmforge-finetune-levers-") as (out, _):
        # each finished run is appended to OUT/rows.jsonl at once: an interrupted sweep run again
        # with the same --out and overrides skips what it finished (hours of CPU are not lost)
        done = _finished_rows(out / "rows.jsonl", extra)
        for name in names:
            for seed in seeds:
                row = done.get((name, seed))
                if row is None:
                    row = run(name, seed, out, extra, args.smoke)
                    _append_row(out / "rows.jsonl", {**row, "overrides": extra, "recipe": recipe_id(name, extra)})
                else:
                    print(f"finetune_levers: {name} seed {seed} was finished before: {row['run_dir']}")
                rows.append(row)
    report = {"seeds": seeds, "overrides": extra, "rows": rows, "summary": summarise(rows),
              "variants": {n: {"overrides": list(VARIANTS[n][0]), "why": VARIANTS[n][1]} for n in names}}
    return common.print_report(report, args.json, print_text)


if __name__ == "__main__":
    raise SystemExit(main())
