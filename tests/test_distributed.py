"""Data parallelism on this CPU (gloo, 2 processes) against one process with the whole batch.

Under every strategy — DDP, FSDP2, DeepSpeed ZeRO-1/2/3 (with optimizer offload), launched by
torchrun or by DeepSpeed's launcher — 2 ranks x batch b with gradient accumulation must give the
same per-step losses and final weights as 1 process x batch 2b (dropout off; to float rounding,
since the gradients are summed in another order), and the run directory must be the
single-process one: rank 0 alone writes, checkpoints are consolidated and carry no wrapper
prefix. A run resumes under another world size and strategy; fine-tuning shards too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from lmforge.config import dump_yaml
from lmforge.train.log import read_metrics


def _run(argv, tmp_path, env=None):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    # both streams on failure: where the ranks got to (stdout) matters as much as how they died
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


# the families beyond BERT, at tiny size with their own code paths on (local windows, buckets, GQA)
FAMILY_OVERRIDES = {
    "gpt": ["task.name=clm", "model.arch=gpt"],
    "modernbert": ["model.arch=modernbert", "model.local_window=8", "model.global_every=2"],
    "deberta": ["model.arch=deberta", "model.position_buckets=8", "model.max_relative_positions=16"],
    "llama": ["task.name=clm", "model.arch=llama", "model.num_kv_heads=1", "model.qk_norm=true"],
    "llama-muon": ["task.name=clm", "model.arch=llama", "optim.name=muon"],
    # train.activation_checkpointing: the recomputed blocks under DDP's hooks and FSDP2's shards
    "bert-recompute": ["train.activation_checkpointing=true"],
    "gpt-recompute": ["task.name=clm", "model.arch=gpt", "train.activation_checkpointing=true"],
}

# steps whose shape changes (lmforge/train/schedule.py): 32 -> 64 tokens after 4 of the 6 steps, and
# 1 -> 2 micro-batches of 256 tokens over the first 600 tokens
SCHEDULES = ("data.long_seq_len=64", "data.short_seq_frac=0.67", "train.batch_ramp_start_tokens=256",
             "train.batch_ramp_tokens=600")


@pytest.mark.parametrize("arch,strategy,launcher,schedules", [
    ("bert", "ddp", "torchrun", ()), ("gpt", "ddp", "torchrun", ()), ("bert", "fsdp", "torchrun", ()),
    ("gpt", "fsdp", "torchrun", ()),
    ("bert", "deepspeed distributed.zero_stage=2", "torchrun", ()),
    ("gpt", "deepspeed distributed.zero_stage=3 distributed.offload_optimizer=true", "torchrun", ()),
    ("bert", "deepspeed distributed.zero_stage=1", "deepspeed", ()),  # DeepSpeed's own launcher (--local_rank=N)
    ("bert", "deepspeed distributed.zero_stage=2", "torchrun", SCHEDULES),
    ("distill-mlm", "fsdp", "torchrun", ()),  # the fused distillation loss runs inside the sharded forward
    pytest.param("modernbert", "fsdp", "torchrun", (), marks=pytest.mark.slow),  # slow: CI runs them (.ci/run)
    pytest.param("deberta", "ddp", "torchrun", (), marks=pytest.mark.slow), ("llama", "fsdp", "torchrun", ()),
    ("llama-muon", "ddp", "torchrun", ()),  # Muon's orthogonalised update of the all-reduced gradient
    pytest.param("bert-recompute", "fsdp", "torchrun", (), marks=pytest.mark.slow),
    pytest.param("gpt-recompute", "ddp", "torchrun", (), marks=pytest.mark.slow),
], ids=["bert-ddp", "gpt-ddp", "bert-fsdp", "gpt-fsdp", "bert-zero2", "gpt-zero3-offload", "bert-zero1-launcher",
        "bert-zero2-seq-schedule-and-ramp", "distill-mlm-fsdp", "modernbert-fsdp", "deberta-ddp", "llama-fsdp",
        "llama-muon-ddp", "bert-recompute-fsdp", "gpt-recompute-ddp"])
def test_two_ranks_equal_one_process_with_the_whole_batch(tiny_prepared, tmp_path, arch, strategy, launcher,
                                                          schedules):
    extra = FAMILY_OVERRIDES.get(arch, [])
    if arch == "distill-mlm":  # a 2-layer teacher, trained a little, teaches a 1-layer student
        from lmforge.jobs import pretrain

        teacher, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "teacher", "train.max_steps=6"))
        extra = ["task.name=distill-mlm", f"distill.teacher={teacher}"]
    cfg = tiny_config(tiny_prepared, tmp_path, *extra, *schedules, "model.dropout=0", "train.precision=fp32",
                      "train.num_threads=1", "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3",
                      "train.grad_accum_steps=2")
    config = tmp_path / "run.yaml"
    config.write_text(dump_yaml(cfg))
    _run([sys.executable, "-m", "lmforge", "pretrain", "--config", str(config), "train.batch_size=8",
          f"out_dir={tmp_path / 'one'}"], tmp_path)
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
            if launcher == "torchrun" else
            [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", "29533", "--module"])
    proc = _run([*head, "lmforge", "pretrain", "--config", str(config), "train.batch_size=4",
                 *f"distributed.strategy={strategy}".split(), f"out_dir={tmp_path / 'two'}"], tmp_path,
                env={**os.environ, "DS_ACCELERATOR": "cpu"})
    strategy = strategy.split()[0]
    assert f"2 processes ({strategy}); global batch 4 x 2 x 2 = 16 sequences" in proc.stdout
    (one,) = (tmp_path / "one").iterdir()
    (two,) = (tmp_path / "two").iterdir()  # one run directory, made by rank 0
    a, b = read_metrics(one), read_metrics(two)
    if schedules:
        assert [(r["seq_len"], r["step_tokens"]) for r in b if r["split"] == "train"] == [
            (32, 256), (32, 256), (32, 512), (32, 512), (64, 512), (64, 512)]
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6), (ra, rb)
    wa = load_file(one / "checkpoints" / "step_00000006" / "model.safetensors")
    wb = load_file(two / "checkpoints" / "step_00000006" / "model.safetensors")
    assert wa.keys() == wb.keys() and not any(k.startswith("module.") for k in wb)
    # torch.optim.Muon orthogonalises in bfloat16 (torch/optim/_muon.py): gradients summed in another
    # order can round to a neighbouring bf16 value there, a few 1e-5 in a weight after 6 steps
    tolerance = 1e-4 if "muon" in arch else 1e-5
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=tolerance, atol=tolerance)


ZERO2 = ("deepspeed", 2, "distributed.zero_stage=2")
ZERO3_OFFLOAD = ("deepspeed", 2, "distributed.zero_stage=3", "distributed.offload_optimizer=true")


@pytest.mark.parametrize("first,then", [(("fsdp", 2), ("ddp", 1)), (("ddp", 1), ("fsdp", 2)),
                                        (ZERO3_OFFLOAD, ("ddp", 1)), (("ddp", 1), ZERO2)],
                         ids=["fsdp2-to-1", "1-to-fsdp2", "zero3-offload-to-1", "1-to-zero2"])
def test_resume_under_another_world_size_and_strategy(tiny_prepared, tmp_path, first, then):
    """A run stopped at step 3 and resumed with another number of processes (and strategy), keeping
    the global batch, continues as the uninterrupted run does: the sampler position and every
    random draw are global, and the checkpoint (single-process format, consolidated from shards
    and set back into them) carries the whole AdamW state."""
    cfg = tiny_config(tiny_prepared, tmp_path, "model.dropout=0", "train.precision=fp32", "train.num_threads=1",
                      "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3",
                      "optim.schedule=constant", "optim.warmup_frac=0")  # the schedule must not depend on max_steps
    config = tmp_path / "run.yaml"
    config.write_text(dump_yaml(cfg))

    def launch(how, *args):
        strategy, world, *extra = how
        head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
                if world > 1 else [sys.executable])
        return _run([*head, "-m", "lmforge", "pretrain", *args, f"train.batch_size={8 // world}",
                     f"distributed.strategy={strategy}", *extra], tmp_path)

    launch(("ddp", 1), "--config", str(config), f"out_dir={tmp_path / 'whole'}")
    launch(first, "--config", str(config), f"out_dir={tmp_path / 'split'}", "train.max_steps=3")
    (whole,) = (tmp_path / "whole").iterdir()
    (split,) = (tmp_path / "split").iterdir()
    refused = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--resume", str(split),
                              "train.max_steps=6", "train.batch_size=2"], capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 2 and "Keep the global batch" in refused.stderr, refused.stderr
    launch(then, "--resume", str(split), "train.max_steps=6")
    a, b = read_metrics(whole), read_metrics(split)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6), (ra, rb)
    wa = load_file(whole / "checkpoints" / "step_00000006" / "model.safetensors")
    wb = load_file(split / "checkpoints" / "step_00000006" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5)


def test_finetune_two_ranks_equal_one_process_including_a_last_batch_smaller_than_the_world(tiny_prepared, tmp_path):
    """Fine-tuning under torchrun: each rank takes its share of every global batch of length-sorted
    examples; the epoch's short last batch holds a single example here, so one rank trains on a
    weightless stand-in. Losses and weights must match one process with the whole batch."""
    import random

    from lmforge.data.sentiment import stratified_split

    rng = random.Random(0)
    rows = [(rng.randrange(2), rng.randrange(5), rng.randrange(5)) for _ in range(204)]
    words = ["good", "great", "fine", "lovely", "superb"], ["bad", "awful", "poor", "dull", "boring"]
    lines = ["text\tlabel"] + [f"the cat is {words[1 - y][a]} and {words[1 - y][b]} .\t{y}" for y, a, b in rows]
    data = tmp_path / "reviews.tsv"
    data.write_text("\n".join(lines) + "\n")
    n_train = len(stratified_split([y for y, _, _ in rows], 0)["train"])
    per_rank = next(b for b in range(2, 40) if n_train % (2 * b) == 1)  # the epoch ends with one example
    steps = -(-n_train // (2 * per_rank)) + 2  # into the second epoch
    common = ["task.name=classify", f"data.dataset={data}", f"data.tokenizer={tiny_prepared.folder / 'tokenizer.json'}",
              "data.seq_len=32", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
              "model.intermediate_size=64", "model.max_position_embeddings=64", "model.dropout=0",
              f"train.max_steps={steps}", "train.eval_every=1000", "train.log_every=1", "train.progress=false",
              "train.precision=fp32", "train.num_threads=1", "optim.lr=3e-3", "data.split_seed=0"]
    _run([sys.executable, "-m", "lmforge", "finetune", *common, f"train.batch_size={2 * per_rank}",
          f"out_dir={tmp_path / 'one'}"], tmp_path)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge",
                 "finetune", *common, f"train.batch_size={per_rank}", f"out_dir={tmp_path / 'two'}"], tmp_path)
    assert f"2 processes (ddp); global batch {per_rank} x 1 x 2 = {2 * per_rank} examples" in proc.stdout
    (one,) = (tmp_path / "one").iterdir()
    (two,) = (tmp_path / "two").iterdir()
    a, b = read_metrics(one), read_metrics(two)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert sum(r["split"] == "train" for r in a) == steps
    for ra, rb in zip(a, b):
        for key in ("loss", "accuracy"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (key, ra, rb)
    last = f"step_{steps:08d}"
    wa = load_file(one / "checkpoints" / last / "model.safetensors")
    wb = load_file(two / "checkpoints" / last / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5)


def test_deepspeed_config_is_lmforges_settings_with_the_file_merged_in_and_contradictions_refused(tmp_path):
    from lmforge.config import load_config
    from lmforge.distributed.zero import deepspeed_config
    from lmforge.errors import LmforgeError

    cfg = load_config(None, ["train.batch_size=4", "train.grad_accum_steps=3", "optim.max_grad_norm=0.5",
                             "distributed.strategy=deepspeed", "distributed.zero_stage=3",
                             "distributed.offload_optimizer=true", "distributed.offload_param=true"])
    ds = deepspeed_config(cfg, world=2, precision="bf16", device=torch.device("cpu"))
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 3, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                       "offload_param": {"device": "cpu", "pin_memory": False}}
    # the example file in configs/ adds tuning knobs and keeps lmforge's settings
    example = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero3.json"
    cfg.distributed.deepspeed_config = str(example)
    merged = deepspeed_config(cfg, world=2, precision="bf16", device=torch.device("cpu"))
    assert merged["zero_optimization"]["stage"] == 3 and merged["zero_optimization"]["overlap_comm"] is True
    assert merged["train_batch_size"] == 24
    for text, what in [('{"zero_optimization": {"stage": 1}}', "zero_optimization.stage=1"),
                       ('{"gradient_accumulation_steps": 8}', "gradient_accumulation_steps=8"),
                       ('{"optimizer": {"type": "Adam"}}', "remove 'optimizer'"),
                       ('{"zero_optimization": ', "not valid JSON"), ('[1, 2]', "must hold a mapping")]:
        bad = tmp_path / "ds.json"
        bad.write_text(text)
        cfg.distributed.deepspeed_config = str(bad)
        with pytest.raises(LmforgeError, match=re.escape(what)):
            deepspeed_config(cfg, world=2, precision="bf16", device=torch.device("cpu"))


def test_deepspeed_launcher_local_rank_argument_is_taken_into_the_environment(monkeypatch):
    from lmforge.cli import _launcher_local_rank

    monkeypatch.setenv("LOCAL_RANK", "")  # recorded, so the LOCAL_RANK the call sets is undone afterwards
    monkeypatch.delenv("LOCAL_RANK")
    assert _launcher_local_rank(["--local_rank=1", "pretrain", "--config", "x.yaml"]) == ["pretrain", "--config", "x.yaml"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert _launcher_local_rank(["pretrain", "--local_rank", "0", "a=b"]) == ["pretrain", "a=b"]


def _rank_with_a_slow_preparation(rank: int, tmp: str, port: int) -> None:
    """One of 2 gloo ranks (torch.multiprocessing.spawn) pretraining on a corpus that is not
    prepared yet, with distributed.timeout_s=8: preparing it takes over 12 s in whichever rank
    does it (rank 0, as rank 1 comes 3 s late), so a collective wait meanwhile would time out.
    (8 s, not less: rank 0 alone writes the run directory and the reports meanwhile.)"""
    import time

    import lmforge.data.shards as shards
    import lmforge.jobs as pretrain_module
    import lmforge.tasks.corpus as corpus_module
    from lmforge.config import load_config

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    tmp_path = Path(tmp)
    prepare, prepared_data = shards.prepare, corpus_module.prepared_data

    def slow_prepare(*args, **kwargs):
        with open(tmp_path / "prepared_by", "a") as f:
            f.write(f"{rank}\n")
        time.sleep(12)
        return prepare(*args, **kwargs)

    def late_prepared_data(*args, **kwargs):
        time.sleep(3 * rank)
        return prepared_data(*args, **kwargs)

    shards.prepare, corpus_module.prepared_data = slow_prepare, late_prepared_data
    cfg = load_config(None, [
        f"data.corpus={tmp_path / 'corpus'}", "data.train_tokenizer_vocab=200", f"data.cache_dir={tmp_path / 'cache'}",
        "data.seq_len=32", "data.val_frac=0.2", f"out_dir={tmp_path / 'runs'}", "model.hidden_size=32",
        "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64", "model.max_position_embeddings=64",
        "train.batch_size=4", "train.max_steps=2", "train.eval_every=2", "train.eval_batches=1",
        "train.checkpoint_every=2", "train.progress=false", "train.num_threads=1", "train.precision=fp32",
        "distributed.timeout_s=8"])
    pretrain_module.pretrain(cfg)


def test_a_preparation_longer_than_the_collective_timeout_does_not_time_out_the_other_rank(tmp_path):
    """Every rank waits for the prepared data on the cache's file lock, not in a collective: a
    corpus that takes longer to tokenize than distributed.timeout_s does not stop the job."""
    import socket

    import torch.multiprocessing as mp

    from conftest import write_tiny_corpus

    write_tiny_corpus(tmp_path / "corpus", docs=30, sentences=20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_with_a_slow_preparation, args=(str(tmp_path), port), nprocs=2, join=True)
    assert len((tmp_path / "prepared_by").read_text().splitlines()) == 1  # once; the other rank reused it
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "summary.json").is_file()


@pytest.mark.parametrize("verb,overrides,seconds", [("pretrain", ["distributed.timeout_s=7"], 7),
                                                    ("finetune", ["task.name=classify", "distributed.timeout_s=7"], 7),
                                                    ("pretrain", [], 1800)],
                         ids=["pretrain", "finetune", "default"])
def test_distributed_timeout_s_is_the_process_groups_timeout(monkeypatch, tmp_path, verb, overrides, seconds):
    import datetime

    import torch.distributed as dist

    from lmforge.config import load_config
    from lmforge.jobs import finetune
    from lmforge.jobs import pretrain

    class Joined(Exception):
        pass

    seen = {}

    def init_process_group(backend, **kwargs):
        seen.update(kwargs)
        raise Joined  # as far as this test goes: the group is not really made

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(None, [f"out_dir={tmp_path}", "train.device=cpu", *overrides])
    with pytest.raises(Joined):
        {"pretrain": pretrain, "finetune": finetune}[verb](cfg)
    assert seen["timeout"] == datetime.timedelta(seconds=seconds)


def test_a_cli_process_in_a_job_ends_with_its_verbs_code_and_its_output_flushed(tmp_path):
    """exit_job ends a torchrun process without interpreter finalization (where gloo's threads
    can abort it): the verb's code must come through and nothing printed (unflushed, to a pipe)
    may be lost. A one-rank gloo group stands in for the job."""
    script = tmp_path / "job.py"
    script.write_text(
        "import sys, torch.distributed as dist\n"
        "from lmforge.distributed.parallel import exit_job\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
        "print('written before the end', end='')\n"  # buffered: a pipe is not a terminal
        "sys.stderr.write('and to stderr')\n"
        "exit_job(3)\n"
        "print('never reached')\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "written before the end" and "and to stderr" in proc.stderr


def test_exit_job_outside_a_job_returns_the_code():
    from lmforge.distributed.parallel import exit_job
    assert exit_job(5) == 5
