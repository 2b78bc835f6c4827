"""What lmforge's three diagnostics show on a deliberately broken config: configs/bert-tiny.yaml
as shipped (optim.lr=1e-3) beside the same config with a learning rate 300x too high (0.3).

For each learning rate:
- the overfit test (train.overfit_batches=1, dropout off, 200 steps): its verdict, the loss's
  fall, the step it got under 5% of its start, and what it says to look at;
- a short run with log.layer_stats=true (200 steps): the held-out loss, and per block the
  update-to-weight ratio at the first logging step (before the weights have grown to match the
  rate; about 1e-3 is healthy for Adam) and the median RMS of its output (LayerNorm keeps it
  near 1 unless its gains grow);
and once for the config, `lmforge lr-find`'s suggestion (the range test does not depend on the
config's learning rate). The README's "When it does not learn" section quotes this report.

    python experiments/when_it_does_not_learn.py                  # ~5 min on 2 CPU cores
    python experiments/when_it_does_not_learn.py --smoke --json    # tiny sizes: checks the script runs
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import common
from lmforge.config import load_config
from lmforge.jobs import pretrain
from lmforge.lrfind import lr_find
from lmforge.train.log import read_metrics

CONFIG = common.CONFIGS / "bert-tiny.yaml"
RATES = {"shipped": 1e-3, "broken": 0.3}
SMOKE = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
         "train.batch_size=4", "data.seq_len=32", "train.eval_batches=1"]


def overrides_for(lr: float, steps: int, out: Path, extra: list[str]) -> list[str]:
    return [f"optim.lr={lr}", f"train.max_steps={steps}", f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}", "train.log_every=10", "train.progress=false", "train.max_time_s=null",
            f"out_dir={out}", *extra]


def overfit(lr: float, steps: int, out: Path, extra: list[str]) -> dict:
    cfg = load_config(CONFIG, overrides_for(lr, steps, out, extra) + ["train.overfit_batches=1", "model.dropout=0"])
    run_dir, s = pretrain(cfg)
    return {"verdict": s["overfit"], "first_loss": s["overfit_first_loss"], "last_loss": s["overfit_last_loss"],
            "loss_ratio": s["overfit_loss_ratio"], "reached_step": s["overfit_reached_step"],
            "hint": s.get("overfit_hint", ""), "run_dir": str(run_dir)}


def layer_stats(lr: float, steps: int, out: Path, extra: list[str]) -> dict:
    cfg = load_config(CONFIG, overrides_for(lr, steps, out, extra) + ["log.layer_stats=true"])
    run_dir, s = pretrain(cfg)
    records = read_metrics(run_dir)
    layers = [r for r in records if r["split"] == "layers"]
    blocks = sorted({k.rsplit("/", 1)[0] for r in layers for k in r if k.endswith("/update_ratio")})
    train = [r for r in records if r["split"] == "train"]
    return {"final_train_loss": train[-1]["loss"], "val_loss": s["val_loss"], "unigram_val_loss": s["unigram_val_loss"],
            "first_update_ratio": {b: layers[0][f"{b}/update_ratio"] for b in blocks},
            "median_update_ratio": {b: statistics.median(r[f"{b}/update_ratio"] for r in layers) for b in blocks},
            "median_act_rms": {b: statistics.median(r[f"{b}/act_rms"] for r in layers) for b in blocks},
            "first_log_step": layers[0]["step"], "run_dir": str(run_dir)}


def print_text(report: dict) -> None:
    suggested = report["lr_find"]["suggested_lr"]
    print(f"configs/bert-tiny.yaml, {report['steps']} steps per run; lr-find suggests "
          + (f"optim.lr={suggested:.2g}" if suggested is not None else "nothing (the loss never fell)")
          + f" (the config ships {RATES['shipped']:g})")
    for name, r in report["rates"].items():
        o, ls = r["overfit"], r["layer_stats"]
        first = ", ".join(f"{b} {v:.1e}" for b, v in ls["first_update_ratio"].items())
        rms = ", ".join(f"{b} {v:.2f}" for b, v in ls["median_act_rms"].items())
        print(f"optim.lr={r['lr']:g} ({name}): overfit test: {o['verdict']} (loss {o['first_loss']:.3g} -> "
              f"{o['last_loss']:.3g}, {o['loss_ratio']:.1%}"
              + (f", under 5% at step {o['reached_step']})" if o["reached_step"] else ")")
              + (f"; it says: {o['hint']}" if o["hint"] else ""))
        print(f"  layer statistics: update/weight at step {ls['first_log_step']} {first}; median output RMS {rms}; "
              f"held-out loss {ls['val_loss']:.3f} (unigram baseline {ls['unigram_val_loss']:.3f})")


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=200, help="steps of each run (default %(default)s)")
    common.add_run_options(p, smoke="tiny models, a few steps: checks the script runs")
    args = p.parse_args()
    steps, extra = (20, SMOKE) if args.smoke else (args.steps, [])
    started = time.time()
    with common.runs_folder(args, "lmforge-when-it-does-not-learn-") as (out, scratch):
        rates = {name: {"lr": lr, "overfit": overfit(lr, steps, out / f"overfit-{name}", extra),
                        "layer_stats": layer_stats(lr, steps, out / f"layers-{name}", extra)}
                 for name, lr in RATES.items()}
        found = lr_find(load_config(CONFIG, extra), "configs/bert-tiny.yaml", out / "lr-find.png",
                        steps=40 if args.smoke else 200, progress=False)
    report = {"steps": steps, "rates": rates, "seconds": round(time.time() - started, 1),
              "lr_find": {"suggested_lr": found.suggested_lr, "steepest_lr": found.steepest_lr,
                          "minimum_lr": found.minimum_lr, "stopped": found.stopped, "picture": found.picture}}
    return common.print_report(report, args.json, print_text)


if __name__ == "__main__":
    raise SystemExit(main())
