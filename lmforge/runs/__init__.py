"""Run I/O: everything that reads or writes a run directory or a checkpoint.

checkpoint.py  the checkpoint format (safetensors + state.json), atomic writes, loading back
run_dir.py     the experiment directory and its provenance (config, git, environment)
readers.py     reading a run's weights and tokenizer, and Hugging Face directories, into tensors

May import: lmforge.config, lmforge.errors, lmforge.models (to build what it reads). Nothing above
(train, distributed, tasks); it knows no task names.
"""
