"""report.png for a run: loss against tokens with the unigram baseline, learning rate, grad norm.

Reads only the run's metrics.jsonl, so it can be redrawn at any time, for a finished run or one
still training.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from lmforge.train.log import read_metrics  # noqa: E402


def write_report(run_dir: Path) -> Path:
    """Draw `run_dir/report.png` from `run_dir/metrics.jsonl` and return its path."""
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "validation"]
    fig, (ax_loss, ax_lr, ax_gn) = plt.subplots(1, 3, figsize=(16, 4.5))
    fig.suptitle(f"{Path(run_dir).name}")

    if train:
        ax_loss.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train loss")
    if val:
        tokens = [r["tokens"] for r in val]
        ax_loss.plot(tokens, [r["loss"] for r in val], "o-", label="validation loss")
        if all(r.get("unigram_loss") is not None for r in val):
            ax_loss.plot(tokens, [r["unigram_loss"] for r in val], "--", color="gray",
                         label="unigram baseline (validation)")
    ax_loss.set(xlabel="tokens seen", ylabel="loss (nats per predicted token)", title="Loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)

    steps = [r["step"] for r in train]
    ax_lr.plot(steps, [r["lr"] for r in train])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    ax_lr.grid(alpha=0.3)
    ax_gn.plot(steps, [r["grad_norm"] for r in train], lw=0.8)
    ax_gn.set(xlabel="step", ylabel="gradient norm (before clipping)", title="Gradient norm", yscale="log")
    ax_gn.grid(alpha=0.3)

    fig.tight_layout()
    path = Path(run_dir) / "report.png"
    tmp = path.with_name(".report.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
