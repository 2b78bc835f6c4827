"""Fast paths with a plain reference beside each (llm.c habit); tests/test_ops.py checks each pair."""
