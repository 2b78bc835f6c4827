"""report.png for a run: loss against tokens with the unigram baseline, learning rate, grad norm,
and for MLM what the model predicts (entropy, share of its most common prediction) and, with
mlm.nsp, next-sentence accuracy.

Reads only the run's metrics.jsonl, so it can be redrawn at any time, for a finished run or one
still training.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from lmforge.config import migrate_run_data  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.files import atomic_path, write_text_atomic  # noqa: E402
from lmforge.train.log import read_metrics  # noqa: E402


def _save(fig, path: Path) -> None:
    """Write `fig` to `path` through a temporary file: a reader never sees half a picture."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def write_report(run_dir: Path) -> Path:
    """Draw `run_dir/report.png` from `run_dir/metrics.jsonl` and return its path."""
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "validation"]
    diagnostics = [r for r in val if r.get("prediction_entropy") is not None]
    nsp = [r for r in val if r.get("nsp_accuracy") is not None]
    layers = [r for r in records if r["split"] == "layers" and any(k.endswith("/grad_norm") for k in r)]
    panels = 3 + bool(diagnostics) + bool(nsp)
    # log.layer_stats: a second row, one panel per statistic, a line per block
    fig, grid = plt.subplots(2 if layers else 1, panels, figsize=(5.3 * panels, 9 if layers else 4.5), squeeze=False)
    axes = grid[0]
    ax_loss, ax_lr, ax_gn = axes[:3]
    fig.suptitle(f"{Path(run_dir).name}")

    if train:
        # with NSP the train loss is MLM + NSP: plot the MLM part, the one validation and the baseline measure
        ax_loss.plot([r["tokens"] for r in train], [r.get("mlm_loss", r["loss"]) for r in train], lw=0.8, alpha=0.7,
                     label="train MLM loss" if "mlm_loss" in train[0] else "train loss")
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

    if nsp:  # mlm.nsp: next-sentence accuracy, train and validation, against chance
        ax_nsp = axes[-1]
        with_nsp = [r for r in train if r.get("nsp_accuracy") is not None]
        ax_nsp.plot([r["tokens"] for r in with_nsp], [r["nsp_accuracy"] for r in with_nsp], lw=0.7, alpha=0.6,
                    label="train")
        ax_nsp.plot([r["tokens"] for r in nsp], [r["nsp_accuracy"] for r in nsp], "o-", label="validation")
        ax_nsp.axhline(0.5, color="gray", ls="--", lw=0.8, label="chance")
        ax_nsp.set(xlabel="tokens seen", ylabel="accuracy", title="Next-sentence prediction", ylim=(0, 1))
        ax_nsp.legend(fontsize=8)
        ax_nsp.grid(alpha=0.3)

    if layers:
        _layer_panels(grid[1], layers)

    fig.tight_layout()
    path = Path(run_dir) / "report.png"
    _save(fig, path)
    return path


def _layer_panels(axes, records: list[dict]) -> None:
    """log.layer_stats (train/layerstats.py): each block's gradient norm, update-to-weight ratio
    and output RMS against the step; unused panels of the row are hidden."""
    blocks = list(dict.fromkeys(k.rsplit("/", 1)[0] for r in records for k in r if k.endswith("/grad_norm")))
    steps = [r["step"] for r in records]
    shown = (("grad_norm", "gradient norm", "Gradient norm per block"),
             ("update_ratio", "|update| / |weights|", "Update-to-weight ratio per block (1e-3 is typical)"),
             ("act_rms", "RMS of the block's output", "Activation RMS per block"))
    cmap = plt.get_cmap("viridis")
    for ax, (key, ylabel, title) in zip(axes, shown):
        for i, block in enumerate(blocks):
            ax.plot(steps, [r.get(f"{block}/{key}", float("nan")) for r in records], lw=0.9,
                    color=cmap(i / max(1, len(blocks) - 1)), label=block)
        ax.set(xlabel="step", ylabel=ylabel, title=title, yscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=1 + len(blocks) // 8)
    for ax in axes[len(shown):]:
        ax.axis("off")


def plot_schedule(cfg, out: Path) -> tuple[Path, str]:
    """Draw the learning rate each step of `cfg` will use (train/optim.py lr_at and
    train/schedule.py, the very functions the loop calls) into `out`, before any training (seed
    MLAB's "expected LR schedule" plot); with a sequence-length schedule or a batch-size ramp, a
    second panel draws tokens per step and the sequence length (for one process). Returns (path,
    a one-line description)."""
    from lmforge.train.optim import lr_at
    from lmforge.train.schedule import BatchSchedule

    o, steps = cfg.optim, cfg.train.max_steps
    schedule = BatchSchedule(cfg)
    lrs = [lr_at(*schedule.progress(s), o) for s in range(steps)]
    total = schedule.progress(steps)[1]
    warmup = next((s for s in range(steps) if schedule.progress(s)[0] >= round(o.warmup_frac * total)), steps)
    fig, axes = plt.subplots(1, 2 if schedule.varies else 1, figsize=(14 if schedule.varies else 8, 4.5),
                             squeeze=False)
    ax = axes[0, 0]
    ax.plot(range(steps), lrs)
    if 0 < warmup < steps:
        ax.axvline(warmup, color="gray", ls="--", lw=0.8, label=f"end of warmup (step {warmup})")
        ax.legend()
    ax.set(xlabel="step", ylabel="learning rate",
           title=f"{o.schedule} schedule: peak {o.lr:g}, {steps} steps, warmup {o.warmup_frac:g}, "
                 f"floor {o.lr * o.min_lr_frac:g}")
    ax.grid(alpha=0.3)
    text = (f"{o.schedule}: {lrs[0]:.3g} at step 0, peak {max(lrs):.3g} at step {lrs.index(max(lrs))}, "
            f"{lrs[-1]:.3g} at step {steps - 1}")
    if schedule.varies:
        ax = axes[0, 1]
        ax.plot(range(steps), [schedule.step_tokens(s) for s in range(steps)], label="tokens per step",
                drawstyle="steps-post")
        ax.set(xlabel="step", ylabel="tokens per step", title="step size (one process)")
        if schedule.long is not None:
            lengths = ax.twinx()
            lengths.plot(range(steps), [schedule.at(s).seq_len for s in range(steps)], color="C1",
                         label="sequence length", drawstyle="steps-post")
            lengths.set_ylabel("sequence length")
            lengths.legend(loc="lower right")
        text += "; " + schedule.describe()
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out)
    return out, text


def _read_run(run_dir: Path) -> tuple[list[dict], dict, dict]:
    """(metrics records, summary or {}, config mapping) of one run directory, or a one-line
    LmforgeError naming the file that is missing or damaged: a folder that merely looks like a
    run (a copied metrics.jsonl, a hand-edited config.yaml) is the user's to fix, not a bug."""
    import json

    import yaml

    for name in ("metrics.jsonl", "config.yaml"):
        if not (run_dir / name).is_file():
            raise LmforgeError(f"{run_dir} is not an lmforge run directory (no {name})")
    name = "metrics.jsonl"
    try:
        records = read_metrics(run_dir)
        if not all(isinstance(r, dict) and "split" in r for r in records):
            raise ValueError("a line is not a metrics record")
        name = "summary.json"
        summary = json.loads((run_dir / name).read_text()) if (run_dir / name).is_file() else {}
        name = "config.yaml"
        # a run from before a key moved shows it where today's runs have it (mlm.nsp, not task.nsp)
        config = migrate_run_data(yaml.safe_load((run_dir / name).read_text()) or {})
        if not isinstance(config, dict) or not isinstance(summary, dict):
            raise ValueError("not a mapping")
    except (ValueError, yaml.YAMLError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise LmforgeError(f"{run_dir / name} is damaged ({reason}); give a whole lmforge run directory") from None
    return records, summary, config


def compare_runs(run_dirs: list[Path], out_prefix: Path) -> tuple[Path, Path]:
    """`lmforge report`: one PNG comparing runs (loss against tokens with each run's unigram
    baseline, learning rate, gradient norm, tokens/s, and accuracy for fine-tuning runs) and a
    self-contained HTML page (the picture inline, each run's summary and the config keys that
    differ between them). Returns (png, html)."""
    import base64
    import html
    import json

    from lmforge.runs.run_dir import flatten

    runs = []
    for d in run_dirs:
        records, summary, config = _read_run(Path(d))
        runs.append({"dir": Path(d), "name": Path(d).name,
                     "train": [r for r in records if r["split"] == "train"],
                     "val": [r for r in records if r["split"] == "validation"],
                     "summary": summary, "config": flatten(config)})
    with_accuracy = any(r.get("accuracy") is not None for run in runs for r in run["val"])
    fig, axes = plt.subplots(1, 5 if with_accuracy else 4, figsize=(26 if with_accuracy else 21, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        c, label = colors[i % len(colors)], run["name"]
        train, val = run["train"], run["val"]
        axes[0].plot([r["tokens"] for r in train], [r.get("mlm_loss", r["loss"]) for r in train], color=c, lw=0.7,
                     alpha=0.5)  # with NSP: the MLM part, comparable with validation and the baseline
        if val:
            axes[0].plot([r["tokens"] for r in val], [r["loss"] for r in val], "o-", color=c, ms=3, label=label)
            if all(r.get("unigram_loss") is not None for r in val):
                axes[0].plot([r["tokens"] for r in val], [r["unigram_loss"] for r in val], "--", color=c, lw=0.8)
        steps = [r["step"] for r in train]
        axes[1].plot(steps, [r["lr"] for r in train], color=c, label=label)
        axes[2].plot(steps, [r["grad_norm"] for r in train], color=c, lw=0.7, label=label)
        axes[3].plot(steps, [r.get("tokens_per_s") for r in train], color=c, lw=0.7, label=label)
        if with_accuracy and val:
            axes[4].plot([r["step"] for r in val], [r.get("accuracy") for r in val], "o-", color=c, ms=3, label=label)
    titles = [("tokens seen", "loss (train thin, validation dots, unigram dashed)", "Loss"),
              ("step", "learning rate", "Learning rate"), ("step", "gradient norm (before clipping)", "Gradient norm"),
              ("step", "tokens per second", "Throughput")] + ([("step", "validation accuracy", "Accuracy")]
                                                             if with_accuracy else [])
    for ax, (xl, yl, t) in zip(axes, titles):
        ax.set(xlabel=xl, ylabel=yl, title=t)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    fig.tight_layout()
    png = out_prefix.with_suffix(".png")
    _save(fig, png)

    keys = sorted({k for run in runs for k in run["config"]})
    differing = [k for k in keys if len({json.dumps(run["config"].get(k)) for run in runs}) > 1
                 and k != "out_dir"]
    summary_keys = list(dict.fromkeys(k for run in runs for k in run["summary"]))

    def cell(v) -> str:
        return html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))

    def table(header: list[str], rows: list[list]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    names = [run["name"] for run in runs]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lmforge report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#f4f4f4}}img{{max-width:100%}}</style>
</head><body><h1>lmforge report: {len(runs)} run{'s' if len(runs) > 1 else ''}</h1>
<img alt="comparison" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">
<h2>Summaries</h2>{table(["", *names], [[k, *(run["summary"].get(k, "") for run in runs)] for k in summary_keys])}
<h2>Config keys that differ</h2>{table(["key", *names], [[k, *(run["config"].get(k, "") for run in runs)]
                                                        for k in differing]) if differing else "<p>none</p>"}
<p>Run directories: {", ".join(html.escape(str(run["dir"])) for run in runs)}</p></body></html>
"""
    page_path = out_prefix.with_suffix(".html")
    write_text_atomic(page_path, page)
    return png, page_path
