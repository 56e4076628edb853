"""Where each command hiredis parsed lies in the bytes it came from.

hiredis splits a client's stream into commands in C but does not say where each one ends. For a
command in canonical form (what every client library writes: no leading zeros, no sign) the size
follows from its arguments, so the offsets can be computed back. :func:`place` does that and
checks itself: every computed start must fall on a ``*``, and the last end on the stream's end or
on the start of the unfinished tail. Input that fails the check is not canonical, and the caller
hands it to the exact parser (:mod:`protocol.requests`).

It also vets the unfinished tail of a chunk (the "relay only what you have judged" rule): a tail
whose command name could still turn out to be ``key_evt_amqp.*`` is kept back, so none of our
commands ever reaches Redis in part.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.commands import ADMIN_PREFIX

#: A command name longer than this cannot be one of ours, so a tail needs no more to be judged.
MAX_ADMIN_NAME = 64
#: The longest tail kept back while its name is not yet readable (`*N\r\n$L\r\n` + the name).
VET_LIMIT = 256
_STAR = 42


@dataclass(frozen=True, slots=True)
class Plan:
    #: (command, start, end) for each complete command; offsets into the stream, the first start
    #: negative when that command began in bytes already relayed.
    commands: list[tuple[object, int, int]]
    #: Bytes of the stream that may be relayed now; the rest is kept back (an unvetted tail).
    relay_until: int
    #: Bytes of the unfinished command that will have been relayed (0 when none or kept back).
    partial_seen: int


#: Digits of each small length: `len(str(n))` without a str on the hot path.
SMALL_DIGITS = [len(str(n)) for n in range(10_000)]


def digits(n: int) -> int:
    return SMALL_DIGITS[n] if n < 10_000 else len(str(n))


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


def place(stream: bytes, commands: list[object], relayed_before: int) -> Plan | None:
    """Locate ``commands`` (hiredis's output for ``stream``) in ``stream``; None if not canonical.

    ``relayed_before`` is how many bytes of the first command were relayed before ``stream``
    (a command that began in an earlier chunk).
    """
    total = len(stream)
    pos = -relayed_before
    placed: list[tuple[object, int, int]] = []
    for command in commands:
        size = encoded_size(command)
        if size < 0 or (pos >= 0 and (pos >= total or stream[pos] != _STAR)):
            return None
        placed.append((command, pos, pos + size))
        pos += size
    if pos == total:
        return Plan(placed, total, 0)
    if pos > total:
        return None
    if pos < 0:
        # No command started in this stream: the tail began earlier and was vetted then.
        return Plan(placed, total, relayed_before + total)
    if stream[pos] != _STAR:
        return None
    tail = stream[pos:]
    if holds_back(tail):
        return Plan(placed, pos, 0)
    return Plan(placed, total, total - pos)


def holds_back(tail: bytes) -> bool:
    """Must this unfinished command stay out of Redis for now? Yes if it is one of ours, or if
    its name is not readable yet and the tail is still short."""
    verdict = _vet(tail)
    if verdict is None:
        return len(tail) < VET_LIMIT
    return verdict


def _vet(tail: bytes) -> bool | None:
    """Is the unfinished command in ``tail`` one of ours? None while its name is not complete."""
    eol = tail.find(b"\r\n")
    if eol < 0:
        return None
    if tail[eol + 2:eol + 3] != b"$":
        return None if eol + 2 >= len(tail) else False
    eol2 = tail.find(b"\r\n", eol + 2)
    if eol2 < 0:
        return None
    try:
        length = int(tail[eol + 3:eol2])
    except ValueError:
        return False  # malformed: Redis (or the exact parser) will say so
    if length > MAX_ADMIN_NAME or length < len(ADMIN_PREFIX):
        return False
    name = tail[eol2 + 2:eol2 + 2 + length]
    if len(name) < length:
        return None
    return name.lower().startswith(ADMIN_PREFIX)
