"""Memory stays flat: a long tiny run's resident memory must not creep up (a leak in the step,
evaluation, logging or checkpointing would), and batches need no loader workers or queues.

The run logs `rss_mb` with every train record (train/machine.py); the test reads it back.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import tiny_config
from lmforge.config import dump_yaml
from lmforge.train.log import read_metrics


@pytest.mark.slow
def test_rss_grows_less_than_5_percent_over_2000_steps_after_warm_up(tiny_prepared, tmp_path):
    cfg = tiny_config(tiny_prepared, tmp_path / "runs", "train.max_steps=2000", "train.log_every=50",
                      "train.eval_every=100", "train.checkpoint_every=100", "train.keep_checkpoints=2")
    config = tmp_path / "long.yaml"
    config.write_text(dump_yaml(cfg))
    # a fresh process, so that nothing else in it allocates while the run is measured
    proc = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--config", str(config)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    rss = {r["step"]: r["rss_mb"] for r in read_metrics(run_dir) if r["split"] == "train"}
    assert sorted(rss) == list(range(50, 2001, 50))
    warm = rss[200]  # after two evaluations and two checkpoints have allocated what they need
    peak_after = max(v for step, v in rss.items() if step >= 200)
    growth = peak_after / warm - 1
    print(f"rss at step 200: {warm:.1f} MB, highest after: {peak_after:.1f} MB, growth {growth:.2%}")
    assert growth < 0.05, {step: v for step, v in rss.items()}


def test_every_train_record_carries_the_resident_memory(tiny_prepared, tmp_path):
    from lmforge.jobs import pretrain

    run_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path, "train.max_steps=3"))
    records = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    assert len(records) == 3 and all(50 < r["rss_mb"] < 50_000 for r in records)
