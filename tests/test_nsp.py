"""Next-sentence prediction: pair construction, the model's NSP path against the plain one, the task."""

import numpy as np
import pytest
import torch

from conftest import tiny_config
from lmforge.config import ModelConfig
from lmforge.data.nsp import Documents, PairBatches, make_pair, truncate_pair
from lmforge.errors import LmforgeError
from lmforge.models.bert import BertForMaskedLM

SEP, CLS, PAD = 1, 2, 0


def _corpus(n_docs=12, seed=0):
    """Tokens that say where they are: every token id is unique (10 + its position in the stream);
    every 6th-ish one is a sentence end; documents of 40-120 tokens separated by SEP."""
    rng = np.random.default_rng(seed)
    stream, ends, doc_of = [], [], {}
    pos = 10
    for d in range(n_docs):
        for k in range(int(rng.integers(40, 120))):
            stream.append(pos)
            doc_of[pos] = d
            if k % 6 == 5:
                ends.append(pos)
            pos += 1
        stream.append(SEP)
    return np.array(stream, dtype=np.int64), ends, doc_of


def test_pairs_are_balanced_and_come_from_the_right_places():
    stream, ends, doc_of = _corpus()
    docs = Documents([stream[:500], stream[500:]], SEP, ends)  # two shards: documents cross the cut
    assert len(docs.docs) == 12
    labels = []
    for i in range(600):
        rng = np.random.default_rng(i)
        a, b, label = make_pair(docs, rng, max_len=48)
        labels.append(label)
        assert a and b and len(a) + len(b) <= 45
        for seg in (a, b):  # each segment is a run of consecutive tokens of one document
            assert seg == list(range(seg[0], seg[0] + len(seg))) and len({doc_of[t] for t in seg}) == 1
        if label == 0:  # is next: B follows A in the same document
            assert doc_of[a[0]] == doc_of[b[0]] and b[0] > a[-1]
        else:
            assert doc_of[a[0]] != doc_of[b[0]]
    assert 0.42 < np.mean(labels) < 0.58


def test_truncation_drops_from_the_longer_segment_until_the_pair_fits():
    a, b = list(range(30)), list(range(100, 110))
    truncate_pair(a, b, 25, np.random.default_rng(0))
    assert len(a) + len(b) == 25 and len(b) == 10 and a == list(range(a[0], a[0] + 15))


def test_pair_rows_have_segment_ids_padding_and_are_a_function_of_their_key():
    stream, ends, _ = _corpus()
    batches = PairBatches(Documents([stream], SEP, ends), max_len=48, seed=3, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    keys = [("train", 7, 0, r) for r in range(8)]
    t = batches.rows(keys)
    for r in range(8):
        ids, types, att = t["input_ids"][r], t["token_type_ids"][r], t["attention_mask"][r]
        n = int(att.sum())
        seps = (ids[:n] == SEP).nonzero().flatten().tolist()
        assert ids[0] == CLS and len(seps) == 2 and seps[1] == n - 1
        assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:n] == 1).all() and (ids[n:] == PAD).all()
    again = batches.rows(keys[3:5])  # the same key gives the same row, whatever else is in the batch
    assert torch.equal(again["input_ids"], t["input_ids"][3:5])
    with pytest.raises(LmforgeError, match="at least 2 documents"):
        Documents([stream[:stream.tolist().index(SEP) + 1]], SEP, ends)


def test_the_nsp_path_equals_the_full_computation():
    """llm.c's habit: the fast path (last layer on [CLS] + selected positions only) against the
    whole sequence computed and read at those positions."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                      max_position_embeddings=32, dropout=0.0, next_sentence_head=True)
    model = BertForMaskedLM(cfg).eval()
    ids = torch.randint(5, 50, (3, 16))
    types = torch.zeros_like(ids)
    types[:, 9:] = 1
    attention = torch.ones_like(ids)
    attention[2, 12:] = 0
    selected = torch.zeros_like(ids, dtype=torch.bool)
    selected[0, [3, 7]] = selected[1, [1, 2, 14]] = selected[2, 5] = True
    full = model(ids, types, attention)
    fast = model(ids, types, attention, selected=selected)
    torch.testing.assert_close(fast.logits, full.logits[selected], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.next_sentence_logits, full.next_sentence_logits, rtol=1e-5, atol=1e-5)
    fused = model(ids, types, attention, selected=selected, targets=ids[selected])
    expected = torch.nn.functional.cross_entropy(full.logits[selected], ids[selected], reduction="sum")
    torch.testing.assert_close(fused.loss_sum, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.next_sentence_logits, full.next_sentence_logits, rtol=1e-5, atol=1e-5)
    assert full.next_sentence_logits.shape == (3, 2)


def test_nsp_task_trains_logs_nsp_accuracy_and_resumes_exactly(tiny_prepared, tmp_path):
    from lmforge.jobs import pretrain, resume
    from lmforge.train.log import read_metrics

    args = ("mlm.nsp=true", "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3", "model.dropout=0.1",
            "optim.schedule=constant", "optim.warmup_frac=0")  # a schedule that does not depend on max_steps
    run_dir, summary = pretrain(tiny_config(tiny_prepared, tmp_path / "full", *args))
    assert 0 <= summary["val_nsp_accuracy"] <= 1
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    assert all({"mlm_loss", "nsp_loss", "nsp_accuracy"} <= r.keys() for r in train)
    for r in train:  # the logged loss is MLM's mean plus NSP's
        assert r["loss"] == pytest.approx(r["mlm_loss"] + r["nsp_loss"], rel=1e-5)
    cut, _ = pretrain(tiny_config(tiny_prepared, tmp_path / "cut", *args[:1], "train.max_steps=3", *args[2:]))
    resume(cut, ["train.max_steps=6"])
    assert [r["loss"] for r in read_metrics(cut)] == [r["loss"] for r in records]
