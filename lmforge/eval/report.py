"""report.png for a run: loss against tokens with the unigram baseline, learning rate, grad norm,
and for MLM what the model predicts (entropy, share of its most common prediction).

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
    diagnostics = [r for r in val if r.get("prediction_entropy") is not None]
    fig, axes = plt.subplots(1, 4 if diagnostics else 3, figsize=(21 if diagnostics else 16, 4.5))
    ax_loss, ax_lr, ax_gn = axes[:3]
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

    if diagnostics:  # MLM learning-curve diagnostics (tasks/mlm.py evaluate)
        ax_ent = axes[3]
        tokens = [r["tokens"] for r in diagnostics]
        ax_ent.plot(tokens, [r["prediction_entropy"] for r in diagnostics], "o-", color="tab:purple",
                    label="entropy of predictions")
        ax_ent.set(xlabel="tokens seen", ylabel="mean entropy (nats)", title="What the model predicts (validation)")
        ax_share = ax_ent.twinx()
        ax_share.plot(tokens, [r["top_prediction_share"] for r in diagnostics], "s--", color="tab:orange",
                      label="share predicted as the most common token")
        ax_share.set(ylabel="share of masked positions", ylim=(0, 1))
        lines = ax_ent.get_lines() + ax_share.get_lines()
        ax_ent.legend(lines, [line.get_label() for line in lines], fontsize=8)
        ax_ent.grid(alpha=0.3)

    fig.tight_layout()
    path = Path(run_dir) / "report.png"
    tmp = path.with_name(".report.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_schedule(cfg, out: Path) -> tuple[Path, str]:
    """Draw the learning rate each step of `cfg` will use (train/optim.py lr_at, the very function
    the loop calls) into `out`, before any training (seed MLAB's "expected LR schedule" plot).
    Returns (path, a one-line description)."""
    from lmforge.train.optim import lr_at

    o, steps = cfg.optim, cfg.train.max_steps
    lrs = [lr_at(s, steps, o) for s in range(steps)]
    warmup = int(round(o.warmup_frac * steps))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(range(steps), lrs)
    if 0 < warmup < steps:
        ax.axvline(warmup, color="gray", ls="--", lw=0.8, label=f"end of warmup (step {warmup})")
        ax.legend()
    ax.set(xlabel="step", ylabel="learning rate",
           title=f"{o.schedule} schedule: peak {o.lr:g}, {steps} steps, warmup {o.warmup_frac:g}, "
                 f"floor {o.lr * o.min_lr_frac:g}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    text = (f"{o.schedule}: {lrs[0]:.3g} at step 0, peak {max(lrs):.3g} at step {lrs.index(max(lrs))}, "
            f"{lrs[-1]:.3g} at step {steps - 1}")
    return out, text
