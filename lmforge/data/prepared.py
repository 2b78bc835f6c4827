"""The prepared token data a pretraining objective reads, made from `cfg.data`.

data.corpus is a `lmforge prepare` output (read as it is) or a corpus (registry name, files,
hf:NAME) that is tokenized once into the cache ($LMFORGE_CACHE/prepared) and read from there by
every later run; data.train_tokenizer_vocab trains the tokenizer on the corpus first (cached too).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from lmforge.config import Config
from lmforge.data.corpora import open_corpus
from lmforge.data.packages import cache_root, cached_item_lock
from lmforge.data.shards import PreparedData, prepared_or_prepare
from lmforge.data.tokenizers import TextTokenizer, load_tokenizer, train_bpe, train_wordpiece
from lmforge.errors import LmforgeError
from lmforge.files import atomic_path


def prepared_data(cfg: Config, progress: bool = True, trained_kind: str = "wordpiece") -> PreparedData:
    """The prepared shards for cfg.data, tokenizing the corpus first if no cache has them.
    trained_kind: the vocabulary data.train_tokenizer_vocab trains (bpe | wordpiece)."""
    d = cfg.data
    if (Path(d.corpus) / "manifest.json").is_file():  # already a `lmforge prepare` output
        return PreparedData(d.corpus)
    corpus = open_corpus(d.corpus, d.cache_dir)
    root = cache_root(d.cache_dir)
    if d.train_tokenizer_vocab:
        tokenizer = trained_tokenizer(corpus, trained_kind,
                                      d.train_tokenizer_vocab, root)
    else:
        tokenizer = load_tokenizer(d.tokenizer, d.cache_dir)
    return prepared_or_prepare(corpus, tokenizer, root, val_frac=d.val_frac, split_seed=d.split_seed,
                               progress=progress)


def trained_tokenizer(corpus, kind: str, vocab_size: int, root: Path) -> TextTokenizer:
    """A tokenizer of `kind` (bpe | wordpiece) trained on `corpus`, cached under root/tokenizers
    (keyed by corpus identity, kind and size) so that it is trained once, also by processes
    started together (under the file's lock)."""
    key = hashlib.sha256(f"{corpus.identity}:{kind}:{vocab_size}".encode()).hexdigest()[:16]
    path = root / "tokenizers" / f"{kind}-{vocab_size}-{key}.json"
    if not path.is_file():
        with cached_item_lock(path, f"training a {kind} vocabulary on {corpus.name}"):
            if not path.is_file():  # again: another process may have just trained it
                print(f"lmforge: training a {vocab_size}-entry {kind} vocabulary on {corpus.name}")
                train = train_bpe if kind == "bpe" else train_wordpiece
                tok = train((text for _, text in corpus.documents()), vocab_size)
                with atomic_path(path) as tmp:
                    tok.save(tmp)
    tok = load_tokenizer(str(path))
    tok.name = f"{kind}-{vocab_size}"
    return tok


def fill_vocab_size(cfg: Config, tokenizer: TextTokenizer) -> Config:
    """vocab_size: null -> the tokenizer's; a set value must hold every token id."""
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise LmforgeError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                           f"{tokenizer.vocab_size} tokens; set model.vocab_size={tokenizer.vocab_size} or null")
    return cfg
