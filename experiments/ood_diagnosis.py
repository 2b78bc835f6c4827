"""Why does a fine-tuned movie-review classifier fail out of its domain? For each fine-tuning run
given, on the out-of-domain sets vader-tweets and vader-nyt: how often it answers "positive"
against how often that is true, its accuracy by the strength of the human rating, with and
without the tweets' anonymisation placeholders ("http://url_removed", "@anonymous") and with
them removed, and its probability of "positive" for a few plain sentences with and without a
link. With --probe, the same for a linear probe of the run's starting encoder (the heads fitted
on its frozen pooled states, as classify.probe_first does): what the pretrained features alone
do out of the domain.

    python experiments/ood_diagnosis.py runs/classify.2026...            # one run or several
    python experiments/ood_diagnosis.py runs/classify.2026... --probe --json
    python experiments/ood_diagnosis.py --smoke                           # a tiny run: checks the script runs

The placeholders are what the VADER authors put in place of links and user names; a tweet in
the wild has a real link there. Removing them is a diagnosis, not a fix: the fixes are the
levers of experiments/finetune_levers.py (docs/finetuning.md, "Out of its domain").
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

import common
from lmforge.config import load_config
from lmforge.data.sentiment import EVALUATION_ONLY, load_labeled
from lmforge.eval.evaluate import predict_ids
from lmforge.jobs import finetune
from lmforge.tasks.classify import ClassifyTask, load_classifier

MARKERS = ("http://url_removed", "@anonymous", ":)")
BANDS = ((0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0))  # |mean human rating| on -4..+4
SENTENCES = ("People are great.", "My new boots! Like butta.", "What a lovely day.", "The food was delicious.",
             "I hate waiting in line.", "This is the worst phone I ever had.")
LINK = " http://url_removed"


def strip_placeholders(text: str) -> str:
    """The text without the VADER archive's anonymisation placeholders (the text itself if that
    leaves nothing)."""
    return re.sub(r"\s*https?://\S+", "", re.sub(r"@anonymous\s*", "", text)).strip() or text


def diagnose(model, tokenizer, max_len: int, limit: int | None) -> dict:
    """The diagnosis of one classifier (classes negative, positive), as the module docstring says."""
    def positive(texts: list[str]) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16):
            logits = predict_ids(model, tokenizer, tokenizer.encode_batch(texts), max_len, 256)[0]
        return logits.float().softmax(-1)[:, 1]

    out = {"sentences": {}}
    for text in SENTENCES:
        p = positive([text, text + LINK])
        out["sentences"][text] = {"plain": float(p[0]), "with a link": float(p[1])}
    for name in EVALUATION_ONLY:
        examples = load_labeled(name).examples[:limit]
        texts = [e.text for e in examples]
        labels = torch.tensor([e.label for e in examples])
        ratings = torch.tensor([e.rating for e in examples]).abs()
        said = (positive(texts) > 0.5).long()
        right = said == labels
        row = {"examples": len(examples), "accuracy": float(right.float().mean()),
               "answered positive": float(said.float().mean()), "positive": float(labels.float().mean()),
               "by rating strength": {}, "markers": {}}
        for lo, hi in BANDS:
            band = (ratings > lo) & (ratings <= hi)
            if band.any():
                row["by rating strength"][f"({lo:g}, {hi:g}]"] = {"examples": int(band.sum()),
                                                                  "accuracy": float(right[band].float().mean()),
                                                                  "answered positive": float(said[band].float().mean())}
        for marker in MARKERS:
            has = torch.tensor([marker in t for t in texts])
            if has.any() and (~has).any():
                row["markers"][marker] = {"examples": int(has.sum()), "accuracy with": float(right[has].float().mean()),
                                          "accuracy without": float(right[~has].float().mean())}
        cleaned = (positive([strip_placeholders(t) for t in texts]) > 0.5).long()
        row["accuracy, placeholders removed"] = float((cleaned == labels).float().mean())
        out[name] = row
    return out


def probe_of(run_dir: Path) -> tuple:
    """(model, tokenizer, max_len): the run's starting encoder with heads fitted as a linear probe."""
    cfg = load_config(run_dir / "config.yaml", ["classify.probe_first=true"], migrate_run=True)
    task = ClassifyTask.create(cfg)
    return task.model.eval(), task.tokenizer, cfg.data.seq_len


def print_text(report: dict) -> None:
    for key, d in report["diagnoses"].items():
        print(f"== {key}")
        for name in EVALUATION_ONLY:
            r = d[name]
            print(f"{name}: accuracy {r['accuracy']:.4f} on {r['examples']}; answers positive {r['answered positive']:.3f}"
                  f" (true: {r['positive']:.3f}); placeholders removed: {r['accuracy, placeholders removed']:.4f}")
            for band, b in r["by rating strength"].items():
                print(f"  |rating| in {band:<10} {b['examples']:>5}  accuracy {b['accuracy']:.3f}  answers positive "
                      f"{b['answered positive']:.3f}")
            for marker, m in r["markers"].items():
                print(f"  with {marker!r:<22} {m['examples']:>5}  accuracy {m['accuracy with']:.3f} (without: "
                      f"{m['accuracy without']:.3f})")
        print("p(positive): plain | with a link")
        for text, p in d["sentences"].items():
            print(f"  {p['plain']:.3f} | {p['with a link']:.3f}  {text}")


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--probe", action="store_true", help="also diagnose a linear probe of each run's starting encoder")
    common.add_run_dir_options(p)
    args = common.parse_run_dir_options(p)
    report = {"diagnoses": {}}
    with common.runs_folder(args, "ood-diagnosis-") as (_, scratch):
        runs = [Path(r) for r in args.runs]
        if args.smoke:
            cfg = load_config(common.CONFIGS / "mr-minilm.yaml",
                              [*common.tiny_classifier(scratch), "classify.rating_weight=0"])
            runs.append(finetune(cfg)[0])
        limit = 64 if args.smoke else None
        for run_dir in runs:
            cfg, tokenizer, model = load_classifier(run_dir)
            report["diagnoses"][str(run_dir)] = diagnose(model, tokenizer, cfg.data.seq_len, limit)
            if args.probe:
                report["diagnoses"][f"{run_dir} (linear probe of its start)"] = diagnose(*probe_of(run_dir), limit)
    return common.print_report(report, args.json, print_text)


if __name__ == "__main__":
    sys.exit(main())
