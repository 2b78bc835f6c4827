"""prepare: memmap shards, manifest, seeded document split, unigram counts, no overwriting."""

import json

import numpy as np
import pytest

from lmforge.data.corpora import is_validation_doc, open_corpus
from lmforge.data.shards import PreparedData, prepare
from lmforge.data.tokenizers import load_tokenizer, train_wordpiece
from lmforge.errors import LmforgeError


def test_prepared_shards_hold_every_document_once_with_separators(tiny_prepared, tiny_corpus):
    m = tiny_prepared.manifest
    tok = tiny_prepared.tokenizer
    assert m["dtype"] == "uint16" and m["tokenizer"]["sha256"] == tok.sha256
    docs = dict(open_corpus(str(tiny_corpus)).documents())
    val_ids = set(m["split"]["validation_doc_ids"])
    assert val_ids == {d for d in docs if is_validation_doc(d, 1, 0.2)}
    assert m["splits"]["train"]["documents"] + m["splits"]["validation"]["documents"] == len(docs)
    for split, names in (("train", sorted(set(docs) - val_ids)), ("validation", sorted(val_ids))):
        expected = []
        for name in names:
            expected += tok.encode(docs[name]) + [tok.sep_id]
        stream = np.concatenate(tiny_prepared.shards(split)).astype(np.int64)
        assert stream.tolist() == expected
        assert m["splits"][split]["tokens"] == len(expected)


def test_unigram_counts_are_train_split_token_counts(tiny_prepared):
    stream = np.concatenate(tiny_prepared.shards("train")).astype(np.int64)
    stream = stream[stream != tiny_prepared.tokenizer.sep_id]
    assert np.array_equal(tiny_prepared.unigram_counts(), np.bincount(stream, minlength=len(tiny_prepared.unigram_counts())))


def test_shards_roll_over_and_prepare_refuses_to_overwrite(tmp_path, tiny_corpus):
    corpus = open_corpus(str(tiny_corpus))
    tok = train_wordpiece((t for _, t in corpus.documents()), 200)
    out = prepare(corpus, tok, tmp_path / "p", val_frac=0.2, split_seed=1, shard_tokens=1000, progress=False)
    data = PreparedData(out)
    shards = data.manifest["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] == 1000 for s in shards[:-1])
    before = (out / "manifest.json").read_text()
    with pytest.raises(LmforgeError, match="already exists"):
        prepare(corpus, tok, out, progress=False)
    assert (out / "manifest.json").read_text() == before
    prepare(corpus, tok, out, val_frac=0.2, split_seed=1, force=True, progress=False)
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["tokens"] == \
        sum(s["tokens"] for s in shards)


def test_bad_corpus_and_tokenizer_names_are_clear_errors(tmp_path):
    with pytest.raises(LmforgeError, match="unknown corpus 'nope'"):
        open_corpus("nope")
    with pytest.raises(LmforgeError, match="unknown tokenizer 'nope'"):
        load_tokenizer("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="no .txt or .md files"):
        open_corpus(str(tmp_path / "empty"))


def test_jsonl_and_text_file_corpora(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "first doc"}\n\n{"text": "second doc"}\n')
    assert [t for _, t in open_corpus(str(jl)).documents()] == ["first doc", "second doc"]
    txt = tmp_path / "c.txt"
    txt.write_text("para one\nstill one\n\npara two\n")
    assert [t for _, t in open_corpus(str(txt)).documents()] == ["para one\nstill one\n", "para two\n"]
    jl.write_text('{"body": 1}\n')
    with pytest.raises(LmforgeError, match="line 1 has no string field 'text'"):
        list(open_corpus(str(jl)).documents())


def test_hf_corpus_streams_the_train_split_through_the_real_datasets_library(offline_datasets, monkeypatch,
                                                                            tmp_path):
    # `datasets` itself, offline, on a local dataset folder (a path is a dataset name to it): its
    # train split is train.jsonl, its test split test.jsonl, and nothing is fetched
    datasets = offline_datasets
    folder = tmp_path / "local-dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "first"}\n{"text": "  "}\n{"text": null}\n{"text": "second"}\n')
    (folder / "test.jsonl").write_text('{"text": "held out, not train"}\n')
    calls, real_load = [], datasets.load_dataset

    def load_dataset(*args, **kwargs):  # the real one, recording how lmforge calls it
        ds = real_load(*args, **kwargs)
        calls.append((args, kwargs, type(ds)))
        return ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    corpus = open_corpus(f"hf:{folder}")
    assert calls == []  # opening streams nothing; reading does
    assert [t for _, t in corpus.documents()] == ["first", "second"]  # blank and missing texts skipped
    assert calls == [((str(folder), None), {"split": "train", "streaming": True}, datasets.IterableDataset)]
    assert not (tmp_path / "hf-cache").exists() or not any((tmp_path / "hf-cache").rglob("*.arrow"))  # streamed
