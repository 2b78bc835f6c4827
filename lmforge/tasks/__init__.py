"""Tasks: a model + batches + loss + metrics. The training loop knows nothing else."""
