"""data.packing=documents: windows of the token stream whose documents do not see each other
(attention masked per document, for MLM and CLM), against data.packing=stream (BERT's and GPT-2's
windows, attention across the boundaries)."""

import pytest
import torch

from conftest import tiny_config
from lmforge.config import ModelConfig
from lmforge.data.windows import document_mask
from lmforge.errors import LmforgeError
from lmforge.jobs import pretrain
from lmforge.models.registry import build_model

SEP = 3


def test_document_mask_puts_a_separator_in_the_document_it_ends_and_is_none_for_one_document():
    ids = torch.tensor([[7, 8, SEP, 9, 9, SEP, 5], [7, 7, 7, 7, 7, 7, SEP]])
    mask = document_mask(ids, SEP)
    docs = [[0, 0, 0, 1, 1, 1, 2], [0] * 7]
    want = torch.tensor([[[a == b for b in row] for a in row] for row in docs])
    assert torch.equal(mask, want)
    assert document_mask(torch.tensor([[7, 8, 9, SEP]]), SEP) is None  # one document per row: the fast path


def _ids(vocab, rows=2, seq=16, boundary=6, seed=0):
    ids = torch.randint(5, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))
    ids[:, boundary] = SEP
    return ids


ENCODERS = {"bert": {}, "modernbert": {"local_window": 8, "global_every": 2},
            "deberta": {"position_buckets": 8, "max_relative_positions": 16}}
DECODERS = {"gpt": {}, "llama": {"num_kv_heads": 1}}


def _model(arch, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=100, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                      max_position_embeddings=32, dropout=0.0, **kw)
    return build_model(cfg).eval()


@pytest.mark.parametrize("arch", list(ENCODERS) + list(DECODERS))
def test_the_first_document_of_a_row_is_computed_as_if_the_row_ended_with_it(arch):
    model = _model(arch, **{**ENCODERS, **DECODERS}[arch])
    ids = _ids(100)
    mask = document_mask(ids, SEP)
    with torch.no_grad():  # RoPE, learned and relative positions alike: the same positions either way
        packed = model(ids, attention_mask=mask).logits
        alone = model(ids[:, :7]).logits
    assert (packed[:, :7] - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", list(ENCODERS) + list(DECODERS))
def test_no_token_sees_another_document(arch):
    model = _model(arch, **{**ENCODERS, **DECODERS}[arch])
    ids = _ids(100)
    other = ids.clone()
    other[:, :6] = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(9))  # document A changed
    with torch.no_grad():
        a = model(ids, attention_mask=document_mask(ids, SEP)).logits
        b = model(other, attention_mask=document_mask(other, SEP)).logits
        streamed = model(other).logits
    assert (a[:, 7:] - b[:, 7:]).abs().max().item() <= 1e-5  # document B did not see A
    assert (a[:, 7:] - streamed[:, 7:]).abs().max().item() > 1e-4  # without the mask it does


@pytest.mark.parametrize("arch", list(ENCODERS))
def test_selected_positions_with_a_document_mask_equal_the_full_logits_there(arch):
    model = _model(arch, **ENCODERS[arch])
    ids = _ids(100)
    mask = document_mask(ids, SEP)
    selected = torch.zeros_like(ids, dtype=torch.bool)
    selected[0, [1, 8, 12]] = selected[1, [3, 7]] = True
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits[selected]
        part = model(ids, attention_mask=mask, selected=selected).logits
    assert (full - part).abs().max().item() <= 1e-5


@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_a_packed_run_masks_its_batches_and_validates_on_the_streams_positions(tiny_prepared, tmp_path, task):
    from lmforge.tasks.registry import objective

    extra = ["task.name=clm", "model.arch=llama", "clm.sample_tokens=2"] if task == "clm" else []
    cfgs = {p: tiny_config(tiny_prepared, tmp_path / p, *extra, f"data.packing={p}", "train.max_steps=4")
            for p in ("stream", "documents")}
    tasks = {p: objective(task).create(c) for p, c in cfgs.items()}
    crossed = 0
    for step in range(10):
        batches = {p: t.train_batch(step, 0).tensors for p, t in tasks.items()}
        assert torch.equal(batches["stream"]["input_ids"], batches["documents"]["input_ids"])  # the same windows
        assert "attention_mask" not in batches["stream"]
        packed = batches["documents"].get("attention_mask")
        sep = tasks["documents"].tokenizer.doc_separator_id
        expected = document_mask(batches["documents"]["input_ids"], sep)
        assert (packed is None) == (expected is None) and (packed is None or torch.equal(packed, expected))
        crossed += packed is not None
    assert crossed >= 3  # this corpus's documents are ~150 tokens: many windows cross a boundary
    if task == "mlm":  # the validation masks are the stream's: the same positions, the same unigram baseline
        a, b = tasks["stream"].eval_batches(), tasks["documents"].eval_batches()
        assert all(torch.equal(x.tensors["selected"], y.tensors["selected"]) for x, y in zip(a, b))
    run_dir, summary = pretrain(cfgs["documents"])
    assert summary["steps"] == 4 and summary["val_loss"] > 0


@pytest.mark.parametrize("extra,message", [
    (["mlm.nsp=true"], "mlm.nsp's sentence pairs are cut from whole documents already"),
    (["task.name=electra"], "data.packing=documents is for task.name=mlm and clm, not task.name=electra"),
    (["data.packing=pack"], "data.packing='pack': use stream or documents"),
])
def test_packing_where_it_does_not_apply_is_refused_in_one_line(tiny_prepared, tmp_path, extra, message):
    with pytest.raises(LmforgeError, match=message):
        pretrain(tiny_config(tiny_prepared, tmp_path, "data.packing=documents", *extra))
