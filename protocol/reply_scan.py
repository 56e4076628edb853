"""Frame what Redis sends (RESP2 and RESP3) without decoding it.

Sans-IO. :class:`ReplyScanner` takes reply bytes and hands back each complete top-level frame as
the exact bytes Redis sent: never re-encoded (a decoded ``+OK`` and ``$2\\r\\nOK`` look alike, and
a proxy must not change one into the other). A frame says whether it is an error (with its text,
so ``-MOVED 3999 127.0.0.1:7002`` and ``-ASK ...`` can be spotted) and whether it is a RESP3 push
(``>``), which answers no command. A RESP3 attribute (``|``) is part of the frame that follows it.

Use::

    scanner.feed(data)
    while (frame := scanner.next_frame()) is not NEED_DATA:
        handle(frame)
    # ReplyError: the server sent what RESP does not allow, or a frame above the limit: close.

Exception tree: :class:`ReplyError` derives from :class:`protocol.errors.Error`.

Limit (a security limit on what one upstream connection can make us hold): ``max_frame`` bytes for
one unfinished frame (default 512 MiB + 1 MiB: Redis's largest string plus its framing). Past it
:meth:`ReplyScanner.next_frame` raises :class:`ReplyError`; the caller closes that connection.
Scanning resumes where it stopped, so a large frame arriving in many chunks is scanned once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from protocol.errors import NEED_DATA, Error, NeedData

DEFAULT_MAX_FRAME: Final = 512 * 1024 * 1024 + 1024 * 1024
#: Header lines (`$123`, `*4`, an error's text) longer than this are refused unless complete.
MAX_LINE: Final = 64 * 1024 * 1024

_LINE_TYPES = frozenset(b"+-:_#,(")  # the frame is one line
_BLOB_TYPES = frozenset(b"$=!")  # a length, then that many bytes and CRLF
_AGGREGATES = {ord("*"): 1, ord("~"): 1, ord(">"): 1, ord("%"): 2, ord("|"): 2}
_MINUS, _PUSH, _BLOB_ERROR, _ATTRIBUTE = ord("-"), ord(">"), ord("!"), ord("|")


class ReplyError(Error):
    """The upstream sent bytes that are not RESP, or a frame larger than the limit: close it."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete top-level reply, as sent."""

    raw: bytes
    error: bool = False  # `-...` or `!...`
    push: bool = False  # `>...`: out of band, answers no command

    @property
    def error_text(self) -> bytes:
        """``MOVED 3999 127.0.0.1:7002`` for ``-MOVED 3999 127.0.0.1:7002\\r\\n``; ``b""`` if no error."""
        if not self.error:
            return b""
        if self.raw[:1] == b"-":
            return self.raw[1:-2]
        header_end = self.raw.index(b"\r\n")
        return self.raw[header_end + 2:-2]


class ReplyScanner:
    """Splits a reply stream into :class:`Frame` values; see the module docstring."""

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._max_frame = max_frame
        self._buf = bytearray()
        self._start = 0  # where the current frame begins in _buf
        self._pos = 0  # where scanning resumes
        self._stack: list[int] = []  # elements still owed by each open aggregate
        self._dead: ReplyError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held and not yet returned in a frame."""
        return len(self._buf) - self._start

    def feed(self, data: bytes) -> None:
        if self._start:
            del self._buf[:self._start]
            self._pos -= self._start
            self._start = 0
        self._buf += data

    def next_frame(self) -> Frame | NeedData:
        """The next complete frame, or ``NEED_DATA``: feed more bytes, then ask again."""
        if self._dead is not None:
            raise self._dead
        buf = self._buf
        pos = self._pos
        stack = self._stack
        size = len(buf)
        while True:
            if pos >= size:
                return self._need(pos)
            kind = buf[pos]
            line_end = buf.find(b"\r\n", pos + 1)
            if line_end < 0:
                if size - pos > MAX_LINE:
                    self._fail("a reply line without its end")
                return self._need(pos)
            if kind in _LINE_TYPES:
                pos = line_end + 2
                done = True
            elif kind in _BLOB_TYPES:
                length = self._number(buf, pos, line_end)
                if length < 0:
                    if length != -1 or kind != 36:  # only `$-1` is a null blob
                        self._fail("a negative length")
                    pos = line_end + 2
                else:
                    end = line_end + 2 + length + 2
                    if end > size:
                        return self._need(pos)
                    if buf[end - 2:end] != b"\r\n":
                        self._fail("a blob not followed by CRLF")
                    pos = end
                done = True
            elif kind in _AGGREGATES:
                count = self._number(buf, pos, line_end)
                pos = line_end + 2
                if count < -1:
                    self._fail("a negative count")
                owed = max(count, 0) * _AGGREGATES[kind]
                if kind == _ATTRIBUTE:
                    owed += 1  # the attribute's pairs, then the reply they describe
                if owed:
                    stack.append(owed)
                    done = False
                else:
                    done = True
            else:
                self._fail(f"a frame starting with byte {kind}")
            if done:
                while stack:
                    stack[-1] -= 1
                    if stack[-1]:
                        break
                    stack.pop()
            if not stack:
                return self._emit(pos)

    def _emit(self, end: int) -> Frame:
        buf = self._buf
        start = self._start
        raw = bytes(buf[start:end])
        self._start = self._pos = end
        first = raw[0]
        if first == _ATTRIBUTE:
            first = _first_after_attribute(raw)
        if first == _MINUS or first == _BLOB_ERROR:
            return Frame(raw, error=True)
        if first == _PUSH:
            return Frame(raw, push=True)
        return Frame(raw)

    def _need(self, pos: int) -> NeedData:
        # Resume at the start of the element that was incomplete (the stack counts only
        # elements already complete, so nothing is counted twice).
        self._pos = pos
        if len(self._buf) - self._start > self._max_frame:
            self._fail(f"a reply frame above the limit of {self._max_frame} bytes")
        return NEED_DATA

    def _number(self, buf: bytearray, pos: int, line_end: int) -> int:
        text = bytes(buf[pos + 1:line_end])
        try:
            return int(text)
        except ValueError:
            self._fail(f"a bad length {text[:20]!r}")
            raise  # pragma: no cover - _fail raises

    def _fail(self, what: str) -> None:
        self._dead = ReplyError(f"protocol error from Redis: {what}")
        raise self._dead


def _first_after_attribute(raw: bytes) -> int:
    """The type byte of the reply an attribute frame describes."""
    scanner = ReplyScanner()
    # Skip the attribute: frame its pairs one by one from just past the header.
    header_end = raw.index(b"\r\n")
    pairs = int(raw[1:header_end])
    scanner.feed(raw[header_end + 2:])
    for _ in range(2 * pairs):
        scanner.next_frame()
    return raw[header_end + 2 + (len(raw) - header_end - 2 - scanner.buffered)]


def split_aggregate(raw: bytes) -> tuple[bytes, list[bytes]]:
    """``(header, elements)`` of one complete aggregate frame (``*``, ``~``, ``%``, ``>``): each
    element as its raw bytes. For merging replies of split commands; raises ReplyError if ``raw``
    is not exactly one aggregate."""
    header_end = raw.find(b"\r\n")
    if raw[:1] not in (b"*", b"~", b"%", b">") or header_end < 0:
        raise ReplyError("not an aggregate frame")
    count = int(raw[1:header_end])
    if raw[:1] == b"%":
        count *= 2
    scanner = ReplyScanner()
    scanner.feed(raw[header_end + 2:])
    elements = []
    for _ in range(max(count, 0)):
        frame = scanner.next_frame()
        if frame is NEED_DATA:
            raise ReplyError("an aggregate frame cut short")
        elements.append(frame.raw)
    if scanner.buffered:
        raise ReplyError("bytes after an aggregate frame")
    return raw[:header_end + 2], elements
