"""Fast paths with a plain reference beside each (llm.c's habit); tests/test_ops.py checks each pair.

linear_cross_entropy.py, linear_distill.py, dropout.py, attention.py, rope.py.

May import: torch and lmforge.config, errors. Nothing above.
"""
