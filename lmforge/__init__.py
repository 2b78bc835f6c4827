"""lmforge: pretrain and fine-tune transformer language models with one loop, one config system
and self-explaining run directories. Start with `lmforge --help`."""

__version__ = "0.1.0"
