"""Request streams for the differential fuzzer: what a client sends, and how it sends it.

Nothing here does I/O. :func:`make_case` turns ``(seed, index)`` into a :class:`Case`, the same one on
every run and machine (``random.Random`` seeded with a string is stable), so a failing case is kept
as that pair. A case is a stream of *pieces* (valid commands, deterministic only, as multibulk or
inline, and garbage of every kind Redis's ``processInlineBuffer``/``processMultibulkBuffer`` judge),
maybe mutated as a whole, then cut into chunks written with small pauses between, maybe followed by
a half-close (``shutdown(SHUT_WR)``).

Changing a generator changes what every ``(seed, index)`` means: the regression list in
``tests/e2e/test_fuzz_differential.py`` keeps each case's fingerprint to notice that.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

INLINE_MAX = 64 * 1024  # Redis's PROTO_INLINE_MAX_SIZE
READ_SIZE = 16 * 1024  # Redis's PROTO_IOBUF_LEN: what one read() of a client takes
MAX_GAP = 0.02  # seconds between two writes of one case, at most

KEYS = (b"k", b"l", b"h", b"qk", b"n")
#: Counts for ``*``: Redis takes [-2**63, INT_MAX], ignores <= 0, refuses the rest (and 11+ unauthenticated).
COUNTS = (b"2147483647", b"2147483648", b"4294967295", b"3000000000", b"9223372036854775807",
          b"9223372036854775808", b"-1", b"-2147483649", b"0", b"00", b"01", b"+1", b" 1", b"1 ",
          b"", b"abc", b"1x", b"11", b"10", b"1024", b"1025", b"-0", b"1" * 21)
#: Lengths for ``$``: Redis takes [0, 512 MiB], refuses the rest (and 16385+ unauthenticated).
LENGTHS = (b"-5", b"-1", b"abc", b"03", b"+3", b"9223372036854775808", b"536870913", b"536870912",
           b"", b" 3", b"3 ", b"16385", b"16384", b"-0", b"99999999999999999999", b"3\x00")
#: Bytes that open a RESP3 value or something else that is not ``$``.
TYPE_BYTES = b"*+-:%~_#,(=>|!$"
INLINE_SIZES = (READ_SIZE - 3, READ_SIZE + 3, INLINE_MAX - 8, INLINE_MAX - 1, INLINE_MAX,
                INLINE_MAX + 1, INLINE_MAX + 8, INLINE_MAX + READ_SIZE - 8, INLINE_MAX + READ_SIZE + 8)


@dataclass(frozen=True)
class Case:
    """What one client connection sends: ``chunks[i]`` is written after sleeping ``gaps[i]``."""

    chunks: tuple[bytes, ...]
    gaps: tuple[float, ...]
    half_close: bool = False
    recipe: str = "hand-written"

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def fingerprint(self) -> str:
        digest = hashlib.sha1(repr((self.chunks, self.gaps, self.half_close)).encode())
        return digest.hexdigest()[:12]

    def describe(self) -> str:
        """The exact chunks (as Python expressions, long runs folded), the pauses and the half-close."""
        lines = [f"recipe: {self.recipe}; {len(self.data)} bytes in {len(self.chunks)} write(s)"
                 f"{'; then shutdown(SHUT_WR)' if self.half_close else ''}"]
        if len(self.chunks) > 8 and all(len(c) == 1 for c in self.chunks) and not any(self.gaps):
            return "\n".join([*lines, f"  send byte by byte, no pause: {show(self.data)}"])
        for gap, chunk in zip(self.gaps, self.chunks):
            lines.append(f"  sleep {gap * 1000:.1f} ms, send {show(chunk)}")
        return "\n".join(lines)


def single(data: bytes, *, half_close: bool = False, recipe: str = "hand-written") -> Case:
    """A case written in one ``send``."""
    return Case((data,), (0.0,), half_close, recipe)


def show(data: bytes, fold: int = 32) -> str:
    """``repr`` of ``data`` with runs of one byte longer than ``fold`` written as ``b'a' * 70000``."""
    parts: list[str] = []
    start = i = 0
    while i < len(data):
        j = i
        while j < len(data) and data[j] == data[i]:
            j += 1
        if j - i > fold:
            if start < i:
                parts.append(repr(data[start:i]))
            parts.append(f"{data[i:i + 1]!r} * {j - i}")
            start = j
        i = j
    if start < len(data) or not parts:
        parts.append(repr(data[start:]))
    return " + ".join(parts)


# -- valid commands ------------------------------------------------------------------------------


def _token(rng: random.Random) -> bytes:
    """A value that needs no quoting inline."""
    return bytes(rng.choice(b"abcxyz019-_:.") for _ in range(rng.randint(1, 8)))


def _value(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.6:
        return _token(rng)
    if roll < 0.9:
        return rng.randbytes(rng.randint(0, 12))
    return rng.choice([b"", b"1", b"-3", b"9223372036854775807", b"a b", b'"q"', b"\r\n"])


def _key(rng: random.Random) -> bytes:
    return rng.choice(KEYS)


_COMMANDS: dict[bytes, Callable[[random.Random], list[bytes]]] = {
    b"PING": lambda r: [b"PING"] + ([_value(r)] if r.random() < 0.3 else []),
    b"ECHO": lambda r: [b"ECHO", _value(r)],
    b"SET": lambda r: [b"SET", _key(r), _value(r)],
    b"GET": lambda r: [b"GET", _key(r)],
    b"INCR": lambda r: [b"INCR", _key(r)],
    b"APPEND": lambda r: [b"APPEND", _key(r), _value(r)],
    b"DEL": lambda r: [b"DEL"] + [_key(r) for _ in range(r.randint(1, 3))],
    b"EXISTS": lambda r: [b"EXISTS"] + [_key(r) for _ in range(r.randint(1, 3))],
    b"LPUSH": lambda r: [b"LPUSH", _key(r)] + [_value(r) for _ in range(r.randint(1, 3))],
    b"LRANGE": lambda r: [b"LRANGE", _key(r), b"0", r.choice([b"-1", b"1", b"x"])],
    b"HSET": lambda r: [b"HSET", _key(r), _token(r), _value(r)],
    b"HGETALL": lambda r: [b"HGETALL", _key(r)],
    b"MULTI": lambda r: [b"MULTI"],
    b"EXEC": lambda r: [b"EXEC"],
    b"DISCARD": lambda r: [b"DISCARD"],
    b"SELECT": lambda r: [b"SELECT", r.choice([b"0", b"1", b"15", b"16", b"-1", b"x"])],
    b"QUIT": lambda r: [b"QUIT"],
    b"UNKNOWN": lambda r: [r.choice([b"NOSUCH", b"fooBAR", _token(r)])] + [_value(r) for _ in range(r.randint(0, 2))],
    b"ARITY": lambda r: r.choice([[b"GET"], [b"SET", b"k"], [b"ECHO"], [b"INCR", b"a", b"b"], [b"HSET", b"h", b"f"]]),
}
_WEIGHTS = {b"QUIT": 0.3, b"UNKNOWN": 0.7, b"ARITY": 0.7}
_NAMES = list(_COMMANDS)


def _command(rng: random.Random) -> list[bytes]:
    name = rng.choices(_NAMES, weights=[_WEIGHTS.get(n, 1.0) for n in _NAMES])[0]
    args = _COMMANDS[name](rng)
    if rng.random() < 0.2:  # Redis looks names up case-insensitively
        args[0] = bytes(c ^ 0x20 if rng.random() < 0.5 and chr(c).isalpha() else c for c in args[0])
    return args


def _eol(rng: random.Random) -> bytes:
    """A header's line end: Redis finds ``\\r`` and skips the byte after it, whatever it is."""
    roll = rng.random()
    if roll < 0.9:
        return b"\r\n"
    return rng.choice([b"\rX", b"\r\r", b"\r\x00", b"\n", b"\r"])


def multibulk(args: list[bytes], eol: Callable[[], bytes] = lambda: b"\r\n") -> bytes:
    out = [b"*%d" % len(args), eol()]
    for arg in args:
        out += [b"$%d" % len(arg), eol(), arg, b"\r\n"]
    return b"".join(out)


def _inline_arg(rng: random.Random, arg: bytes) -> bytes:
    if arg and all(c > 0x20 and c not in b"\"'\\" and c < 0x7F for c in arg) and rng.random() < 0.8:
        return arg
    escaped = b"".join(b"\\x%02x" % c if c < 0x20 or c > 0x7E or c in b'"\\' else bytes([c]) for c in arg)
    return b'"' + escaped + b'"'


def _piece_multibulk(rng: random.Random) -> bytes:
    args = _command(rng)
    if rng.random() < 0.15:
        return multibulk(args, lambda: _eol(rng))
    data = multibulk(args)
    if rng.random() < 0.05:  # Redis never checks the two bytes after a bulk
        data = data[:-2] + rng.choice([b"xx", b"\n\r", b"\x00\x00"])
    return data


def _piece_inline(rng: random.Random) -> bytes:
    args = _command(rng)
    sep = rng.choice([b" ", b" ", b"  ", b"\t"])
    lead = rng.choice([b"", b"", b"", b" "])
    return lead + sep.join(_inline_arg(rng, a) for a in args) + rng.choice([b"\r\n", b"\r\n", b"\n"])


def _piece_bad_count(rng: random.Random) -> bytes:
    tail = rng.choice([b"", multibulk([b"GET"])[4:], b"$3\r\nGET\r\n$1\r\nk\r\n"])
    return b"*" + rng.choice(COUNTS) + _eol(rng) + tail


def _piece_bad_length(rng: random.Random) -> bytes:
    before = rng.choice([b"", b"$3\r\nGET\r\n"])
    count = rng.choice([b"1", b"2", b"3"]) if before else b"1"
    return b"*" + count + b"\r\n" + before + b"$" + rng.choice(LENGTHS) + _eol(rng) + rng.choice([b"", b"abc\r\n"])


def _piece_wrong_type(rng: random.Random) -> bytes:
    byte = bytes([rng.choice(TYPE_BYTES)]) if rng.random() < 0.6 else bytes([rng.randrange(256)])
    if rng.random() < 0.3:
        return b"*2\r\n$4\r\nINCR\r\n" + byte + b"$6\r\ncounter\r\n"
    return b"*1\r\n" + byte + b"4\r\nPING\r\n"


def _piece_nested(rng: random.Random) -> bytes:
    return rng.choice([b"*2\r\n*1\r\n$4\r\nPING\r\n", b"*1\r\n*1\r\n$4\r\nPING\r\n$4\r\nPING\r\n",
                       b"**1\r\n", b"*1\r\n*-1\r\n"])


def _piece_random(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randint(1, 12))


_QUOTED = (b'ECHO "a\\x41"', b'ECHO "abc', b"ECHO 'it\\'s'", b'ECHO "a"b', b'SET k "x y"', b'ECHO "\\xZZ"',
           b'ECHO ""', b"ECHO ''", b'ECHO a"b c"', b"ECHO 'abc", b'ECHO "\\"', b'ECHO "a\\nb\\r\\t\\b\\a"',
           b'ECHO "\\x4"', b"ECHO 'a'b", b'"ECHO" x', b'ECHO "\x00"', b"ECHO \"'\" '\"'")


def _piece_quotes(rng: random.Random) -> bytes:
    if rng.random() < 0.6:
        line = rng.choice(_QUOTED)
    else:
        parts = [b'"', b"'", b"\\", b"x41", b"a", b" ", b"\\x4", b"\\n", b"\\'"]
        line = b"ECHO " + b"".join(rng.choice(parts) for _ in range(rng.randint(1, 8)))
    return line + rng.choice([b"\r\n", b"\n"])


def _piece_long_line(rng: random.Random) -> bytes:
    size = rng.choice(INLINE_SIZES)
    kind = rng.randrange(4)
    if kind == 0:
        return b"ECHO " + b"a" * size + b"\r\n"
    if kind == 1:
        return b"*" + b"1" * size + b"\r\n"
    if kind == 2:
        return b"*1\r\n$" + b"1" * size + b"\r\n"
    return b"a" * size  # no line end at all


def _piece_quirk(rng: random.Random) -> bytes:
    return rng.choice([b"*1\rX$4\rXPING\r\n", b"\r\n", b"   \r\n", b"*0\r\n", b"*-1\r\n", b"\n",
                       b"*1\r\n$4\r\nPINGxx", b"PING\r\r\n", b"PING\x00\r\n", b"\x00PING\r\n"])


def _piece_big(rng: random.Random) -> bytes:
    return multibulk([b"ECHO", b"b" * rng.choice([READ_SIZE + 1, 32 * 1024 + 1, 70_000])])


_PIECES: tuple[tuple[Callable[[random.Random], bytes], float], ...] = (
    (_piece_multibulk, 6), (_piece_inline, 4), (_piece_bad_count, 1), (_piece_bad_length, 1),
    (_piece_wrong_type, 1), (_piece_nested, 0.4), (_piece_random, 0.8), (_piece_quotes, 1),
    (_piece_long_line, 0.25), (_piece_quirk, 0.8), (_piece_big, 0.2),
)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(len(data) + 1)
    roll = rng.randrange(4)
    if roll == 0:
        return data[:at]
    if roll == 1:
        return data[:at] + bytes([rng.randrange(256)]) + data[at:]
    if roll == 2 and at < len(data):
        return data[:at] + bytes([rng.randrange(256)]) + data[at + 1:]
    return data[:at] + data[at + 1:]


def _cut(rng: random.Random, data: bytes) -> tuple[tuple[bytes, ...], tuple[float, ...]]:
    roll = rng.random()
    if roll < 0.45 or len(data) < 2:
        return (data,), (0.0,)
    if roll < 0.5 and len(data) <= 64:  # byte by byte, no pause
        return tuple(data[i:i + 1] for i in range(len(data))), (0.0,) * len(data)
    cuts = sorted(rng.sample(range(1, len(data)), min(rng.randint(1, 5), len(data) - 1)))
    bounds = [0, *cuts, len(data)]
    chunks = tuple(data[a:b] for a, b in zip(bounds, bounds[1:]))
    gaps = (0.0,) + tuple(round(rng.uniform(0, MAX_GAP), 4) for _ in chunks[1:])
    return chunks, gaps


def make_case(seed: int, index: int) -> Case:
    """The ``index``-th case of the run seeded ``seed`` (independent of every other index)."""
    rng = random.Random(f"key-evt-amqp-fuzz/{seed}/{index}")
    makers, weights = zip(*_PIECES)
    chosen = rng.choices(makers, weights=weights, k=rng.randint(1, 6))
    data = b"".join(maker(rng) for maker in chosen)
    recipe = "+".join(maker.__name__.removeprefix("_piece_") for maker in chosen)
    if rng.random() < 0.25:
        data = _mutate(rng, data)
        recipe += ", mutated"
    if not data:
        data = b"PING\r\n"
    chunks, gaps = _cut(rng, data)
    return Case(chunks, gaps, half_close=rng.random() < 0.15, recipe=recipe)
