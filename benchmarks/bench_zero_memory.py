"""Per-rank peak memory of one model trained under each data-parallel strategy (seed
HelloDeepSpeed's "show the memory reduction"): DDP, FSDP2, ZeRO-1, ZeRO-2, ZeRO-3, and ZeRO with
the optimizer (and parameters) offloaded to CPU memory.

Each strategy is a real `lmforge pretrain` under `torchrun --nproc_per_node=N` on the bundled
corpus, a few steps of a BERT-base-sized model (L12 H768, 110M parameters, fp32, AdamW), with
every rank reporting its own peak. On a CUDA GPU the figure is torch.cuda.max_memory_allocated
(the memory ZeRO is about); on a CPU it is the peak resident memory of the rank's process
(VmHWM), where "offload to CPU" cannot save anything — it moves state between two kinds of the
same memory — so the offload rows show its cost, not its saving.

What is measured on a CPU: the peak during training only, from the first step to the final
checkpoint (Linux's VmHWM, reset through /proc/self/clear_refs), with glibc told to hand every
allocation above 128 KiB back to the system when freed (MALLOC_MMAP_THRESHOLD_), so that resident
memory follows the live tensors rather than the heap's high-water mark. The final checkpoint's
consolidation on rank 0 (the whole model and AdamW state gathered into one process for the
single-process format) is reported apart, as `checkpoint_mb`.

Model-state arithmetic for comparison (fp32 weights 4 B, gradients 4 B, AdamW 8 B per
parameter, N ranks): DDP 16 B/param; ZeRO-1 4 + 4 + 8/N; ZeRO-2 4 + (4 + 8)/N; ZeRO-3 and FSDP
16/N (plus the layers gathered at a time and the activations).

    python benchmarks/bench_zero_memory.py                 # BERT-base size, 2 ranks, every strategy
    python benchmarks/bench_zero_memory.py --smoke --json  # tiny model, DDP and ZeRO-3: what CI runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STRATEGIES = {
    "ddp": ["distributed.strategy=ddp"],
    "fsdp": ["distributed.strategy=fsdp"],
    "zero-1": ["distributed.strategy=deepspeed", "distributed.zero_stage=1"],
    "zero-2": ["distributed.strategy=deepspeed", "distributed.zero_stage=2"],
    "zero-3": ["distributed.strategy=deepspeed", "distributed.zero_stage=3"],
    "zero-2 + offload optimizer": ["distributed.strategy=deepspeed", "distributed.zero_stage=2",
                                   "distributed.offload_optimizer=true"],
    "zero-3 + offload optimizer, params": ["distributed.strategy=deepspeed", "distributed.zero_stage=3",
                                           "distributed.offload_optimizer=true", "distributed.offload_param=true"],
}
BERT_BASE = ["model.hidden_size=768", "model.num_layers=12", "model.num_heads=12", "model.intermediate_size=3072"]
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128"]


# -- inside each rank (this file run by torchrun with --rank-worker) -------------------------------
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def rank_worker(argv: list[str], report: Path) -> None:
    """Run `lmforge pretrain argv` in this rank, measuring the training peak (see the top)."""
    import torch

    import lmforge.train.loop as loop
    from lmforge.cli import main

    marks: dict = {}
    make_engine, accumulate = loop.make_engine, loop.accumulate_gradients

    def first_step_resets(*args, **kwargs):  # training starts: the peak counts from here
        if "start_mb" not in marks:
            marks["start_mb"] = _status_mb("VmRSS")
            _reset_peak()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        return accumulate(*args, **kwargs)

    def measured_engine(*args, **kwargs):
        engine = make_engine(*args, **kwargs)
        full_state = engine.full_state

        def full_state_measured():
            if "start_mb" not in marks:  # checkpoint 0, before training
                return full_state()
            marks["train_peak_mb"] = _status_mb("VmHWM")  # the final checkpoint: training is over
            if torch.cuda.is_available():
                marks["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            _reset_peak()
            result = full_state()
            marks["checkpoint_mb"] = _status_mb("VmHWM")  # gathering the whole state to rank 0
            return result

        engine.full_state = full_state_measured
        return engine

    loop.accumulate_gradients = first_step_resets
    loop.make_engine = measured_engine
    code = main(["pretrain", *argv])
    rank = int(os.environ.get("RANK", "0"))
    with open(report, "a") as f:
        f.write(json.dumps({"rank": rank, **marks}) + "\n")
    raise SystemExit(code)


# -- the driver ------------------------------------------------------------------------------------
def measure(name: str, overrides: list[str], args, out: Path) -> dict:
    report = out / f"{name.replace(' ', '_').replace(',', '')}.jsonl"
    argv = ["--config", str(ROOT / "configs" / "bert-tiny.yaml"), f"out_dir={out / 'runs'}", "train.progress=false",
            f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", "train.eval_batches=1",
            f"train.checkpoint_every={args.steps}", f"train.batch_size={args.batch}", "train.precision=fp32",
            *(TINY if args.smoke else BERT_BASE), *overrides]
    if args.smoke:
        argv += [f"data.corpus={_tiny_corpus(out)}", "data.seq_len=32", "model.max_position_embeddings=64",
                 "data.tokenizer=bert-base-uncased"]
    if "distributed.strategy=deepspeed" in overrides:  # bucket sizes and stage-3 limits of the example config
        argv.append(f"distributed.deepspeed_config={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
           str(Path(__file__).resolve()), "--rank-worker", str(report), *argv]
    # glibc returns every allocation above 128 KiB to the system when it is freed, so resident
    # memory follows the live tensors rather than the heap's high-water mark
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    ranks = sorted((json.loads(line) for line in report.read_text().splitlines()), key=lambda r: r["rank"])
    key = "cuda_peak_mb" if "cuda_peak_mb" in ranks[0] else "train_peak_mb"
    return {"strategy": name, "per_rank_peak_mb": [round(r[key], 1) for r in ranks],
            "start_mb": [round(r["start_mb"], 1) for r in ranks],
            "checkpoint_mb": round(ranks[0]["checkpoint_mb"], 1), "memory": "cuda" if key == "cuda_peak_mb" else "rss"}


def _tiny_corpus(folder: Path) -> Path:
    path = folder / "corpus.txt"
    if not path.exists():
        words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
        path.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + "."
                                    for i in range(400)) + "\n")
    return path


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--rank-worker":
        return rank_worker(sys.argv[3:], Path(sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="processes (default 2)")
    p.add_argument("--steps", type=int, default=3, help="training steps per strategy (default 3)")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step (default 4)")
    p.add_argument("--strategies", nargs="+", default=None, help=f"a subset of: {', '.join(STRATEGIES)}")
    p.add_argument("--smoke", action="store_true", help="a tiny model on a tiny corpus, ddp and zero-3: for CI")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()
    names = args.strategies or (["ddp", "zero-3"] if args.smoke else list(STRATEGIES))
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="lmforge-zero-mem-") as tmp:
        for name in names:
            if not args.json:
                print(f"  {name} ...", file=sys.stderr, flush=True)
            results.append(measure(name, STRATEGIES[name], args, Path(tmp)))
    base = max(results[0]["per_rank_peak_mb"])
    for r in results:
        r["vs_first"] = round(max(r["per_rank_peak_mb"]) / base, 3)
    report = {"ranks": args.ranks, "steps": args.steps, "batch_per_rank": args.batch,
              "model": "tiny" if args.smoke else "BERT-base size (L12 H768, fp32)", "results": results}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    mem = "CUDA max allocated" if results[0]["memory"] == "cuda" else "peak RSS during training"
    print(f"\n{report['model']}, {args.ranks} ranks x batch {args.batch}, {args.steps} steps; {mem} per rank (MB)")
    print(f"{'strategy':<36}" + "".join(f"{'rank ' + str(i):>10}" for i in range(args.ranks))
          + f"{'vs ' + results[0]['strategy']:>10}{'at start':>10}{'ckpt (rank 0)':>15}")
    for r in results:
        print(f"{r['strategy']:<36}" + "".join(f"{m:>10,.0f}" for m in r["per_rank_peak_mb"])
              + f"{r['vs_first']:>10.2f}{r['start_mb'][0]:>10,.0f}{r['checkpoint_mb']:>15,.0f}")
    print("at start: rank 0's resident memory at its first step (libraries, data, the model as the strategy "
          "holds it; AdamW's state is made at the first update). ckpt: rank 0's peak while the final "
          "checkpoint is gathered into the single-process format.")


if __name__ == "__main__":
    main()
