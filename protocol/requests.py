"""Parse what a client sends to Redis, byte for byte as redis-server 7.0 does.

Sans-IO: bytes in, :class:`Request` values out; no sockets, clocks or logging. The rules are those of
``processInlineBuffer`` and ``processMultibulkBuffer`` in Redis's ``networking.c``, checked against a
real redis-server 7.0 (``tests/protocol/test_requests.py`` does so on every run).

Grammar::

    stream     = *( multibulk / inline )
    multibulk  = "*" count line-end *( "$" length line-end <length bytes> 2<any byte> )
    line-end   = CR <any byte>                         ; Redis never looks at the byte after CR
    inline     = *( <any byte but LF> ) LF            ; one trailing CR is stripped
    count      = integer in [-2**63, max_multibulk]   ; <= 0: consumed and ignored
    length     = integer in [0, max_bulk]
    integer    = "0" / [ "-" ] %x31-39 *DIGIT        ; no "+", no leading zeros, no spaces

* Redis never checks the two bytes after a bulk, nor the byte after a header's ``\\r``: it skips
  them. ``*1\\r\\n$4\\r\\nPINGxx`` is a PING, and so is ``*1\\rX$4\\rXPING\\r\\n``.
* An inline line is split like ``sdssplitargs``: blanks (C ``isspace``) separate arguments;
  ``"..."`` understands ``\\n \\r \\t \\b \\a \\xHH`` and takes any other escaped byte as itself;
  ``'...'`` understands only ``\\'``; a quote may open mid-argument (``a"b c"`` is ``ab c``) but a
  closing quote must be followed by a blank or the end of the line. ``""`` is an empty argument.
* Requests Redis ignores (``*0``, ``*-1``, an empty or all-blank inline line) are consumed and not
  returned: their bytes lie between the offsets of the requests around them.
* Redis finds line ends with ``strchr``, which stops at a NUL byte: a NUL before the end of a line
  means that line never ends, and the connection errors once more than ``max_inline`` bytes wait.

Limits, each a security limit on what one client can make us hold:

* ``max_inline`` (64 KiB, Redis's PROTO_INLINE_MAX_SIZE) caps every line: inline requests, ``*``
  and ``$`` headers. A line is refused as soon as more than ``max_inline`` bytes of it are buffered
  without its terminator. Redis applies that test only to what one ``read()`` happened to leave
  buffered, so it sometimes accepts a longer line that arrived whole; we always refuse it, so the
  outcome never depends on how the stream was split, and we never accept what Redis could refuse.
* ``max_bulk`` (512 MiB, proto-max-bulk-len) caps one argument; ``max_multibulk`` (2**31 - 1, INT_MAX
  in 7.0; 6.x used 1024*1024) caps the argument count.
* The buffer: after :meth:`RequestParser.next_request` returns ``NEED_DATA`` the parser holds at
  most ``max(max_inline + 1, length + 2)`` unconsumed bytes (``length`` of the bulk being read), plus
  the arguments already read for an unfinished request. Consumed bytes are dropped on the next feed.
* Not checked here: Redis's "unauthenticated multibulk/bulk length" limits (10 arguments, 16 KiB
  before AUTH). They depend on the connection's auth state, which a parser cannot know; the proxy
  forwards the bytes and Redis enforces them itself.

What the caller does next::

    parser.feed(data)
    while (request := parser.next_request()) is not NEED_DATA:
        forward(request)
    # on ProtocolError as exc: send exc.reply to the client, then close that client.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocol.errors import NEED_DATA, NeedData, ProtocolError

_TOO_BIG_INLINE = "ERR Protocol error: too big inline request"
_TOO_BIG_COUNT = "ERR Protocol error: too big mbulk count string"
_TOO_BIG_LENGTH = "ERR Protocol error: too big bulk count string"
_BAD_COUNT = "ERR Protocol error: invalid multibulk length"
_BAD_LENGTH = "ERR Protocol error: invalid bulk length"
_UNBALANCED = "ERR Protocol error: unbalanced quotes in request"

_INT_MAX = 2**31 - 1
_LLONG_MIN, _LLONG_MAX = -(2**63), 2**63 - 1
# Redis's string2ll refuses 21 bytes or more before looking at them (LONG_STR_SIZE).
_LONG_STR_SIZE = 21
# Above this, copy a bulk out through a memoryview (one copy) rather than a slice (two).
_BIG_ARG = 32 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    """One command as the client sent it.

    ``args[0]`` is the command name, unnormalised. ``start`` and ``end`` are absolute offsets in the
    stream fed so far: ``end`` is just past the request's last byte, so ``data[start:end]`` are the
    exact bytes to forward. ``inline`` tells the two wire forms apart.
    """

    args: tuple[bytes, ...]
    start: int
    end: int
    inline: bool


class _State(enum.Enum):
    REQUEST = enum.auto()  # at a request boundary: "*" opens a multibulk, any other byte an inline line
    BULK_HEADER = enum.auto()  # inside a multibulk, expecting "$<length>\r?"
    BULK_BODY = enum.auto()  # inside a multibulk, expecting <length> bytes and 2 more
    DEAD = enum.auto()  # a ProtocolError was raised: it is raised again on every call


class RequestParser:
    """Turns the bytes a client sends into :class:`Request` values.

    Call :meth:`feed` with whatever arrived, then :meth:`next_request` until it returns
    ``NEED_DATA``. On :class:`ProtocolError`, send its ``reply`` and close the client: the parser is
    dead and raises the same error on every later call.
    """

    def __init__(
        self,
        *,
        max_inline: int = 64 * 1024,
        max_bulk: int = 512 * 1024 * 1024,
        max_multibulk: int = _INT_MAX,
    ) -> None:
        self._max_inline = max_inline
        self._max_bulk = max_bulk
        self._max_multibulk = max_multibulk
        self._buf = bytearray()
        self._base = 0  # absolute stream offset of self._buf[0]
        self._pos = 0  # first unconsumed byte in self._buf
        # Where the search for the current line's end resumes, so that a line arriving byte by byte
        # is scanned once in all rather than once per feed; _stuck is set once a NUL was seen in it.
        self._scan = 0
        self._stuck = False
        self._state = _State.REQUEST
        self._start = 0  # absolute offset of the current request's first byte
        self._args: list[bytes] = []
        self._remaining = 0  # bulks still to read in the current multibulk
        self._length = 0  # length of the bulk being read
        self._error: ProtocolError | None = None

    @property
    def offset(self) -> int:
        """Absolute stream offset of the first byte not yet consumed."""
        return self._base + self._pos

    @property
    def buffered(self) -> int:
        """How many fed bytes are held and not yet consumed (for limits and tests)."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Append bytes received from the client. Then call :meth:`next_request` until ``NEED_DATA``."""
        if self._error is not None:
            raise self._error
        if self._pos:
            # Deleting a bytearray's head only moves its start pointer, so this costs nothing per
            # byte; doing it here keeps buffer indices stable while next_request runs.
            del self._buf[: self._pos]
            self._base += self._pos
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def next_request(self) -> Request | NeedData:
        """The next complete request, or ``NEED_DATA``. Raises :class:`ProtocolError`."""
        if self._error is not None:
            raise self._error
        try:
            while True:
                result = self._step()
                if result is not None:
                    return result
        except ProtocolError as exc:
            self._die(exc)
            raise

    def _die(self, exc: ProtocolError) -> None:
        self._error = exc
        self._state = _State.DEAD
        # Free what the dead connection held; offset keeps pointing where parsing stopped.
        self._base += self._pos
        self._buf, self._pos, self._args = bytearray(), 0, []

    def _step(self) -> Request | NeedData | None:
        """Advance by at least one line; None means progress was made and the caller should go on."""
        if self._state is not _State.REQUEST:
            return self._read_bulks()
        if self._pos == len(self._buf):
            return NEED_DATA
        self._start = self.offset
        if self._buf[self._pos] == 0x2A:  # "*"
            return self._read_count()
        return self._read_inline()

    def _advance(self, pos: int) -> None:
        self._pos = pos
        self._scan = pos
        self._stuck = False

    def _line_end(self, terminator: bytes, too_big: str) -> int:
        """Index of the current line's terminator, or -1 while it has not arrived.

        Raises ``too_big`` as soon as the line is known to be longer than ``max_inline``.
        """
        buf = self._buf
        if not self._stuck:
            end = buf.find(terminator, self._scan)
            stop = len(buf) if end < 0 else end
            if buf.find(b"\0", self._scan, stop) >= 0:
                # Redis's strchr stops at this NUL and will never see a terminator after it.
                self._stuck = True
            elif end >= 0:
                if end - self._pos > self._max_inline:
                    raise ProtocolError(too_big)
                self._scan = end
                return end
            else:
                self._scan = stop
        if len(buf) - self._pos > self._max_inline:
            raise ProtocolError(too_big)
        return -1

    def _header_end(self, too_big: str) -> int:
        """Index of a ``*``/``$`` header's ``\\r`` once the byte after it (skipped unread) arrived."""
        end = self._line_end(b"\r", too_big)
        if end < 0 or end + 1 >= len(self._buf):
            return -1
        return end

    def _read_count(self) -> Request | NeedData | None:
        end = self._header_end(_TOO_BIG_COUNT)
        if end < 0:
            return NEED_DATA
        count = _string2ll(self._buf, self._pos + 1, end)
        if count is None or count > self._max_multibulk:
            raise ProtocolError(_BAD_COUNT)
        self._advance(end + 2)
        if count <= 0:
            return None  # Redis ignores "*0" and "*-N" silently
        self._remaining = count
        self._state = _State.BULK_HEADER
        return self._read_bulks()

    def _read_length(self) -> NeedData | None:
        """Read a ``$<length>`` header, then expect the body; NEED_DATA while it is incomplete."""
        # Like Redis, judge the line's length before its first byte: "*1\r\nXXXX..." (no CR) is
        # "too big bulk count string" once long enough, never "expected '$'".
        end = self._header_end(_TOO_BIG_LENGTH)
        if end < 0:
            return NEED_DATA
        first = self._buf[self._pos]
        if first != 0x24:  # "$"
            raise ProtocolError(f"ERR Protocol error: expected '$', got '{_as_reply_char(first)}'")
        length = _string2ll(self._buf, self._pos + 1, end)
        if length is None or length < 0 or length > self._max_bulk:
            raise ProtocolError(_BAD_LENGTH)
        self._advance(end + 2)
        self._length = length
        self._state = _State.BULK_BODY
        return None

    def _read_bulks(self) -> Request | NeedData:
        # One loop for all the bulks of a request: this is the hot path for every real client.
        buf = self._buf
        while True:
            if self._state is _State.BULK_HEADER and self._read_length() is NEED_DATA:
                return NEED_DATA
            pos = self._pos
            stop = pos + self._length
            if len(buf) < stop + 2:
                return NEED_DATA
            if self._length < _BIG_ARG:
                self._args.append(bytes(buf[pos:stop]))
            else:
                with memoryview(buf) as view:  # one copy, and no view left to block the next resize
                    self._args.append(bytes(view[pos:stop]))
            self._advance(stop + 2)
            self._remaining -= 1
            if not self._remaining:
                break
            self._state = _State.BULK_HEADER
        args, self._args = tuple(self._args), []
        self._state = _State.REQUEST
        return Request(args, self._start, self.offset, False)

    def _read_inline(self) -> Request | None | NeedData:
        end = self._line_end(b"\n", _TOO_BIG_INLINE)
        if end < 0:
            return NEED_DATA
        stop = end - 1 if end > self._pos and self._buf[end - 1] == 0x0D else end
        args = _split_inline(bytes(self._buf[self._pos : stop]))
        self._advance(end + 1)
        if not args:
            return None
        return Request(tuple(args), self._start, self.offset, True)


def _string2ll(buf: bytearray, start: int, stop: int) -> int | None:
    """Redis's ``string2ll``: ``0`` or ``-?[1-9][0-9]*`` within a signed 64-bit integer, else None."""
    if not 0 < stop - start < _LONG_STR_SIZE:
        return None
    raw = buf[start:stop]
    digits = raw[1:] if raw[0] == 0x2D else raw  # "-"
    # isdigit() first: int() alone would also take "+1", " 1", "1_0" and "01".
    if not digits.isdigit() or (digits[0] == 0x30 and len(raw) > 1):
        return None
    value = int(raw)
    return value if _LLONG_MIN <= value <= _LLONG_MAX else None


def _as_reply_char(byte: int) -> str:
    # Redis formats the byte with %c and then, so as not to break the reply line, turns CR and LF
    # into spaces (addReplyErrorFormat). Every other byte, printable or not, is echoed raw.
    return " " if byte in (0x0D, 0x0A) else chr(byte)


# C isspace() in the "C" locale: Redis only sets LC_COLLATE, so bytes >= 0x80 are never blanks.
_BLANKS = frozenset(b" \t\n\r\v\f")
# An unquoted argument ends at these only: \v and \f skip as blanks between arguments, but inside
# one they are ordinary bytes (sdssplitargs' switch lists just these four, and NUL).
_BARE_ENDS = frozenset(b" \n\r\t")
_ESCAPES = {ord("n"): 0x0A, ord("r"): 0x0D, ord("t"): 0x09, ord("b"): 0x08, ord("a"): 0x07}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_BACKSLASH, _DQUOTE, _SQUOTE = 0x5C, 0x22, 0x27


class _Quote(enum.Enum):
    NONE = enum.auto()
    DOUBLE = enum.auto()
    SINGLE = enum.auto()


def _split_inline(line: bytes) -> list[bytes]:
    """``sdssplitargs`` on one inline line (which never holds a NUL: see ``_line_end``)."""
    args: list[bytes] = []
    n, i = len(line), 0
    while True:
        while i < n and line[i] in _BLANKS:
            i += 1
        if i == n:
            return args
        arg, i = _split_one(line, i)
        args.append(arg)


def _split_one(line: bytes, i: int) -> tuple[bytes, int]:
    """One argument starting at ``line[i]``: its bytes and the index just past it."""
    n, arg, quote = len(line), bytearray(), _Quote.NONE
    while True:
        c = line[i] if i < n else None
        if quote is _Quote.NONE:
            if c is None or c in _BARE_ENDS:
                return bytes(arg), i
            if c == _DQUOTE:
                quote = _Quote.DOUBLE
            elif c == _SQUOTE:
                quote = _Quote.SINGLE
            else:
                arg.append(c)
        elif c is None:
            raise ProtocolError(_UNBALANCED)
        elif (c == _DQUOTE and quote is _Quote.DOUBLE) or (c == _SQUOTE and quote is _Quote.SINGLE):
            if i + 1 < n and line[i + 1] not in _BLANKS:
                raise ProtocolError(_UNBALANCED)
            return bytes(arg), i + 1
        elif c == _BACKSLASH and i + 1 < n:
            i = _unescape(line, i, quote, arg)
        else:
            arg.append(c)
        i += 1


def _unescape(line: bytes, i: int, quote: _Quote, arg: bytearray) -> int:
    """Append the escape at ``line[i]`` (a backslash) to ``arg``; return the index of its last byte."""
    nxt = line[i + 1]
    if quote is _Quote.SINGLE:
        if nxt == _SQUOTE:
            arg.append(_SQUOTE)
            return i + 1
        arg.append(_BACKSLASH)
        return i
    if nxt == ord("x") and i + 3 < len(line) and line[i + 2] in _HEX and line[i + 3] in _HEX:
        arg.append(int(line[i + 2 : i + 4], 16))
        return i + 3
    arg.append(_ESCAPES.get(nxt, nxt))
    return i + 1


__all__ = ["Request", "RequestParser"]
