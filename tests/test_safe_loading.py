"""Files lmforge reads but did not necessarily write (issue 17, item 9): a pickled
pytorch_model.bin is read only by a torch whose weights-only unpickler cannot be bypassed
(>= 2.6, CVE-2025-32434), its refusal is one line with nothing of torch's before it, and a
checkpoint's state.json is checksummed like its tensors, so a damaged one is skipped too."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lmforge.runs.checkpoint as checkpoint
from conftest import PicklePayload, tiny_config
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.export import export_hf
from lmforge.tasks.loading import load_model
from lmforge.jobs import pretrain


@pytest.fixture(scope="module")
def hf_bin_dir(tmp_path_factory, tiny_prepared):
    """A tiny BERT as a transformers directory whose weights are a plain pickled pytorch_model.bin."""
    root = tmp_path_factory.mktemp("hf_bin")
    run_dir, _ = pretrain(tiny_config(tiny_prepared, root / "runs", "train.max_steps=2", "train.eval_every=2",
                                      "train.checkpoint_every=2"))
    out = export_hf(run_dir, root / "hf")
    torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    return out


def test_a_plain_pytorch_model_bin_loads_on_this_torch(hf_bin_dir):
    assert load_model(hf_bin_dir).source == "hf"


def test_a_pytorch_model_bin_is_refused_in_one_line_on_a_torch_before_2_6(hf_bin_dir, monkeypatch, capsys):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")

    def never(*args, **kwargs):
        raise AssertionError("torch.load must not be called on a torch whose weights-only loader can be bypassed")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(LmforgeError, match=r"refusing .*pytorch_model.bin: .*torch>=2.6 \(CVE-2025-32434\)"):
        load_model(hf_bin_dir)
    capsys.readouterr()
    assert main(["predict", str(hf_bin_dir), "the cat [MASK] the hill."]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: refusing ") and "2.5.1" in err, err


def test_a_planted_pickle_is_refused_with_exactly_one_line_on_stderr(hf_bin_dir, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((hf_bin_dir / "config.json").read_text())
    (evil / "vocab.txt").write_text((hf_bin_dir / "vocab.txt").read_text())
    with open(evil / "pytorch_model.bin", "wb") as f:  # protocol 4: torch warns about it before refusing
        pickle.dump({"embeddings.word_embeddings.weight": PicklePayload()}, f, protocol=4)
    # a subprocess: pytest would capture torch's UserWarning itself, hiding it from stderr
    proc = subprocess.run([sys.executable, "-m", "lmforge", "predict", str(evil), "a [MASK]"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: refusing {evil / 'pytorch_model.bin'}: it is not a plain tensor file")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


# -- state.json is checksummed like the tensors ---------------------------------------------------


def _save(root, step: int):
    """A small checkpoint `step`: two tensor files and a state with a data position and a metric."""
    weights = {"w": torch.full((3,), float(step))}
    optimizer = ({"0.exp_avg": torch.zeros(3)}, {"param_groups": [{"lr": 1e-3, "params": [0]}],
                                                 "scalars": {"0.step": step}})
    return checkpoint.save_checkpoint(root, step, (weights, *optimizer),
                                      {"data_position": 1000 + step, "best_val_loss": 2.5}, keep=5)


def test_a_changed_digit_in_the_newest_state_json_makes_the_checkpoint_before_it_be_used(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    newest = _save(root, 4)
    text = (newest / "state.json").read_text()
    assert text.count('"data_position": 1004') == 1
    (newest / "state.json").write_text(text.replace('"data_position": 1004', '"data_position": 1005'))
    json.loads((newest / "state.json").read_text())  # still valid JSON: only a checksum can tell
    capsys.readouterr()
    path, weights, _, state = checkpoint.load_newest_good(root)
    assert path.name == "step_00000002" and state["data_position"] == 1002 and weights["w"][0].item() == 2.0
    err = capsys.readouterr().err
    assert "step_00000004 is damaged: state.json does not match its recorded sha256" in err
    assert "trying the checkpoint before it" in err


def test_a_checkpoint_written_before_state_json_had_a_checksum_still_loads(tmp_path):
    path = _save(tmp_path / "checkpoints", 2)
    state = json.loads((path / "state.json").read_text())
    del state["state_sha256"]
    (path / "state.json").write_text(json.dumps(state, indent=1))
    _, _, loaded = checkpoint.load_checkpoint(path)
    assert loaded["step"] == 2 and loaded["data_position"] == 1002 and "state_sha256" not in loaded


def test_a_pickle_planted_as_checkpoint_tensors_with_every_checksum_fixed_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _save(tmp_path / "checkpoints", 2)
    evil = pickle.dumps({"weight": PicklePayload()})
    (path / "model.safetensors").write_bytes(evil)
    state = json.loads((path / "state.json").read_text())  # the attacker fixes both checksums
    state["files"]["model.safetensors"] = hashlib.sha256(evil).hexdigest()
    state["state_sha256"] = checkpoint.state_checksum(state)
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(LmforgeError, match="is damaged"):  # safetensors itself refuses the pickle
        checkpoint.load_checkpoint(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
