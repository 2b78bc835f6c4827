"""Machine settings: when bf16 autocast is used, and that a resumed run keeps its precision."""

import json

import torch

from conftest import interrupt_during_step, tiny_config
from lmforge.jobs import pretrain, resume
from lmforge.tasks.mlm import MaskedLMTask
from lmforge.train import loop, machine
from lmforge.train.log import read_metrics

CPU = torch.device("cpu")


def test_explicit_precision_is_kept_and_auto_needs_native_and_measured_faster_bf16(monkeypatch):
    assert machine.resolve_precision(CPU, "fp32") == "fp32"
    assert machine.resolve_precision(CPU, "bf16") == "bf16"
    monkeypatch.setattr(machine, "cpu_bf16_speedup", lambda: 0.0)  # no native bf16
    assert machine.resolve_precision(CPU, "auto") == "fp32"
    monkeypatch.setattr(machine, "cpu_bf16_speedup", lambda: 1.1)  # native but not worth it
    assert machine.resolve_precision(CPU, "auto") == "fp32"
    monkeypatch.setattr(machine, "cpu_bf16_speedup", lambda: 2.2)
    assert machine.resolve_precision(CPU, "auto") == "bf16"


def test_bf16_speedup_is_not_timed_without_native_bf16(monkeypatch):
    machine.cpu_bf16_speedup.cache_clear()
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(machine, "_matmul_seconds", lambda *a, **k: 1 / 0)  # must not be called
    try:
        assert machine.cpu_bf16_speedup() == 0.0
    finally:
        machine.cpu_bf16_speedup.cache_clear()


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["split"] == "train"]


def test_a_resumed_auto_precision_run_keeps_the_precision_it_started_with(tiny_prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "resolve_precision", lambda device, precision, *rest: "fp32")
    full_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "full"))
    interrupt_during_step(monkeypatch, MaskedLMTask, 7)
    cut_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "cut"))
    monkeypatch.undo()
    # resumed where auto would now pick bf16 (another machine, say): the checkpoint's fp32 wins
    monkeypatch.setattr(loop, "resolve_precision", lambda device, precision, *rest: "bf16")
    resume(cut_dir)
    assert _losses(cut_dir) == _losses(full_dir)


def test_train_records_log_the_share_of_step_time_spent_waiting_for_data(tiny_prepared, tmp_path):
    run_dir, _ = pretrain(tiny_config(tiny_prepared, tmp_path, "train.max_steps=3"))
    waits = [r["data_wait"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert len(waits) == 3 and all(0 < w < 1 for w in waits)


def test_the_bf16_timing_is_taken_once_per_machine_and_remembered(monkeypatch, tmp_path):
    """Two runs on one machine must choose the same precision even if the machine is busier
    during the second: the measured speedup is kept in the cache (machine.json)."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: True)
    timings = iter([2.0, 1.0, 1.0, 5.0])  # fp32 s, bf16 s, then a "busy" second measurement
    monkeypatch.setattr(machine, "_matmul_seconds", lambda dtype: next(timings))
    machine.cpu_bf16_speedup.cache_clear()
    try:
        assert machine.cpu_bf16_speedup() == 2.0
        machine.cpu_bf16_speedup.cache_clear()  # a new process
        assert machine.cpu_bf16_speedup() == 2.0  # read back, not measured again (that would give 0.2)
        assert list(json.loads((tmp_path / "machine.json").read_text()).values()) == [2.0]
    finally:
        machine.cpu_bf16_speedup.cache_clear()
