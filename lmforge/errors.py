"""The one exception type for user mistakes (bad config, missing file, wrong argument).

`lmforge.cli` catches it and prints `error: <message>` on one line with exit code 2. Anything
else is a bug and keeps its traceback.
"""


class LmforgeError(Exception):
    """A mistake the user can fix; the message says how."""
