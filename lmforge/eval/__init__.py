"""Evaluation: baselines, fill-mask prediction, report plots."""
