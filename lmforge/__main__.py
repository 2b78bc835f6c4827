"""`python -m lmforge ...` is the same as the `lmforge` command (and what torchrun launches)."""

from lmforge.cli import entry

if __name__ == "__main__":
    entry()
