"""Model definitions. Each file reads top to bottom; none knows about parallelism or tasks."""
