"""`lmforge doctor`: its verdicts on this machine, with a package missing, a disk (nearly) full,
and GPUs that are absent or present."""

import json
import shutil
import sys
from collections import namedtuple

import pytest
import torch

from lmforge import doctor
from lmforge.cli import main
from lmforge.train.machine import resolve_precision

Usage = namedtuple("Usage", "total used free")


def _by_name(checks):
    return {c.name: c for c in checks}


def test_this_machine_can_run_and_the_precision_line_is_what_auto_picks(tmp_path, capsys):
    assert main(["doctor", "--out-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("lmforge doctor: a default run can start here")
    checks = _by_name(doctor.diagnose(out_dir=str(tmp_path)))
    assert not torch.cuda.is_available() and checks["gpu"].detail.startswith("none")
    assert f"trains on cpu in {resolve_precision(torch.device('cpu'), 'auto')}" in checks["precision"].detail
    assert checks["torch"].detail.startswith(torch.__version__)
    assert main(["doctor", "--json", "--out-dir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["can_run"] is True and {c["name"] for c in report["checks"]} >= {"cache", "out_dir", "packages"}


def test_a_missing_optional_package_is_a_warning_with_the_pip_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    checks = doctor.diagnose(out_dir=str(tmp_path))
    wandb = _by_name(checks)["wandb"]
    assert wandb.status == "warning" and "log.wandb=true" in wandb.detail and wandb.fix == "pip install wandb"
    assert doctor.can_run(checks)


def test_a_missing_required_package_stops_a_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    assert main(["doctor", "--out-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "error   safetensors" in out and "cannot start here" in out


@pytest.mark.parametrize("free_mb, status, code", [(100, "error", 1), (2048, "warning", 0), (100_000, "ok", 0)])
def test_free_disk_decides_the_verdict(monkeypatch, tmp_path, free_mb, status, code):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, free_mb * 2**20))
    checks = _by_name(doctor.diagnose(out_dir=str(tmp_path / "not" / "yet")))
    assert checks["out_dir"].status == checks["cache"].status == status
    assert main(["doctor", "--out-dir", str(tmp_path)]) == code


def test_a_cuda_build_that_sees_no_gpu_is_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    gpu = _by_name(doctor.diagnose(out_dir=str(tmp_path)))["gpu"]
    assert gpu.status == "warning" and "CUDA_VISIBLE_DEVICES" in gpu.fix


def test_an_older_gpu_is_listed_without_bf16_and_auto_picks_fp16(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    checks = _by_name(doctor.diagnose(out_dir=str(tmp_path)))
    assert checks["cuda:0"].detail == "Tesla V100-SXM2-16GB, compute 7.0, bf16 no, fp16 yes"
    assert "trains on cuda in fp16" in checks["precision"].detail


def test_bundled_data_not_yet_cached_is_a_warning_not_an_error(tmp_path):
    checks = doctor.diagnose(cache_dir=str(tmp_path / "empty-cache"), out_dir=str(tmp_path))
    reviews = _by_name(checks)["movie-reviews"]
    assert reviews.status == "warning" and "not cached yet" in reviews.detail
    assert doctor.can_run(checks)


def test_an_out_dir_that_is_a_file_is_an_error(tmp_path, capsys):
    (tmp_path / "runs").write_text("not a folder")
    assert main(["doctor", "--out-dir", str(tmp_path / "runs")]) == 1
    assert f"error   out_dir        {tmp_path / 'runs'} is a file, not a folder" in capsys.readouterr().out
