"""Does interpolating a fine-tuned classifier's weights back toward its start help out of its
domain? WiSE-FT (Wortsman et al. 2022): for each fine-tuning run given and each alpha of a grid,
the weights (1 - alpha) x start + alpha x fine-tuned, where the start is the run's starting
encoder with its heads fitted as a linear probe (what classify.probe_first starts from); prints
validation accuracy (what alpha would be chosen on), test accuracy and the out-of-domain sets
vader-tweets and vader-nyt (reported, never chosen on), and the accuracy of the sign of the
rating head's prediction beside the polarity head's.

    python experiments/wise_ft.py runs/levers/shipped/classify.2026...   # one run or several
    python experiments/wise_ft.py RUN... --alphas 0 0.5 0.8 0.9 1 --json
    python experiments/wise_ft.py --soup RUN_SEED0 RUN_SEED1 RUN_SEED2      # their average as the end point
    python experiments/wise_ft.py --smoke                                 # a tiny run: checks the script runs

With --soup the runs are the ingredients of a uniform model soup (Wortsman et al. 2022, "Model
soups"): the end point is the mean of their fine-tuned weights, which only makes sense for runs
that started from the same weights (the same config but the seed: with classify.probe_first the
start does not depend on the seed); the start is the first run's.

alpha = 1 is the run as it finished (its last checkpoint), alpha = 0 its start (the run's own
start.safetensors where it kept one, else the linear probe of its starting encoder). Every
forward pass here is under bf16 autocast, as the runs' validations are; a run's summary.json
measures test and the out-of-domain sets in fp32, so its figures differ from the alpha = 1 row
by a few tenths of a point.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

import common
from lmforge.config import load_config, to_dict
from lmforge.data.sentiment import EVALUATION_ONLY, load_labeled
from lmforge.eval.evaluate import predict_ids
from lmforge.jobs import finetune
from lmforge.runs.readers import run_weights
from lmforge.tasks.classify import WISE_START, ClassifyTask, interpolate, read_weights  # as classify.wise_alpha does

ALPHAS = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SETS = ("val", "test", *EVALUATION_ONLY)


def scores(task: ClassifyTask, model, ood: dict, limit: int | None) -> dict:
    """{set: {"accuracy", "rating sign", "answered positive"}} of `model` on validation, test and
    the out-of-domain sets."""
    out = {}
    with torch.autocast("cpu", torch.bfloat16):
        for name, split in (("val", "validation"), ("test", "test")):
            p = task.predict_split(model, split, torch.device("cpu"))
            out[name] = summary_of(p["logits"][:limit], p["ratings"][:limit], p["labels"][:limit])
        for name, (encoded, labels) in ood.items():
            logits, ratings = predict_ids(model, task.tokenizer, encoded, task.cfg.data.seq_len, 256)
            out[name] = summary_of(logits, ratings, labels)
    return out


def summary_of(logits: torch.Tensor, ratings: torch.Tensor, labels: torch.Tensor) -> dict:
    said = logits.argmax(-1)
    row = {"accuracy": float((said == labels).float().mean()), "answered positive": float(said.float().mean())}
    if not ratings.isnan().any():  # classes negative, positive: the rating's sign is a verdict too
        row["rating sign"] = float(((ratings > 0).long() == labels).float().mean())
    return row


def fine_tuned_weights(run_dir: Path) -> dict:
    """The run's fine-tuned weights: its last checkpoint (not wise.safetensors: this script does
    the interpolating)."""
    weights = run_weights(run_dir)
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


def soup_of(weights: list[dict]) -> dict:
    """The uniform soup: the mean of the state dicts, tensor by tensor (integer buffers from the first)."""
    return {k: torch.stack([w[k] for w in weights]).mean(0) if v.is_floating_point() else v
            for k, v in weights[0].items()}


def same_start(runs: list[Path]) -> None:
    """Refuse, in one line, soup ingredients whose configs differ in more than train.seed (and
    where they were written): those did not start from the same weights."""
    def recipe(run):
        d = to_dict(load_config(run / "config.yaml", migrate_run=True))
        d["train"].pop("seed"), d.pop("out_dir")
        return d
    first = recipe(runs[0])
    for run in runs[1:]:
        if recipe(run) != first:
            raise SystemExit(f"wise_ft: {run} was not trained as {runs[0]} was but for its seed: not an ingredient "
                             f"of the same soup")


def study(run_dir: Path, alphas: list[float], limit: int | None, soup: list[Path] = ()) -> dict:
    cfg = load_config(run_dir / "config.yaml", migrate_run=True)
    start_cfg = load_config(run_dir / "config.yaml", ["classify.probe_first=true", "classify.wise_alpha=1"],
                            migrate_run=True)
    task = ClassifyTask.create(start_cfg)  # the run's split, tokenizer and starting encoder + probe heads
    if (run_dir / WISE_START).is_file():  # the run kept its start (classify.wise_alpha < 1): that one exactly
        start = read_weights(run_dir / WISE_START)[0]
    else:
        start = {k: v.clone() for k, v in task.model.state_dict().items()}
        if not cfg.classify.probe_first:
            print(f"wise_ft: warning: {run_dir} started from heads of its own (classify.probe_first=false); alpha 0 "
                  f"here is a linear probe of its starting encoder, not its start", file=sys.stderr)
    if soup:
        same_start([run_dir, *soup])
    end = soup_of([fine_tuned_weights(r) for r in (run_dir, *soup)])
    ood = {}
    for name in EVALUATION_ONLY:
        examples = load_labeled(name).examples[:limit]
        ood[name] = (task.tokenizer.encode_batch([e.text for e in examples]),
                     torch.tensor([e.label for e in examples]))
    model = task.model.eval()
    rows = {}
    for alpha in alphas:
        model.load_state_dict(interpolate(start, end, alpha))
        rows[f"{alpha:g}"] = scores(task, model, ood, limit)
        print(f"wise_ft: {run_dir.name} alpha {alpha:g}: " + ", ".join(
            f"{k} {v['accuracy']:.4f}" for k, v in rows[f'{alpha:g}'].items()), file=sys.stderr)
    chosen = max(rows, key=lambda a: (rows[a]["val"]["accuracy"], float(a)))  # ties: the fine-tuned side
    return {"alphas": rows, "chosen on val": chosen}


def mean_over_runs(studies: dict) -> dict:
    alphas = next(iter(studies.values()))["alphas"]
    return {a: {s: statistics.mean(st["alphas"][a][s]["accuracy"] for st in studies.values()) for s in SETS}
            for a in alphas}


def print_text(report: dict) -> None:
    print(f"accuracy by alpha, mean of {len(report['runs'])} run(s) (alpha 1 = fine-tuned, 0 = the probe of its start)")
    print(f"{'alpha':>5} " + " ".join(f"{s:>13}" for s in SETS))
    for a, row in report["mean"].items():
        print(f"{a:>5} " + " ".join(f"{row[s]:>13.4f}" for s in SETS))
    for run, st in report["runs"].items():
        a = st["chosen on val"]
        r = st["alphas"][a]
        print(f"{run}: chosen on val alpha {a}: " + ", ".join(f"{s} {r[s]['accuracy']:.4f}" for s in SETS))
        last = list(st["alphas"])[-1]
        one = st["alphas"][last]
        print(f"  alpha {last}, rating head's sign: " + ", ".join(
            f"{s} {one[s]['rating sign']:.4f}" for s in SETS if "rating sign" in one[s]))


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="interpolation weights of the "
                   "fine-tuned side (default %(default)s)")
    p.add_argument("--soup", action="store_true", help="one study of the runs' averaged weights (a uniform soup)")
    common.add_run_dir_options(p)
    args = common.parse_run_dir_options(p)
    if any(not 0 <= a <= 1 for a in args.alphas):
        p.error("--alphas must lie in [0, 1]")
    report = {"runs": {}}
    with common.runs_folder(args, "wise-ft-") as (_, scratch):
        runs = [Path(r) for r in args.runs]
        if args.smoke:
            smoke = common.tiny_classifier(scratch)
            # a soup's second ingredient: here from a random encoder of its own seed (the smoke checks
            # the mechanics; MiniLM's runs with classify.probe_first share their start)
            for seed in (0, 1) if args.soup else (0,):
                runs.append(finetune(load_config(common.CONFIGS / "mr-minilm.yaml", [*smoke, f"train.seed={seed}"]))[0])
        limit = 64 if args.smoke else None
        if args.soup:
            report["runs"][f"soup of {len(runs)}: " + " ".join(map(str, runs))] = study(runs[0], args.alphas, limit,
                                                                                       runs[1:])
        for run_dir in runs if not args.soup else ():
            report["runs"][str(run_dir)] = study(run_dir, args.alphas, limit)
    report["mean"] = mean_over_runs(report["runs"])
    return common.print_report(report, args.json, print_text)


if __name__ == "__main__":
    sys.exit(main())
