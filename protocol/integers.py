"""Redis's integer syntax (``util.c`` ``string2ll``), for every integer argument and setting.

Redis turns an argument into a number only if it is ``0`` or ``-?[1-9][0-9]*`` and fits a signed
64-bit integer: no ``+``, no blank, no ``_``, no leading zero, no ``-0``, ASCII digits only.
Python's ``int()`` takes all of those, so it must never see an argument first. What a caller does
with ``None``: reply ``-ERR value is not an integer or out of range`` (Redis's text), or name the
setting in its own error; then check the setting's own range.
"""

from __future__ import annotations

__all__ = ["LLONG_MAX", "LLONG_MIN", "string2ll"]

LLONG_MIN = -(2**63)
LLONG_MAX = 2**63 - 1
#: Redis's LONG_STR_SIZE: "-9223372036854775808" plus its NUL. Longer text is refused unread.
_LONG_STR_SIZE = 21


def string2ll(text: bytes | bytearray | str) -> int | None:
    """The value of ``text`` if Redis would take it as an integer, else None."""
    # The exact request parser calls this for every header: the common case goes first.
    if isinstance(text, str):
        if not text.isascii():  # str.isdigit() takes other scripts' digits
            return None
        text = text.encode("ascii")
    if not 0 < len(text) < _LONG_STR_SIZE:
        return None
    # bytes.isdigit() is ASCII only; "0" alone is the one number that may start with 0.
    if text.isdigit():
        if text[0] == 0x30 and len(text) > 1:  # "0"
            return None
        value = int(text)
        return value if value <= LLONG_MAX else None
    if text[0] != 0x2D or not text[1:].isdigit() or text[1] == 0x30:  # "-", "0"
        return None
    value = int(text)
    return value if value >= LLONG_MIN else None
