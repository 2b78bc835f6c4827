"""Training: the one loop, optimizer and schedules, checkpoints, run directories, logging."""
