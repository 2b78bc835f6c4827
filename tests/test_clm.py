"""Causal-LM pretraining through the same loop: accumulation, learning, exact resume, generate."""

import contextlib
import json

import pytest
import torch

from conftest import interrupt_during_step
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.data.corpora import open_corpus
from lmforge.data.shards import PreparedData, prepare
from lmforge.data.tokenizers import load_tokenizer, train_bpe
from lmforge.jobs import build_model, pretrain, resume
from lmforge.data.prepared import fill_vocab_size
from lmforge.tasks.base import Batch
from lmforge.tasks.clm import CausalLMTask
from lmforge.train.log import read_metrics
from lmforge.train.loop import accumulate_gradients


@pytest.fixture(scope="module")
def bpe_prepared(tmp_path_factory, tiny_corpus):
    corpus = open_corpus(str(tiny_corpus))
    tok = train_bpe((t for _, t in corpus.documents()), 320)
    out = tmp_path_factory.mktemp("bpe") / "tiny"
    prepare(corpus, tok, out, val_frac=0.2, split_seed=1, progress=False)
    return PreparedData(out)


def gpt_config(prepared, out_dir, *overrides):
    return load_config(None, [
        "model.arch=gpt", "task.name=clm", f"data.corpus={prepared.folder}", "data.seq_len=32", f"out_dir={out_dir}",
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128",
        "model.max_position_embeddings=64", "model.dropout=0.1", "model.layer_norm_eps=1e-5",
        "optim.decay=2d", "optim.weight_decay=0.1", "optim.beta2=0.95", "optim.schedule=cosine",
        "optim.max_grad_norm=1.0", "optim.lr=3e-3", "optim.warmup_frac=0.1",
        "train.batch_size=8", "train.max_steps=12", "train.eval_every=6", "train.eval_batches=2",
        "train.log_every=1", "train.checkpoint_every=6", "train.progress=false", "clm.sample_tokens=8",
        "clm.sample_prompts=the cat|a dog", *overrides])


def test_gpt2_tokenizer_from_the_registry_package():
    tok = load_tokenizer("gpt2")
    assert tok.kind == "gpt2" and tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]


def test_shards_join_documents_with_end_of_text(bpe_prepared):
    stream = torch.from_numpy(bpe_prepared.shards("train")[0].astype("int64"))
    eot = bpe_prepared.tokenizer.eot_id
    assert bpe_prepared.manifest["document_separator_id"] == eot
    assert int((stream == eot).sum()) == bpe_prepared.manifest["splits"]["train"]["documents"]


def test_tokens_per_step_sets_accumulation():
    cfg = load_config(None, ["model.arch=gpt", "task.name=clm", "train.batch_size=4", "data.seq_len=64",
                             "train.tokens_per_step=1024"])
    assert cfg.train.grad_accum_steps == 4
    with pytest.raises(LmforgeError, match="must be a positive multiple"):
        load_config(None, ["model.arch=gpt", "task.name=clm", "train.batch_size=4", "data.seq_len=64",
                           "train.tokens_per_step=1000"])


def test_k_micro_batches_give_the_gradient_of_one_batch_k_times_larger(bpe_prepared, tmp_path):
    cfg = fill_vocab_size(gpt_config(bpe_prepared, tmp_path, "model.dropout=0"), bpe_prepared.tokenizer)
    model = build_model(cfg)
    task = CausalLMTask(cfg, bpe_prepared, model)
    micro = [task.train_batch(0, m) for m in range(3)]
    big = Batch({k: torch.cat([b.tensors[k] for b in micro]) for k in micro[0].tensors},
                num_targets=sum(b.num_targets for b in micro), num_tokens=sum(b.num_tokens for b in micro))
    cpu, amp = torch.device("cpu"), contextlib.nullcontext()
    accumulate_gradients(task, model, micro, cpu, amp)
    g_micro = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    accumulate_gradients(task, model, [big], cpu, amp)
    assert max((g_micro[n] - p.grad).abs().max().item() for n, p in model.named_parameters()) <= 1e-6


def test_clm_learns_beyond_unigram_and_writes_samples(bpe_prepared, tmp_path, capsys):
    run_dir, summary = pretrain(gpt_config(bpe_prepared, tmp_path, "train.max_steps=300", "train.eval_every=300",
                                           "train.log_every=50", "model.dropout=0"))
    assert summary["val_loss"] < summary["unigram_val_loss"] - 0.3
    assert summary["val_perplexity"] == pytest.approx(2.718281828 ** summary["val_loss"], rel=1e-6)
    assert "- **the cat**" in (run_dir / "samples.md").read_text()
    capsys.readouterr()
    assert main(["generate", str(run_dir), "the cat", "--max-new-tokens", "12", "--num-samples", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all(r["text"] and r["tokens"] <= 12 for r in rows)
    assert main(["predict", str(run_dir), "the [MASK]"]) == 2  # fill-mask needs a BERT


def test_clm_resume_after_sigint_is_bit_exact(bpe_prepared, tmp_path, monkeypatch):
    full_dir, _ = pretrain(gpt_config(bpe_prepared, tmp_path / "full"))
    interrupt_during_step(monkeypatch, CausalLMTask, 4)
    cut_dir, summary = pretrain(gpt_config(bpe_prepared, tmp_path / "cut"))
    assert summary["stopped_by"] == "signal"
    monkeypatch.undo()
    resume(cut_dir)
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if r["split"] == "train"]  # noqa: E731
    assert losses(cut_dir) == losses(full_dir)
