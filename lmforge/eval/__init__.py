"""Evaluation: fill-mask prediction, generation, classification of texts, report pictures.

predict.py, generate.py (KV-cached sampling), classify.py, metrics.py (classification metrics,
calibration), report.py (report.png, `lmforge report`).

May import: lmforge.train (logs and schedules the reports draw), runs, models, data, ops, config.
Never lmforge.tasks or the jobs above it.
"""
