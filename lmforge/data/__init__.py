"""Data: corpora, tokenizers, memmap shards, and masking. Data flows corpus -> shards -> batches."""
