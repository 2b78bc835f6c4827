"""Does fine-tuning get better with the fixes of "Revisiting Few-sample BERT Fine-tuning" (Zhang
et al. 2021)? Fine-tunes the movie-review classifier from the bundled MiniLM encoder on a
few-sample training set, over several seeds, in two settings, and prints test accuracy (mean,
standard deviation, min, max) for each:

  original   the original BERT recipe: Adam without bias correction (optim.bias_correction=false),
             every pretrained layer kept, the usual 3 epochs
  fixed      bias-corrected Adam, the top encoder layer re-initialised (model.reinit_layers=1)
             and longer training (10 epochs)

The seed changes the classifier heads' initialisation, the dropout masks and the order of the
batches; the few-sample training set (data.train_examples, stratified) and the validation and
test splits stay the same. Validation is evaluated once, at the end. Usage:

    python experiments/finetune_fixes.py                  # 1,000 examples, 3 seeds, ~10 min on 2 cores
    python experiments/finetune_fixes.py --examples 500 --seeds 0 1 2 3 4 --json
    python experiments/finetune_fixes.py --smoke          # a tiny check that the script runs
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import common
from lmforge.config import load_config
from lmforge.jobs import finetune

# classify.wise_alpha=1 in both: "fixed" re-initialises a layer, which WiSE-FT's start cannot have
SETTINGS = {
    "original": {"overrides": ["optim.bias_correction=false", "model.reinit_layers=0", "classify.wise_alpha=1"],
                 "epochs": 3},
    "fixed": {"overrides": ["optim.bias_correction=true", "model.reinit_layers=1", "classify.wise_alpha=1"],
              "epochs": 10},
}


def run(setting: str, seed: int, examples: int, out_dir: Path, extra: list[str]) -> dict:
    batch = 32
    steps_per_epoch = math.ceil(examples / batch)
    steps = SETTINGS[setting]["epochs"] * steps_per_epoch
    cfg = load_config(common.CONFIGS / "mr-minilm.yaml", [
        *SETTINGS[setting]["overrides"], f"data.train_examples={examples}", f"train.seed={seed}",
        f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}", "train.keep_checkpoints=1", "train.progress=false",
        f"out_dir={out_dir / setting}", *extra])
    started = time.time()
    run_dir, summary = finetune(cfg)
    return {"setting": setting, "seed": seed, "steps": steps, "test_accuracy": summary["test_accuracy"],
            "val_accuracy": summary["val_accuracy"], "seconds": round(time.time() - started, 1),
            "run_dir": str(run_dir)}


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--examples", type=int, default=1000, help="training examples (default 1000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    common.add_run_options(p, smoke="a tiny encoder on a tiny dataset: checks the script runs", overrides="every run")
    args = p.parse_args()
    extra = list(args.overrides)
    with common.runs_folder(args, "lmforge-finetune-fixes-") as (out, scratch):
        if args.smoke:  # MiniLM on 200 made-up reviews, 32 tokens: seconds per run
            args.examples, args.seeds = 64, [0, 1]
            extra += [f"data.dataset={common.tiny_reviews(scratch / 'reviews.tsv')}", "data.seq_len=32",
                      "classify.evaluate_ood=false"]  # MiniLM on the 9,142 out-of-domain texts takes minutes
        results = [run(s, seed, args.examples, out, extra) for s in SETTINGS for seed in args.seeds]
    summary = {}
    for s in SETTINGS:
        acc = [r["test_accuracy"] for r in results if r["setting"] == s]
        summary[s] = {**common.accuracy_summary(acc), "runs": len(acc)}
    report = {"examples": args.examples, "seeds": args.seeds, "results": results, "summary": summary}
    return common.print_report(report, args.json, print_text)


def print_text(report: dict) -> None:
    print(f"movie-review test accuracy, MiniLM fine-tuned on {report['examples']} examples, seeds {report['seeds']}")
    print(f"{'setting':<10} {'mean':>7} {'std':>7} {'min':>7} {'max':>7}   runs")
    for s, v in report["summary"].items():
        print(f"{s:<10} {v['mean']:7.4f} {v['std']:7.4f} {v['min']:7.4f} {v['max']:7.4f}   "
              + " ".join(f"{r['test_accuracy']:.4f}" for r in report["results"] if r["setting"] == s))


if __name__ == "__main__":
    sys.exit(main())
