"""Training: the one loop and what it is built from.

loop.py (the loop as named steps), interface.py (what it asks of a task), optim.py (parameter
groups, AdamW, LR schedules), schedule.py (step shapes: sequence-length schedule, batch ramp),
log.py (metrics.jsonl, TensorBoard, CSV, W&B), machine.py (threads, precision, memory),
ema.py (the weight average), recompute.py (activation checkpointing), overfit.py (the overfit
test: the same batches again and again, and its verdict), layerstats.py (per-block gradient
norm, update-to-weight ratio and output RMS).

May import: lmforge.distributed, runs, models, data, ops, config. Never lmforge.tasks (no
objective) or anything above it.
"""
