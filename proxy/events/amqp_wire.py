"""The one module that reaches into aiormq: a confirm-mode channel whose frames we write ourselves.

aiormq does the connection work (handshake, login, heartbeats, ``channel.open``,
``confirm.select``, reading and parsing frames). The publisher writes pre-encoded ``basic.publish``
frames straight to the socket and gets the broker's answers as plain calls. The interface::

    listener = LinkListener(on_confirm, on_return, on_closed)
    link = await open_link(url, listener, timeout)  # raises BrokerError (code 3, 4 or 5)
    link.write(frames)         # whole frames for channel CHANNEL, written now, never awaited
    link.buffered              # bytes waiting in the socket (the caller's back-pressure signal)
    link.last_rx               # loop time the broker last sent a byte, heartbeats included
    link.frame_max             # the negotiated frame size, for the frame encoder
    link.abort()               # drop the connection now
    await link.close(timeout)  # Connection.Close handshake (up to timeout), then drop

    listener.on_confirm(delivery_tag, multiple, nack)   # basic.ack / basic.nack
    listener.on_return(message_id, reply_code, reply_text)  # basic.return, before its ack
    listener.on_closed(reason)  # the connection or the channel closed; at most once

No listener call happens after ``abort()``, ``close()`` or ``on_closed``: the caller forgets the
link and opens a new one. Delivery tags count from 1 on every link.

What this relies on in aiormq. Checked against aiormq 7.2.4, the only release in the pinned
range ``>=7.2.4,<7.3``, by the contract test ``tests/e2e/test_amqp_wire.py``; the same names
are in the source of 6.9.4, 7.1.6 and 7.2.3 (read, not run). :func:`check_aiormq` runs at
import and raises :class:`~proxy.events.errors.AiormqIncompatible` when a private name is gone.

Private (checked at import):

- ``Channel._on_confirm_frame(frame)``: coroutine that ``Channel._reader`` awaits for each
  ``basic.ack``/``basic.nack``; overridden, so no per-message future is made.
- ``Channel._on_return_frame(frame)``: the same for ``basic.return``; overridden.
- ``Channel._get_frame()``: the next frame of the channel (the content header of a return).
- ``Channel._read_content(frame, header)``: reads the body frames into a ``DeliveredMessage``.
- ``Connection._reader_task``: cancelled before an abort, else aiormq logs the EOF we cause
  as a traceback (only log noise if it goes: the abort works without it).

Public, but used in ways aiormq does not document:

- ``Connection.channels[number] = channel``: registers our ``Channel`` subclass
  (``Connection.channel()`` always builds a plain ``Channel``).
- ``Connection(url, transport_factory=...)``, ``TransportFactory``: we own the socket, so we
  can write to it and see when the broker last sent anything.
- ``Connection.connection_tune.frame_max``, the ``closing`` futures, logger ``aiormq.connection``.
- Writing beside aiormq's own writer task is safe because it writes each frame (heartbeat,
  ``channel.close``) with one ``write()`` call and we write whole frames too. Our writes do not
  wait for ``connection.unblocked``: a blocked broker shows as confirms that do not come.

Logs: aiormq logs a failed connection attempt ("error when creating transport"), a close by the
broker and the end of its reader as ERROR, or WARNING with a traceback, on ``aiormq.connection``;
the publisher reports each of these itself (``last_error``, with the same exception), once per
distinct reason. :class:`QuietAiormq` drops those levels on that logger and keeps its WARNING lines
without a traceback: connection blocked/unblocked by the broker (with the alarm), connection stuck.
Also dropped: the two other ERROR lines there, an unknown frame on channel 0 and a frame for a
closed channel (neither came up with the broker refusing, cut, black-holed, stalled or closing
the connection). With ``aiormq.connection`` (or the root) at DEBUG, nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, SupportsIndex

import aiormq
from aiormq import spec
from aiormq.abc import ConfirmationFrameType
from yarl import URL

from proxy.events.errors import AiormqIncompatible, BrokerError

__all__ = ["CHANNEL", "ConfirmLink", "LinkListener", "QuietAiormq", "check_aiormq", "open_link"]

CHANNEL = 1  # the one channel of a link
FRAME_BUFFER = 1000  # frames aiormq queues for the channel before its connection reader waits
READ_LIMIT = 1 << 20  # StreamReader limit for the broker's bytes
DISCARD_TIMEOUT = 1.0  # seconds to close a connection that failed to open
ABORT_CLOSE_TIMEOUT = 2.0  # seconds aiormq gets to wind down after an abort

CHECKED_VERSIONS = ("7.2.4",)
_COROUTINES = ("_on_confirm_frame", "_on_return_frame", "_get_frame", "_read_content")
_CONNECTION_ATTRIBUTES = ("_reader_task", "channels", "connection_tune")


def aiormq_version() -> str:
    try:
        return importlib.metadata.version("aiormq")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored copies
        return "unknown"


def check_aiormq(channel: type = aiormq.Channel, connection: type = aiormq.Connection) -> None:
    """Raise :class:`AiormqIncompatible` naming aiormq's version and every private hook of this
    module that ``channel``/``connection`` lack. Runs at import; the arguments are for tests."""
    problems = []
    for name in _COROUTINES:
        method = getattr(channel, name, None)
        if method is None:
            problems.append(f"{channel.__name__}.{name} is gone")
        elif not inspect.iscoroutinefunction(method):
            problems.append(f"{channel.__name__}.{name} is no longer a coroutine function")
    declared = set()
    for klass in connection.__mro__:
        declared.update(vars(klass).get("__annotations__", {}))
    problems += [f"{connection.__name__}.{name} is no longer declared"
                 for name in _CONNECTION_ATTRIBUTES if name not in declared]
    if problems:
        raise AiormqIncompatible(
            f"aiormq {aiormq_version()} does not fit proxy/events/amqp_wire.py (checked with "
            f"aiormq {', '.join(CHECKED_VERSIONS)}): {'; '.join(problems)}. Install a checked "
            f"version, or port the adapter and run tests/e2e/test_amqp_wire.py")


check_aiormq()


class QuietAiormq(logging.Filter):
    """On logger ``aiormq.connection``: drop ERROR and above and records with a traceback (the
    publisher reports those failures); keep the rest; keep everything when that logger is
    enabled for DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and not record.exc_info:
            return True
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


AIORMQ_LOGGER = "aiormq.connection"
if not any(isinstance(f, QuietAiormq) for f in logging.getLogger(AIORMQ_LOGGER).filters):
    logging.getLogger(AIORMQ_LOGGER).addFilter(QuietAiormq())


class LinkListener(NamedTuple):
    """Where a link reports; each is called on the event loop and must not block."""

    on_confirm: Callable[[int, bool, bool], None]  # (delivery_tag, multiple, nack)
    on_return: Callable[[bytes, int, str], None]  # (message_id, reply_code, reply_text)
    on_closed: Callable[[str], None]  # (reason): the connection or the channel closed


class _TimedReader(asyncio.StreamReader):
    """A StreamReader that remembers when the broker last sent anything (heartbeats included)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=READ_LIMIT, loop=loop)
        self._time = loop.time
        self.last_rx = loop.time()

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:  # the stub's type; it gets bytes
        self.last_rx = self._time()
        super().feed_data(data)


class _Transports(aiormq.TransportFactory):
    """Opens the TCP connection for aiormq and keeps the reader and writer for us."""

    def __init__(self) -> None:
        self.reader: _TimedReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        reader = _TimedReader(loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            assert url.host is not None and url.port is not None  # the settings always give both
            transport, _ = await loop.create_connection(lambda: protocol, url.host, url.port)
        except OSError as exc:
            raise aiormq.AMQPConnectionError(*exc.args) from exc
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        self.reader, self.writer = reader, writer
        return reader, writer

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


class _ConfirmChannel(aiormq.Channel):
    """A confirm-mode channel whose acks, nacks and returns go to ``listener``, not to futures."""

    listener: LinkListener | None = None

    async def _on_confirm_frame(self, frame: ConfirmationFrameType) -> None:
        if self.listener is not None:
            # pamqp types delivery_tag as optional; a broker's ack or nack always carries one.
            multiple = bool(getattr(frame, "multiple", False))  # Basic.Reject has no "multiple"
            self.listener.on_confirm(frame.delivery_tag or 0, multiple, isinstance(frame, spec.Basic.Nack))

    async def _on_return_frame(self, frame: spec.Basic.Return) -> None:
        header = await self._get_frame()  # read the content even when nobody listens
        message = await self._read_content(frame, header)  # type: ignore[arg-type]  # aiormq types the header as ContentHeader; _get_frame() is typed as any frame
        if self.listener is not None:
            message_id = message.header.properties.message_id or ""
            self.listener.on_return(message_id.encode(), frame.reply_code or 0, frame.reply_text or "")


_background: set[asyncio.Task[None]] = set()  # closes after an abort, kept until they end


class ConfirmLink:
    """An open connection with channel :data:`CHANNEL` in confirm mode. Made by :func:`open_link`."""

    def __init__(self, conn: aiormq.Connection, channel: _ConfirmChannel, transports: _Transports) -> None:
        assert transports.reader is not None and transports.writer is not None
        self._conn = conn
        self._channel = channel
        self._reader = transports.reader
        self._transports = transports
        self._transport = transports.writer.transport
        self.frame_max: int = conn.connection_tune.frame_max or 131072
        for source in (conn, channel):
            source.closing.add_done_callback(self._on_closing)

    @property
    def buffered(self) -> int:
        return self._transport.get_write_buffer_size()

    @property
    def last_rx(self) -> float:
        return self._reader.last_rx

    def write(self, data: bytes) -> None:
        """Queue whole frames for the socket (``data`` must not end inside a frame)."""
        self._transport.write(data)

    def abort(self) -> None:
        """Drop the connection now (unconfirmed messages stay unconfirmed); no listener call after."""
        self._channel.listener = None
        # Stop aiormq's reader first: it would log the EOF we cause as a traceback.
        reader_task = getattr(self._conn, "_reader_task", None)
        if reader_task is not None:
            reader_task.cancel()
        self._transports.abort()
        task = asyncio.get_running_loop().create_task(self._close_aiormq(ABORT_CLOSE_TIMEOUT))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def close(self, timeout: float) -> None:
        """Close politely within ``timeout`` seconds, then drop the socket; no listener call after."""
        self._channel.listener = None
        await self._close_aiormq(timeout)
        self._transports.abort()

    async def _close_aiormq(self, timeout: float) -> None:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._conn.close(), timeout)

    def _on_closing(self, fut: asyncio.Future[Any]) -> None:
        listener, self._channel.listener = self._channel.listener, None
        if listener is None:
            return
        reason = "closed"
        if not fut.cancelled() and fut.exception() is not None:
            reason = repr(fut.exception())
        listener.on_closed(reason)


async def open_link(url: URL, listener: LinkListener, timeout: float) -> ConfirmLink:
    """Connect, open channel :data:`CHANNEL` in confirm mode, each step within ``timeout``.

    Raises :class:`~proxy.events.errors.BrokerError` (code 3 unreachable or refused, 4 login
    refused, 5 channel failed); the caller retries later. Cancellation aborts the socket.
    """
    transports = _Transports()
    conn = aiormq.Connection(url, transport_factory=transports)
    where = f"{url.host}:{url.port}"
    try:
        await asyncio.wait_for(conn.connect(), timeout)
    except (aiormq.ProbableAuthenticationError, aiormq.AuthenticationError) as exc:
        await _discard(conn, transports)
        raise BrokerError(BrokerError.LOGIN_REFUSED, f"login refused by {where}: {exc}") from None
    except aiormq.ConnectionClosed as exc:
        await _discard(conn, transports)
        code = BrokerError.LOGIN_REFUSED if exc.args and exc.args[0] in (403, 530) else BrokerError.REFUSED
        raise BrokerError(code, f"{where} closed the connection: {exc}") from None
    except asyncio.TimeoutError:
        await _discard(conn, transports)
        raise BrokerError(BrokerError.REFUSED, f"no AMQP handshake from {where} within {timeout}s") from None
    except (aiormq.AMQPError, OSError) as exc:
        await _discard(conn, transports)
        raise BrokerError(BrokerError.REFUSED, f"cannot reach {where}: {exc!r}") from None
    except asyncio.CancelledError:
        transports.abort()
        raise
    try:
        channel = _ConfirmChannel(conn, CHANNEL, publisher_confirms=True, frame_buffer=FRAME_BUFFER,
                                  on_return_raises=False)
        channel.listener = listener
        conn.channels[CHANNEL] = channel
        await asyncio.wait_for(channel.open(), timeout)
    except (aiormq.AMQPError, OSError, asyncio.TimeoutError, RuntimeError) as exc:
        await _discard(conn, transports)
        raise BrokerError(BrokerError.CHANNEL_FAILED, f"channel open failed on {where}: {exc!r}") from None
    except asyncio.CancelledError:
        transports.abort()
        raise
    return ConfirmLink(conn, channel, transports)


async def _discard(conn: aiormq.Connection, transports: _Transports) -> None:
    transports.abort()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(conn.close(), DISCARD_TIMEOUT)
