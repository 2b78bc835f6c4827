"""Atomic file writes: the one helper every writer of a file that others read uses.

A reader (a resumed run, `lmforge report`, another rank, a user's editor) sees a file's old
content or its new content, never half of it, and a crash or a full disk mid-write leaves the old
file whole: the content goes to a temporary file beside the target (same filesystem), is flushed
to disk, then renamed over the target (os.replace is atomic on POSIX and Windows). Folders that
are published whole (checkpoints, prepared shards, exports) are made the same way, in a temporary
folder renamed into place, by their writers.

Imports nothing of lmforge: every layer may use it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to (by any writer: savefig, tokenizer.save, ...);
    renamed over `path` when the block ends without an error, removed when it fails. The
    temporary name keeps the suffix (matplotlib picks the format from it) and names the process
    (two processes writing the same file do not share a temporary file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` with `text`: readers see the old or the new content, never a mix."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def _fsync(path: Path) -> None:
    """Flush a written file to disk before it is renamed into place (else a power cut can leave
    the new name pointing at an empty file)."""
    with contextlib.suppress(OSError):  # a file system without fsync (some network mounts): rename anyway
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
