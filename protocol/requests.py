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
  without its terminator: that is Redis's own test, which it applies only while no terminator has
  arrived. So, like Redis, an inline line that arrives whole with its newline is accepted whatever
  its length (Redis reads 16 KiB at a time, so whether *it* sees the newline in time depends on how
  the bytes arrive; a proxy that forwards the line lets Redis judge it). A ``*``/``$`` header longer
  than 20 digits is invalid anyway (``string2ll``), so for headers the verdict is always an error.
* ``max_bulk`` (512 MiB, proto-max-bulk-len) caps one argument; ``max_multibulk`` (2**31 - 1, INT_MAX
  in 7.0; 6.x used 1024*1024) caps the argument count.
* The buffer: after :meth:`RequestParser.next_request` returns ``NEED_DATA`` the parser holds at
  most ``max(max_inline + 1, length + 2)`` unconsumed bytes (``length`` of the bulk being read), plus
  the arguments already read for an unfinished request. Consumed bytes are dropped on the next feed.
* Streaming (``keep`` given): only the arguments ``keep(name)`` asks for are kept; the bodies of the
  others are counted off as they arrive and never buffered, so a 512 MiB ``SET`` costs the parser
  nothing. A name longer than ``max_name`` is not looked at (no command of interest is that long).
  The kept arguments of one request are capped at ``max_kept`` bytes: past that,
  :class:`KeptTooLong` (a :class:`ProtocolError`) is raised.
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
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.errors import NEED_DATA, NeedData, ProtocolError
from protocol.integers import string2ll

#: ``keep`` returns this to keep every argument of a request (bounded by ``max_kept``).
KEEP_ALL = 1 << 62

_TOO_BIG_INLINE = "ERR Protocol error: too big inline request"
_TOO_BIG_COUNT = "ERR Protocol error: too big mbulk count string"
_TOO_BIG_LENGTH = "ERR Protocol error: too big bulk count string"
_BAD_COUNT = "ERR Protocol error: invalid multibulk length"
_BAD_LENGTH = "ERR Protocol error: invalid bulk length"
_UNBALANCED = "ERR Protocol error: unbalanced quotes in request"

_INT_MAX = 2**31 - 1
# Above this, copy a bulk out through a memoryview (one copy) rather than a slice (two).
_BIG_ARG = 32 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    """One command as the client sent it.

    ``args[0]`` is the command name, unnormalised. ``start`` and ``end`` are absolute offsets in the
    stream fed so far: ``end`` is just past the request's last byte, so ``data[start:end]`` are the
    exact bytes to forward. ``inline`` tells the two wire forms apart. A streaming parser (see
    ``keep``) returns only the arguments asked for: ``count`` is how many the request had; a run of
    plain inline requests of no interest may come back as one request with ``count`` 0.
    """

    args: tuple[bytes, ...]
    start: int
    end: int
    inline: bool
    count: int = field(default=-1, compare=False)

    @property
    def complete(self) -> bool:
        """True when ``args`` holds every argument of the request."""
        return self.count < 0 or self.count == len(self.args)


class KeptTooLong(ProtocolError):
    """The arguments a streaming parser was asked to keep passed ``max_kept`` bytes."""


class UnbalancedQuotes(ProtocolError):
    """``sdssplitargs`` refused a line: a quote never closes, or (``closed``) a closing quote is
    followed by something other than a blank. Redis's reply is the same for both."""

    def __init__(self, *, closed: bool) -> None:
        super().__init__(_UNBALANCED)
        self.closed = closed


class _State(enum.Enum):
    REQUEST = enum.auto()  # at a request boundary: "*" opens a multibulk, any other byte an inline line
    BULK_HEADER = enum.auto()  # inside a multibulk, expecting "$<length>\r?"
    BULK_BODY = enum.auto()  # inside a multibulk, expecting <length> bytes and 2 more
    INLINE_PASS = enum.auto()  # streaming: an inline line too long to be of interest, passed on to its end
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
        keep: Callable[[bytes], int] | None = None,
        max_name: int = 64,
        max_kept: int = 64 * 1024,
    ) -> None:
        """``keep``: streaming mode. Called with each request's name (as sent), it returns how many
        arguments to keep, the name included (1: the name only; :data:`KEEP_ALL`: all of them, up
        to ``max_kept`` bytes). Without it every argument is kept (and ``max_bulk`` bounds each)."""
        self._max_inline = max_inline
        self._max_bulk = max_bulk
        self._max_multibulk = max_multibulk
        self._keep_fn = keep
        self._max_name = max_name
        self._max_kept = max_kept
        self._keep = KEEP_ALL  # arguments of the current request to keep
        self._index = 0  # which argument of the current request is being read
        self._count = 0  # how many arguments the current request has
        self._kept = 0  # bytes of the current request's kept arguments
        self._passing = False  # the current request may be forwarded as it arrives
        self._skipping = False  # the bulk being read is counted off, not kept
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

    @property
    def passing_room(self) -> int:
        """Streaming: how many of the next bytes are the body of an argument nobody asked for and
        may be counted off with :meth:`absorb` instead of :meth:`feed` (0 if none). The two bytes
        after the body are left to :meth:`feed`, so that a request ends only in next_request()."""
        if self._state is _State.BULK_BODY and self._skipping and self._pos == len(self._buf):
            return max(0, self._length - 2)
        return 0

    def absorb(self, n: int) -> None:
        """Count off ``n`` bytes (at most :attr:`passing_room`) without buffering them."""
        assert 0 <= n <= self.passing_room
        self._base += n
        self._length -= n
        if self._index == 0:
            self._passing = True  # a name this long is nobody's

    @property
    def at_boundary(self) -> bool:
        """True when everything fed was returned as requests: nothing unfinished is held."""
        return self._state is _State.REQUEST and self._pos == len(self._buf)

    @property
    def forwardable(self) -> int:
        """Absolute offset up to which the bytes fed so far may be forwarded once
        :meth:`next_request` returned ``NEED_DATA``: the end of the last request returned, or, once
        the name of the unfinished request showed that it is not kept whole, all that was fed."""
        if self._state is _State.REQUEST or self._state is _State.DEAD:
            return self.offset
        if self._passing or self._state is _State.INLINE_PASS:
            return self._base + len(self._buf)
        return self._start

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
        if self._state is _State.INLINE_PASS:
            return self._pass_inline()
        if self._state is not _State.REQUEST:
            return self._read_bulks()
        if self._pos == len(self._buf):
            return NEED_DATA
        self._start = self.offset
        if self._buf[self._pos] == 0x2A:  # "*"
            return self._read_count()
        if self._keep_fn is not None:
            run = self._read_inline_run()
            if run is not None:
                return run
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
                # Redis refuses a line only while its terminator has not arrived (a whole header
                # line that long is refused anyway: string2ll takes at most 20 bytes).
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
        count = string2ll(self._buf[self._pos + 1 : end])
        if count is None or count > self._max_multibulk:
            raise ProtocolError(_BAD_COUNT)
        self._advance(end + 2)
        if count <= 0:
            return None  # Redis ignores "*0" and "*-N" silently
        self._remaining = self._count = count
        self._index = self._kept = 0
        self._keep = 1 if self._keep_fn is not None else KEEP_ALL
        self._passing = False
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
        length = string2ll(self._buf[self._pos + 1 : end])
        if length is None or length < 0 or length > self._max_bulk:
            raise ProtocolError(_BAD_LENGTH)
        self._advance(end + 2)
        self._length = length
        self._state = _State.BULK_BODY
        self._skipping = self._index >= self._keep or (
            self._index == 0 and length > self._max_name and self._keep_fn is not None
        )
        if not self._skipping and self._keep == KEEP_ALL and self._keep_fn is not None:
            self._kept += length
            if self._kept > self._max_kept:
                raise KeptTooLong(f"ERR Protocol error: {self._max_kept} bytes of arguments kept at most")
        self._length += 2  # Redis skips the two bytes after a bulk without looking at them
        return None

    def _read_bulks(self) -> Request | NeedData:
        # One loop for all the bulks of a request: this is the hot path for every real client.
        buf = self._buf
        while True:
            if self._state is _State.BULK_HEADER and self._read_length() is NEED_DATA:
                return NEED_DATA
            pos = self._pos
            if self._skipping:
                # Counted off as it comes: nothing of a body nobody asked for is held.
                taken = min(self._length, len(buf) - pos)
                self._length -= taken
                self._advance(pos + taken)
                if self._length:
                    if self._index == 0:
                        self._passing = True  # a name this long is nobody's
                    return NEED_DATA
            else:
                stop = pos + self._length - 2
                if len(buf) < stop + 2:
                    return NEED_DATA
                if stop - pos < _BIG_ARG:
                    self._args.append(bytes(buf[pos:stop]))
                else:
                    with memoryview(buf) as view:  # one copy, and no view left to block the next resize
                        self._args.append(bytes(view[pos:stop]))
                self._advance(stop + 2)
            if self._index == 0 and self._keep_fn is not None:
                self._keep = self._keep_fn(self._args[0]) if self._args else 1
                self._passing = self._keep != KEEP_ALL
            self._index += 1
            self._remaining -= 1
            if not self._remaining:
                break
            self._state = _State.BULK_HEADER
        args, self._args = tuple(self._args), []
        self._state = _State.REQUEST
        self._passing = False
        return Request(args, self._start, self.offset, False, self._count)

    def _read_inline_run(self) -> Request | None:
        """Streaming mode: a run of whole, plain inline lines (no quotes, no NUL) whose names
        ``keep`` is not interested in, as one :class:`Request` with no arguments (``count`` 0).
        None when the next line is not such a line (it is then parsed on its own)."""
        buf, pos = self._buf, self._pos
        last = buf.rfind(b"\n", pos)
        if last < 0:
            return None
        region = bytes(buf[pos : last + 1])
        if b"\n*" in region or b"\0" in region or _QUOTED.search(region) is not None:
            return None
        keep, stop = self._keep_fn, 0
        assert keep is not None
        for line in region.split(b"\n")[:-1]:
            args = line.split()
            if args and keep(args[0]) != 1:
                break
            stop += len(line) + 1
        if not stop:
            return None
        self._advance(pos + stop)
        return Request((), self._start, self.offset, True, 0)

    def _read_inline(self) -> Request | None | NeedData:
        if self._keep_fn is not None and not self._stuck and len(self._buf) - self._pos > self._max_inline:
            if self._buf.find(b"\n", self._pos) < 0 and self._buf.find(b"\0", self._pos) < 0:
                # Streaming: a line this long is nobody's we look at; pass it on as it comes and let
                # Redis apply its own limit to the bytes as they reach it.
                self._state = _State.INLINE_PASS
                return self._pass_inline()
        end = self._line_end(b"\n", _TOO_BIG_INLINE)
        if end < 0:
            return NEED_DATA
        stop = end - 1 if end > self._pos and self._buf[end - 1] == 0x0D else end
        args = split_args(bytes(self._buf[self._pos : stop]))
        self._advance(end + 1)
        if not args:
            return None
        return Request(tuple(args), self._start, self.offset, True)


    def _pass_inline(self) -> Request | NeedData:
        """INLINE_PASS: consume up to the line's newline; the line comes back with no arguments."""
        end = self._buf.find(b"\n", self._pos)
        if end < 0:
            self._advance(len(self._buf))
            return NEED_DATA
        self._advance(end + 1)
        self._state = _State.REQUEST
        return Request((), self._start, self.offset, True, 0)


def _as_reply_char(byte: int) -> str:
    # Redis formats the byte with %c and then, so as not to break the reply line, turns CR and LF
    # into spaces (addReplyErrorFormat). Every other byte, printable or not, is echoed raw.
    return " " if byte in (0x0D, 0x0A) else chr(byte)


# C isspace() in the "C" locale: Redis only sets LC_COLLATE, so bytes >= 0x80 are never blanks.
_BLANKS = frozenset(b" \t\n\r\v\f")
# An unquoted argument ends at these only: \v and \f skip as blanks between arguments, but inside
# one they are ordinary bytes (sdssplitargs' switch lists just these four, and NUL).
_BARE_ENDS = frozenset(b" \n\r\t")
_QUOTED = re.compile(rb"[\"'\x0b\x0c]")
_ESCAPES = {ord("n"): 0x0A, ord("r"): 0x0D, ord("t"): 0x09, ord("b"): 0x08, ord("a"): 0x07}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_BACKSLASH, _DQUOTE, _SQUOTE = 0x5C, 0x22, 0x27


class _Quote(enum.Enum):
    NONE = enum.auto()
    DOUBLE = enum.auto()
    SINGLE = enum.auto()


def split_args(line: bytes) -> list[bytes]:
    """Redis's ``sdssplitargs``: the arguments of an inline request or a ``redis.conf`` line (the
    rules are in the module docstring). Raises :class:`UnbalancedQuotes` where Redis refuses it.

    A NUL is taken as an ordinary byte: Redis would stop at it (a C string), so the caller must
    not pass one where that matters (the parser never does: see ``_line_end``).
    """
    if _QUOTED.search(line) is None:
        # Without quotes (and \v \f, which only separate between arguments) the split is exactly
        # bytes.split(): blanks are C isspace() in the "C" locale.
        return line.split()
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
            raise UnbalancedQuotes(closed=False)
        elif (c == _DQUOTE and quote is _Quote.DOUBLE) or (c == _SQUOTE and quote is _Quote.SINGLE):
            if i + 1 < n and line[i + 1] not in _BLANKS:
                raise UnbalancedQuotes(closed=True)
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


__all__ = ["KEEP_ALL", "KeptTooLong", "Request", "RequestParser", "UnbalancedQuotes", "split_args"]
