"""A full disk or a read-only directory while a run writes: one clear error, nothing lost.

The failure is injected where the bytes are written (safetensors' save_file, the metrics file)
with the errno the kernel gives (ENOSPC, EROFS, EACCES), after part of the file is on disk, as a
real full disk would leave it; one test has the kernel itself refuse the write (RLIMIT_FSIZE). The previous checkpoint, `latest` and the run directory must be
intact, no temporary folder may be left, and once the disk has room again `--resume` must
continue to exactly the run that was never interrupted.
"""

from __future__ import annotations

import errno
import os

import pytest
from safetensors import SafetensorError
from safetensors.torch import load_file

import lmforge.runs.checkpoint as checkpoint
from conftest import tiny_config
from lmforge.cli import main
from lmforge.config import dump_yaml
from lmforge.train.log import MetricsLogger, read_metrics


def _failing_on_call(monkeypatch, owner, name, call: int, err: int):
    """owner.name fails with errno `err` on its `call`-th call, after writing half of what it wrote."""
    original = getattr(owner, name)
    calls = []

    def failing(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == call:
            original(tensors, path, *args, **kwargs)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            # what safetensors raises for a failed write (its Rust I/O error, not an OSError)
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(err)} (os error {err})")
        return original(tensors, path, *args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def _config_file(tiny_prepared, tmp_path, out):
    cfg = tiny_config(tiny_prepared, out, "train.keep_checkpoints=5")
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(dump_yaml(cfg))
    return path


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "tb" not in p.parts}


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_checkpoint_write_is_one_clear_error_and_resume_continues_exactly(
        tiny_prepared, tmp_path, monkeypatch, capsys, err):
    assert main(["pretrain", "--config", str(_config_file(tiny_prepared, tmp_path, tmp_path / "full"))]) == 0
    (full_dir,) = (tmp_path / "full").iterdir()

    # calls 1-2: step 0's model and optimizer; call 3: step 6's model file
    _failing_on_call(monkeypatch, checkpoint, "save_file", 3, err)
    capsys.readouterr()
    assert main(["pretrain", "--config", str(_config_file(tiny_prepared, tmp_path, tmp_path / "cut"))]) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: could not write checkpoint step 6"), stderr
    assert os.strerror(err) in stderr[0] and "the previous checkpoint step_00000000 is intact" in stderr[0]
    assert "--resume" in stderr[0]
    (cut_dir,) = (tmp_path / "cut").iterdir()
    ckpts = cut_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000000"]  # no temp folder left
    assert (ckpts / "latest").read_text().strip() == "step_00000000"
    assert checkpoint.load_checkpoint(ckpts / "step_00000000")  # whole: checksums verify
    before = _snapshot(cut_dir)

    monkeypatch.undo()  # the disk has room again
    assert main(["pretrain", "--resume", str(cut_dir)]) == 0
    losses = lambda d: [(r["step"], r["split"], r["loss"]) for r in read_metrics(d)]  # noqa: E731
    assert losses(cut_dir) == losses(full_dir)
    final = lambda d: load_file(d / "checkpoints" / "step_00000012" / "model.safetensors")  # noqa: E731
    a, b = final(full_dir), final(cut_dir)
    assert all(a[k].equal(b[k]) for k in a)
    for name in ("config.yaml", "env.json", "githash.log", "tokenizer.json"):  # provenance untouched
        assert _snapshot(cut_dir)[name] == before[name]


def test_a_full_disk_while_logging_metrics_is_one_clear_error(tiny_prepared, tmp_path, monkeypatch, capsys):
    config = _config_file(tiny_prepared, tmp_path, tmp_path / "runs")
    original = MetricsLogger.log

    def log(self, step, split, **metrics):
        if step == 8:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return original(self, step, split, **metrics)

    monkeypatch.setattr(MetricsLogger, "log", log)
    assert main(["pretrain", "--config", str(config)]) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: No space left on device: "), stderr
    assert "metrics.jsonl" in stderr[0] and "--resume" in stderr[0]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    monkeypatch.undo()
    assert main(["pretrain", "--resume", str(run_dir)]) == 0
    assert [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"] == list(range(1, 13))


def test_a_real_kernel_write_failure_mid_checkpoint_is_one_clear_error(tiny_prepared, tmp_path):
    """Not injected: the kernel refuses the write (a file-size limit, EFBIG, as a quota would)."""
    import subprocess
    import sys

    config = _config_file(tiny_prepared, tmp_path, tmp_path / "runs")
    assert main(["pretrain", "--config", str(config), "train.max_steps=6"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    limit = (run_dir / "checkpoints" / "step_00000006" / "model.safetensors").stat().st_size // 2
    before = _snapshot(run_dir / "checkpoints")
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from lmforge.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "pretrain", "--resume", str(run_dir), "train.max_steps=12"],
                          capture_output=True, text=True, timeout=600)
    stderr = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(stderr) == 1, proc.stderr[-2000:]
    assert "could not write checkpoint step 12" in stderr[0] and "File too large" in stderr[0]
    assert "the previous checkpoint step_00000006 is intact" in stderr[0]
    assert "Traceback" not in proc.stderr
    assert _snapshot(run_dir / "checkpoints") == before  # nothing half-written left, nothing changed
    assert main(["pretrain", "--resume", str(run_dir), "train.max_steps=12"]) == 0
    assert [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"] == list(range(1, 13))


def test_a_full_disk_during_export_is_one_clear_error_and_leaves_no_output(tiny_prepared, tmp_path, monkeypatch, capsys):
    import lmforge.export

    config = _config_file(tiny_prepared, tmp_path, tmp_path / "runs")
    assert main(["pretrain", "--config", str(config), "train.max_steps=2"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    _failing_on_call(monkeypatch, lmforge.export, "save_file", 1, errno.ENOSPC)
    capsys.readouterr()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "hf")]) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: No space left on device"), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "runs.yaml"]  # no output, no temp folder
