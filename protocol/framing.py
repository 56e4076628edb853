"""Where each command hiredis parsed lies in the bytes it came from.

hiredis splits a client's stream into commands in C but does not say where each one ends. For a
command in canonical form (what every client library writes: no leading zeros, no sign) the size
follows from its arguments, so the offsets can be computed back. :func:`locate` does that and
checks itself: every computed start must fall on a ``*``. Input that fails the check is not
canonical, and the caller hands it to the exact parser (:mod:`protocol.requests`).

:func:`judge_tail` judges the unfinished command at the end of a chunk (the relay's rule 1: relay
only what has been judged): a tail whose name could still turn out to be ``key_evt_amqp.*`` is
kept back, so none of our commands ever reaches Redis in part, and a tail that is not canonical
goes to the exact parser before any of it reaches Redis.
"""

from __future__ import annotations

import enum

from protocol.commands import ADMIN_PREFIX, MAX_ADMIN_NAME
#: The longest header line of a canonical request (`*` or `$`, at most 10 digits, CRLF).
MAX_HEADER = 13
_STAR = 42

#: Digits of each small length: `len(str(n))` without a str on the hot path.
SMALL_DIGITS = [len(str(n)) for n in range(10_000)]


def digits(n: int) -> int:
    return SMALL_DIGITS[n] if n < 10_000 else len(str(n))


class Tail(enum.Enum):
    """What to do with the unfinished command at the end of a chunk."""

    RELAY = "relay"  # not ours: relay it as it comes
    HOLD = "hold"  # ours, or its name is not readable yet: keep it back
    MALFORMED = "malformed"  # not canonical: the exact parser must judge it from its start


def encoded_size(command: object) -> int:
    """The size of a command in canonical multibulk form (None stands for `*-1`); -1 if it has
    an element that is not a bulk string (Redis refuses those; they cannot be placed)."""
    if command is None:
        return 5
    assert isinstance(command, list)
    size = 3 + digits(len(command))
    for arg in command:
        if arg.__class__ is not bytes:
            return -1
        n = len(arg)
        size += 5 + digits(n) + n
    return size


def locate(stream: bytes, commands: list[object]) -> list[tuple[object, int, int]] | None:
    """(command, start, end) for each command hiredis parsed out of ``stream`` (which begins where
    the first of them begins), or None when the input is not canonical."""
    total = len(stream)
    pos = 0
    placed: list[tuple[object, int, int]] = []
    for command in commands:
        size = encoded_size(command)
        if size < 0 or pos >= total or stream[pos] != _STAR:
            return None
        placed.append((command, pos, pos + size))
        pos += size
    if pos > total:
        return None
    return placed


def judge_tail(tail: bytes) -> Tail:
    """Judge the unfinished command that ``tail`` (from its first byte) begins."""
    if tail[:1] != b"*":
        return Tail.MALFORMED
    count_end = tail.find(b"\r\n", 0, MAX_HEADER)
    if count_end < 0:
        return Tail.HOLD if len(tail) < MAX_HEADER and _digits_so_far(tail[1:]) else Tail.MALFORMED
    if not _canonical_number(tail[1:count_end]):
        return Tail.MALFORMED
    if count_end + 2 == len(tail):
        return Tail.HOLD
    if tail[count_end + 2] != ord("$"):
        return Tail.MALFORMED
    length_end = tail.find(b"\r\n", count_end + 2, count_end + 2 + MAX_HEADER)
    if length_end < 0:
        if len(tail) < count_end + 2 + MAX_HEADER and _digits_so_far(tail[count_end + 3:]):
            return Tail.HOLD
        return Tail.MALFORMED
    length_text = tail[count_end + 3:length_end]
    if not _canonical_number(length_text):
        return Tail.MALFORMED
    length = int(length_text)
    if length > MAX_ADMIN_NAME or length < len(ADMIN_PREFIX):
        return Tail.RELAY
    name = tail[length_end + 2:length_end + 2 + len(ADMIN_PREFIX)]
    if len(name) < len(ADMIN_PREFIX):
        return Tail.HOLD
    return Tail.HOLD if name.lower() == ADMIN_PREFIX else Tail.RELAY


def _digits_so_far(text: bytes) -> bool:
    """A header cut short may still turn out canonical: digits, then at most a final CR. Anything
    else (``\r`` followed by another byte, which Redis accepts) is for the exact parser."""
    if text.endswith(b"\r"):
        text = text[:-1]
    return text == b"" or text.isdigit()


def _canonical_number(text: bytes) -> bool:
    return text.isdigit() and (text[:1] != b"0" or text == b"0")
