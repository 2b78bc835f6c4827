"""Does `lmforge plan --config`'s memory model hold? Its per-rank total for one process (weights,
gradients, optimizer state, the step's working memory it measures at 1 and 2 rows and
extrapolates) against the peak memory a training run of the same config really uses on this CPU.

For each config: the plan (lmforge/runplan.py, in the precision train.precision=auto picks
here), then, in a fresh process each (one process would reuse the first run's freed heap), the
model and lmforge's optimizer built and three training steps taken on random tokens at the
config's whole micro-batch, under the loop's autocast. Measured: the C heap's bytes in use
(glibc's mallinfo2, read after every aten op: what torch.cuda.max_memory_allocated is on a GPU),
at its peak above what was in use before the model was built. Ratio = planned / measured; the
goal is within 20%. The resident memory's peak (RSS, sampled every 2 ms) is shown beside it: it
also holds the heap's fragmentation and the libraries' code, which no plan of tensors predicts.

    python benchmarks/bench_plan_memory.py                  # bert-tiny, gpt-tiny, llama-tiny
    python benchmarks/bench_plan_memory.py --configs gpt-tiny --json
    python benchmarks/bench_plan_memory.py --smoke --json   # tiny shapes: what CI runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

import common
from lmforge.config import load_config
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.runplan import _forward, _model_and_config, malloc_in_use, plan_config
from lmforge.tasks import registry
from lmforge.train.loop import autocast_for
from lmforge.train.machine import resolve_precision
from lmforge.train.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("bert-tiny", "gpt-tiny", "llama-tiny")
SMOKE = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=2", "train.batch_size=4",
         "data.seq_len=32", "model.vocab_size=2000", "model.max_position_embeddings=64"]


def config_of(name: str, smoke: bool):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", SMOKE if smoke else [])
    return _model_and_config(cfg)[0]


class HeapPeak(TorchDispatchMode):
    """The most bytes the C heap had in use after any aten op, above `floor`."""

    def __init__(self, in_use, floor: int):
        super().__init__()
        self.in_use, self.floor, self.peak = in_use, floor, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use() - self.floor)
        return out


def measure(name: str, smoke: bool) -> int:
    """The child: build, three steps, print the peak heap in use and RSS added (MB) as one JSON line."""
    cfg = config_of(name, smoke)
    device = torch.device("cpu")
    precision = resolve_precision(device, cfg.train.precision, cfg.distributed.strategy, 1)
    torch.manual_seed(0)
    in_use = malloc_in_use()
    with common.PeakRSS() as mem:
        heap = HeapPeak(in_use, in_use())
        with heap:
            model = registry.objective(cfg.task.name).build_model(cfg).train()
            optimizer = make_optimizer(model, cfg.optim, device)
            for _ in range(3):
                with autocast_for(precision, device):
                    out = _forward(model, cfg, cfg.train.batch_size, cfg.data.seq_len)
                out.loss_sum.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del out
    print(json.dumps({"peak_heap_mb": heap.peak / 2**20, "peak_rss_added_mb": mem.added_mb, "precision": precision}))
    return 0


def main(argv=None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        return measure(args.measure, args.smoke)
    names = common.check_choices(p, args.configs, CONFIGS, "config")
    if malloc_in_use() is None:
        p.error("this benchmark reads glibc's malloc counts (mallinfo2), which this system does not have")
    common.setup(args)
    results = []
    for name in names:
        plan = plan_config(config_of(name, args.smoke), name, flops_per_s=1.0)  # the time is not what is checked
        planned = plan["memory_per_rank"]["ddp"]
        child = subprocess.run([sys.executable, __file__, "--measure", name, *(["--smoke"] if args.smoke else [])],
                               capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        measured = json.loads(child)
        total_mb = planned["total"] / 2**20
        results.append({"variant": name, "precision": plan["precision"], "planned_mb": total_mb,
                        "activations_mb": planned["activations"] / 2**20,
                        "static_mb": (planned["total"] - planned["activations"]) / 2**20,
                        "measured_mb": measured["peak_heap_mb"], "rss_mb": measured["peak_rss_added_mb"],
                        "ratio": total_mb / measured["peak_heap_mb"]})
    report = {"benchmark": "plan-memory", "config": vars(args), "results": results}
    common.print_report(report, "lmforge plan --config's memory per rank (one process) against the measured peak",
                        [("variant", "config", ""), ("precision", "precision", ""), ("static_mb", "weights+grads+opt MB", ",.0f"),
                         ("activations_mb", "step working MB", ",.0f"), ("planned_mb", "planned MB", ",.0f"),
                         ("measured_mb", "measured heap MB", ",.0f"), ("ratio", "planned / measured", ".2f"),
                         ("rss_mb", "RSS added MB", ",.0f")], args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
