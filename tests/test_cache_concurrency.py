"""Runs started together on one fresh cache (a sweep): each cache item is made once, by whichever
process takes its file lock first, and the others wait for it and reuse it (data/packages.py
`cached_item_lock`).

Each test starts three processes that meet at a start line (after their imports) and then ask
for the same cache items at once. The expensive step of each item appends a line to a counter
file and lingers a second, so that without the lock all three would be inside it together.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PROCESSES = 3


def _count_calls(module, name: str, counter: Path) -> None:
    """Make `module.name` append a line to `counter` and take a second before doing its work."""
    original = getattr(module, name)

    def counted(*args, **kwargs):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return original(*args, **kwargs)

    setattr(module, name, counted)


def _wait_for_the_others(start: Path, index: int) -> None:
    """The start line: every process, imports done, waits here until all have arrived."""
    (start / f"ready{index}").touch()
    deadline = time.time() + 300
    while len(list(start.iterdir())) < PROCESSES and time.time() < deadline:
        time.sleep(0.005)


def _member(job: str, index: int, tmp: str) -> None:
    """One process of the sweep (run as `python -c`, in a fresh interpreter)."""
    tmp_path = Path(tmp)
    if job == "pretrain":
        import lmforge.data.shards as shards
        import lmforge.data.prepared as prepared_module
        import lmforge.jobs as pretrain_module
        from lmforge.config import load_config

        _count_calls(shards, "prepare", tmp_path / "prepare.count")
        _count_calls(prepared_module, "train_wordpiece", tmp_path / "tokenizer.count")
        cfg = load_config(None, [
            f"data.corpus={tmp_path / 'corpus'}", "data.train_tokenizer_vocab=200", "data.seq_len=32",
            "data.val_frac=0.2", f"out_dir={tmp_path / f'runs{index}'}", "model.hidden_size=32", "model.num_layers=1",
            "model.num_heads=2", "model.intermediate_size=64", "model.max_position_embeddings=64",
            "train.batch_size=4", "train.max_steps=2", "train.eval_every=2", "train.eval_batches=1",
            "train.checkpoint_every=2", "train.progress=false", "train.num_threads=1", "train.precision=fp32"])
        _wait_for_the_others(tmp_path / "start", index)
        pretrain_module.pretrain(cfg)
    elif job == "package":
        from lmforge.data.packages import fetch_package

        _wait_for_the_others(tmp_path / "start", index)
        folder = fetch_package("lmforge-fake-pkg", "0.1.0", module="lmforge_fake_pkg")
        assert (folder / "lmforge_fake_pkg" / "data.txt").read_text() == "hello\n"
    elif job == "machine":
        import lmforge.train.machine as machine

        machine.cpu_has_native_bf16 = lambda: True
        _count_calls(machine, "_matmul_seconds", tmp_path / "timing.count")
        _wait_for_the_others(tmp_path / "start", index)
        print(f"speedup {machine.cpu_bf16_speedup()!r}")


def _start_together(job: str, tmp_path: Path, env: dict) -> list[subprocess.CompletedProcess]:
    (tmp_path / "start").mkdir()
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import {Path(__file__).stem} as t; t._member"
    procs = [subprocess.Popen([sys.executable, "-c", f"{code}({job!r}, {i}, {str(tmp_path)!r})"], cwd=tmp_path,
                              env={**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache"), **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(PROCESSES)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for i, p in enumerate(done):
        assert p.returncode == 0, f"process {i} failed:\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return done


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def _waited_at_most_once_each(done, what: str) -> None:
    for p in done:
        assert p.stderr.count(f"lmforge: waiting for another process to finish {what}") <= 1, p.stderr


def test_three_pretrain_runs_started_together_train_the_tokenizer_and_prepare_the_corpus_once(tmp_path):
    from conftest import write_tiny_corpus

    write_tiny_corpus(tmp_path / "corpus", docs=30, sentences=20)
    done = _start_together("pretrain", tmp_path, {})
    assert len(_lines(tmp_path / "tokenizer.count")) == 1
    assert len(_lines(tmp_path / "prepare.count")) == 1
    _waited_at_most_once_each(done, "preparing")
    _waited_at_most_once_each(done, "training a wordpiece vocabulary")
    prepared = list((tmp_path / "cache" / "prepared").glob("[!.]*"))
    assert len(prepared) == 1 and (prepared[0] / "manifest.json").is_file()  # no .old, no temporary left
    assert [p.name for p in (tmp_path / "cache" / "prepared").iterdir() if ".partial" in p.name or ".tmp-" in p.name or ".old" in p.name] == []
    for i in range(PROCESSES):
        (run,) = (tmp_path / f"runs{i}").iterdir()
        assert (run / "summary.json").is_file()


def _fake_wheel(folder: Path) -> Path:
    """A one-file wheel lmforge-fake-pkg==0.1.0 that pip 'downloads' from a local folder."""
    folder.mkdir()
    name, version = "lmforge_fake_pkg", "0.1.0"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{name}/data.txt", "hello\n")
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: lmforge-fake-pkg\nVersion: {version}\n")
        z.writestr(f"{name}-{version}.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: lmforge-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{name}-{version}.dist-info/RECORD", "")
    return folder


def test_three_processes_fetching_one_package_together_download_it_once(tmp_path):
    wheels = _fake_wheel(tmp_path / "wheels")
    done = _start_together("package", tmp_path, {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)})
    fetched = [p for p in done if "lmforge: fetching lmforge-fake-pkg==0.1.0" in p.stderr]
    assert len(fetched) == 1, [p.stderr for p in done]
    _waited_at_most_once_each(done, "fetching lmforge-fake-pkg==0.1.0")
    assert sorted(p.name for p in (tmp_path / "cache" / "packages").iterdir() if not p.name.startswith(".")) == [
        "lmforge-fake-pkg-0.1.0"]


def test_three_processes_timing_the_cpu_together_time_it_once_and_agree(tmp_path):
    done = _start_together("machine", tmp_path, {})
    assert len(_lines(tmp_path / "timing.count")) == 2  # fp32 and bf16, by one process
    assert len({p.stdout for p in done}) == 1  # the same speed-up, so the same precision, in every run
    _waited_at_most_once_each(done, "timing bf16 matmuls")

