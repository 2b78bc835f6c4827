"""Model families: each file reads top to bottom (nanoGPT's habit); none knows about parallelism,
checkpoints or tasks.

bert.py, gpt.py, electra.py, classifier.py; hf.py (transformers name and config maps, safe file
reading); registry.py (model.arch -> family).

May import: lmforge.ops, data (tokenizer types), config, errors. Nothing above.
"""
