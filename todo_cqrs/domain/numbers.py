"""Numbers read from text (path ids, `limit`, `min_version`): ASCII digits only, bounded.

`str.isdigit()` also accepts `²` and `١`; `int()` accepts `١٠` and underscores. Neither is a number
of this API.
"""

from __future__ import annotations

MAX_ID = 2**63 - 1  # BIGINT
MAX_VERSION = 2**31 - 1  # INT: the version column of both databases
_MAX_DIGITS = len(str(MAX_ID))


def ascii_positive_int(text: str, maximum: int = MAX_ID) -> int | None:
    """The value of `text` when it is 1..maximum written in ASCII digits (leading zeros or not, however
    many); None otherwise."""
    if not text.isascii() or not text.isdigit():
        return None
    digits = text.lstrip("0")
    if not digits or len(digits) > _MAX_DIGITS:
        return None
    value = int(digits)
    return value if value <= maximum else None
