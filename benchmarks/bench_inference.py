"""Inference speed (examples/s): `lmforge classify` and `lmforge predict` against transformers' pipelines.

Two pairs, each on the same weights and the same movie-review texts (the first --examples of the
test split), all four timed in interleaved rounds (one full pass over the texts per variant per
round, median reported), tokenization and output formatting included, as a user would run them:
  lmforge-classify   lmforge.eval.classify.classify_texts (what `lmforge classify --input` runs), on
                     a Classifier: the bundled MiniLM-L6-H384 encoder + seeded random heads;
                     its own batching (batch 64, texts sorted by length, padding to the batch's longest)
  hf-classify        pipeline("text-classification", batch_size=32) on a BertForSequenceClassification
                     directory holding the same encoder and polarity head (transformers' pooler
                     comes from MiniLM: one extra 384x384 matmul per text); texts in given order
  lmforge-fill-mask  lmforge.eval.predict.fill_mask (what `lmforge predict` runs), top 5 per [MASK]
  hf-fill-mask       pipeline("fill-mask", top_k=5, batch_size=32)
Both sides truncate classification inputs to --max-len tokens. The fill-mask model is MiniLM with
a seeded random masked-LM head, exported by `lmforge.export` to a transformers directory that
both sides load; each text has its middle word replaced by [MASK]. Predictions are noise (random
heads); what is measured is speed on identical work.

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode records every matmul
and attention kernel of the first (warm-up) pass at the padded shapes really run; MFU is those
FLOPs per second over the fp32 matmul peak measured in this run. "peak RSS MB" is the resident
memory the variant's loading and warm-up pass added (sampled every 2 ms).

    python benchmarks/bench_inference.py                  # 512 texts, MiniLM-L6-H384
    python benchmarks/bench_inference.py --smoke --json   # seconds; what CI runs to keep this working
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import common
from lmforge.config import ModelConfig
from lmforge.data.sentiment import LABELS, load_labeled, stratified_split
from lmforge.data.tokenizers import load_tokenizer, minilm_model_dir
from lmforge.eval.classify import classify_texts
from lmforge.eval.predict import fill_mask
from lmforge.export import export_hf, write_hf_tokenizer
from lmforge.models.classifier import Classifier
from lmforge.models.hf import model_config_from_hf
from lmforge.runs.readers import read_hf_dir
from lmforge.tasks.loading import load_model

VARIANTS = ("lmforge-classify", "hf-classify", "lmforge-fill-mask", "hf-fill-mask")
PAIRS = {"hf-classify": "lmforge-classify", "hf-fill-mask": "lmforge-fill-mask"}


def movie_review_texts(n: int) -> list[str]:
    data = load_labeled("movie-reviews")
    test = stratified_split([e.label for e in data.examples], 1234)["test"]
    return [data.examples[i].text for i in test[:n]]


def mask_middle_word(text: str) -> str:
    words = text.split()
    words[len(words) // 2] = "[MASK]"
    return " ".join(words)


def write_classifier_dirs(folder: Path) -> tuple[Classifier, Path]:
    """lmforge's Classifier (MiniLM encoder, seeded heads) and a transformers
    BertForSequenceClassification directory with the same encoder and polarity head."""
    import transformers

    hf_cfg, hf_state = read_hf_dir(minilm_model_dir())
    cfg: ModelConfig = model_config_from_hf(hf_cfg)
    torch.manual_seed(0)
    ours = Classifier(cfg, len(LABELS), (-4.0, 4.0))
    loaded = load_model(minilm_model_dir(), mlm_head_required=False).model
    ours.load_state_dict({k: v for k, v in loaded.state_dict().items() if k.startswith("bert.")}, strict=False)
    hf = transformers.BertForSequenceClassification.from_pretrained(minilm_model_dir(), num_labels=len(LABELS))
    with torch.no_grad():
        hf.classifier.weight.copy_(ours.polarity.weight)
        hf.classifier.bias.copy_(ours.polarity.bias)
    out = folder / "hf-classifier"
    hf.save_pretrained(out)
    write_hf_tokenizer(load_tokenizer("bert-base-uncased"), out, cfg.max_position_embeddings)
    return ours.eval(), out


class Variant:
    """One tool's pass over all texts; built (loaded) inside PeakRSS with its FLOP-counted warm-up pass."""

    def __init__(self, name, build, run):
        self.name, self.seconds = name, []
        with common.PeakRSS() as mem:
            self.state = build()
            # Inference only; also keeps FlopCounterMode's module tracker from tripping over a
            # parameter passed as an argument (the tied decoder) under inference_mode.
            model = self.state.model if hasattr(self.state, "model") else self.state[0]
            model.requires_grad_(False)
            self.run = lambda: run(self.state)
            self.flops_per_pass = common.count_flops(self.run)
        self.peak_rss_mb = mem.added_mb


def main(argv=None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--examples", type=int, default=512, help="texts per pass (from the test split, 1,057 at most)")
    p.add_argument("--max-len", type=int, default=64, help="classification: at most this many tokens per text")
    p.add_argument("--hf-batch", type=int, default=32, help="transformers pipelines' batch_size (their default is 1)")
    p.add_argument("--lmforge-batch", type=int, default=64, help="lmforge classify's batch size (its default: 64)")
    p.add_argument("--rounds", type=int, default=5, help="timed passes per variant (interleaved; median reported)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    common.check_choices(p, args.variants, VARIANTS, "variant")
    if args.smoke:
        args.examples, args.rounds = 8, 2
    common.setup(args)
    import transformers

    texts = movie_review_texts(args.examples)
    masked_texts = [mask_middle_word(t) for t in texts]
    tmp = tempfile.TemporaryDirectory(prefix="lmforge-bench-")
    folder = Path(tmp.name)
    classifier, hf_classifier_dir = write_classifier_dirs(folder)
    torch.manual_seed(0)  # the random masked-LM head that both sides load
    mlm_dir = export_hf(minilm_model_dir(), folder / "hf-mlm")

    def build_lmforge_classify():
        return classifier, load_tokenizer("bert-base-uncased")

    def build_lmforge_fill_mask():
        loaded = load_model(mlm_dir)
        return loaded.model, loaded.tokenizer

    specs = {
        "lmforge-classify": (build_lmforge_classify, lambda s: classify_texts(
            s[0], s[1], texts, args.max_len, batch_size=args.lmforge_batch)),
        "hf-classify": (lambda: transformers.pipeline("text-classification", model=str(hf_classifier_dir),
                                                      device="cpu", batch_size=args.hf_batch),
                        lambda pipe: pipe(texts, truncation=True, max_length=args.max_len)),
        "lmforge-fill-mask": (build_lmforge_fill_mask, lambda s: fill_mask(s[0], s[1], masked_texts, top_k=5)),
        "hf-fill-mask": (lambda: transformers.pipeline("fill-mask", model=str(mlm_dir), device="cpu", top_k=5,
                                                       batch_size=args.hf_batch),
                         lambda pipe: pipe(masked_texts)),
    }
    peak = common.matmul_peak_flops(n=512 if args.smoke else 2048, reps=2 if args.smoke else 10)
    variants = [Variant(n, *specs[n]) for n in args.variants.split(",")]
    common.interleave(variants, args.rounds, lambda v, r: v.run())
    tmp.cleanup()

    results = [common.examples_row(v, len(texts), "pass", v.flops_per_pass, peak) for v in variants]
    common.add_lmforge_speedups(results, counterpart=lambda variant: PAIRS.get(variant, variant))
    report = {"benchmark": "inference", "config": vars(args), "texts": len(texts), **common.environment(peak),
              "results": results}
    title = (f"Inference on {len(texts)} movie-review texts, MiniLM-L6-H384, fp32, {torch.get_num_threads()} threads; "
             f"lmforge classify batch {args.lmforge_batch} (length-sorted), pipelines batch_size={args.hf_batch}; "
             f"matmul peak {peak / 1e9:.0f} GFLOP/s")
    columns = [("variant", "variant", "s"), ("examples_per_s", "examples/s", ",.1f"),
               ("lmforge_speedup_over_this", "lmforge x", ".2f"), ("mfu", "MFU", ".1%"),
               ("peak_rss_mb", "peak RSS MB", ",.0f"), ("gflops_per_pass", "GFLOP/pass", ",.1f")]
    common.print_report(report, title, columns, args.json,
                        notes=["lmforge x: the lmforge variant of the same pair (classify / fill-mask) over this one"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
