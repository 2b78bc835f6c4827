"""Reading users' text files: bytes that are not UTF-8 become U+FFFD and are counted, never a traceback.

Files are opened with `errors="surrogateescape"`, which turns each undecodable byte into one lone
surrogate (U+DC80..U+DCFF) instead of failing; `repair` swaps those for U+FFFD and says how many
there were, so the caller can warn once with a count rather than refuse a corpus over a few bytes.
"""

from __future__ import annotations

import re

READ_ARGS = {"encoding": "utf-8-sig", "errors": "surrogateescape"}  # for open(): a BOM is not text
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def repair(text: str) -> tuple[str, int]:
    """(text with every escaped undecodable byte replaced by U+FFFD, number of such bytes)."""
    if text.isascii():  # the common case, and a fast one
        return text, 0
    return _ESCAPED_BYTE.subn("\ufffd", text)


def invalid_utf8_warning(bad_bytes: int, where: str) -> str:
    """'warning: 3 invalid UTF-8 bytes in <where> were replaced by U+FFFD'."""
    return (f"warning: {bad_bytes} invalid UTF-8 byte{'s' if bad_bytes != 1 else ''} in {where} "
            f"{'were' if bad_bytes != 1 else 'was'} replaced by U+FFFD")
