"""The one module that reaches into aiormq: a confirm-mode channel whose frames we write ourselves.

aiormq does the connection work (handshake, login, heartbeats, ``channel.open``,
``confirm.select``, reading and parsing frames). The publisher writes pre-encoded ``basic.publish``
frames straight to the socket and gets the broker's answers as plain calls. The interface::

    listener = LinkListener(on_confirm, on_return, on_closed)
    link = await open_link(url, listener, timeout, vhost=..., exchange=..., tls=..., server_name=...)
                               # raises BrokerError (code 3, 4 or 5) with a readable reason
    link.write(frames)         # whole frames for channel CHANNEL, written now, never awaited
    link.buffered              # bytes waiting in the socket (the caller's back-pressure signal)
    link.last_rx               # loop time the broker last sent a byte, heartbeats included
    link.frame_max             # the negotiated frame size, for the frame encoder
    link.server                # "RabbitMQ 3.10.8", link.cluster_name: from the broker's properties
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
import re
import ssl
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, SupportsIndex

import aiormq
import pamqp.frame
from aiormq import spec
from aiormq.abc import ConfirmationFrameType
from yarl import URL

from proxy.events.errors import AiormqIncompatible, BrokerError

__all__ = ["CHANNEL", "ConfirmLink", "LinkListener", "QuietAiormq", "check_aiormq", "open_link"]

CHANNEL = 1  # the one channel of a link
FRAME_BUFFER = 1000  # frames aiormq queues for the channel before its connection reader waits
READ_LIMIT = 1 << 20  # StreamReader limit for the broker's bytes
HANDSHAKE_RECORD = 64 * 1024  # bytes of the broker's handshake kept to read a Connection.Close
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
    """A StreamReader that remembers when the broker last sent anything (heartbeats included),
    and keeps the handshake's bytes (until :attr:`handshake` is set to None): aiormq reports a
    ``Connection.Close`` answering ``Connection.Open`` as an "unexpected frame", without its code."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=READ_LIMIT, loop=loop)
        self._time = loop.time
        self.last_rx = loop.time()
        self.handshake: bytearray | None = bytearray()

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:  # the stub's type; it gets bytes
        self.last_rx = self._time()
        if self.handshake is not None and len(self.handshake) < HANDSHAKE_RECORD:
            self.handshake += data  # type: ignore[arg-type]  # bytes, whatever the stub says
        super().feed_data(data)


class _Unreachable(Exception):
    """The TCP connection or the TLS handshake failed; ``reason`` says why, readably."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Transports(aiormq.TransportFactory):
    """Opens the TCP (or TLS) connection for aiormq and keeps the reader and writer for us."""

    def __init__(self, tls: ssl.SSLContext | None = None, server_name: str | None = None) -> None:
        self.tls = tls
        self.server_name = server_name
        self.reader: _TimedReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        reader = _TimedReader(loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        assert url.host is not None and url.port is not None  # the settings always give both
        try:
            transport, _ = await loop.create_connection(
                lambda: protocol, url.host, url.port, ssl=self.tls,
                server_hostname=(self.server_name or url.host) if self.tls else None)
        except ssl.SSLCertVerificationError as exc:
            raise _Unreachable(f"TLS: the broker's certificate is not trusted: {exc.verify_message} "
                               "(check --amqp-tls-ca and --amqp-tls-server-name)") from None
        except ssl.SSLError as exc:
            raise _Unreachable(f"TLS handshake failed: {_ssl_reason(exc)}") from None
        except OSError as exc:
            raise _Unreachable(exc.strerror or describe(exc)) from None
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
        properties = conn.server_properties or {}
        self.server = f"{_text(properties.get('product')) or 'AMQP broker'} {_text(properties.get('version'))}".strip()
        self.cluster_name = _text(properties.get("cluster_name"))
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
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            reason = describe(exc)
        listener.on_closed(reason)


async def open_link(url: URL, listener: LinkListener, timeout: float, *, vhost: str = "/",
                    exchange: str = "", tls: ssl.SSLContext | None = None,
                    server_name: str | None = None) -> ConfirmLink:
    """Connect (over TLS with ``tls``), log in to ``vhost``, open channel :data:`CHANNEL` in
    confirm mode and check that ``exchange`` exists (a passive declare; not for the default
    exchange ``""``, which always does), each step within ``timeout``.

    Raises :class:`~proxy.events.errors.BrokerError`, its reason one readable line naming the node:
    code 3 unreachable, refused or a failed TLS handshake; 4 login or vhost refused; 5 channel
    failed or exchange missing. The caller retries later. Cancellation aborts the socket.
    """
    transports = _Transports(tls, server_name)
    conn = aiormq.Connection(url, transport_factory=transports)
    conn.vhost = vhost  # as given: aiormq would read it back from the URL's path
    where = _where(url)
    try:
        await asyncio.wait_for(conn.connect(), timeout)
    except asyncio.CancelledError:
        transports.abort()
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a BrokerError with a reason
        await _discard(conn, transports)
        handshake = transports.reader.handshake if transports.reader is not None else None
        raise _connect_failure(exc, bytes(handshake or b""), where, vhost, timeout, tls is not None) from None
    if transports.reader is not None:
        transports.reader.handshake = None
    try:
        channel = _ConfirmChannel(conn, CHANNEL, publisher_confirms=True, frame_buffer=FRAME_BUFFER,
                                  on_return_raises=False)
        channel.listener = listener
        conn.channels[CHANNEL] = channel
        await asyncio.wait_for(channel.open(), timeout)
    except (aiormq.AMQPError, OSError, asyncio.TimeoutError, RuntimeError) as exc:
        await _discard(conn, transports)
        raise BrokerError(BrokerError.CHANNEL_FAILED, f"channel open failed on {where}: {describe(exc)}") from None
    except asyncio.CancelledError:
        transports.abort()
        raise
    if exchange:
        await _check_exchange(conn, channel, transports, exchange, where, vhost, timeout)
    return ConfirmLink(conn, channel, transports)


async def _check_exchange(conn: aiormq.Connection, channel: aiormq.Channel, transports: _Transports,
                          exchange: str, where: str, vhost: str, timeout: float) -> None:
    """A passive declare: the broker closes the channel (404) when the exchange is missing."""
    try:
        await asyncio.wait_for(channel.exchange_declare(exchange, passive=True), timeout)
    except asyncio.CancelledError:
        transports.abort()
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a BrokerError with a reason
        await _discard(conn, transports)
        if isinstance(exc, aiormq.ChannelNotFoundEntity):
            reason = f"exchange {exchange!r} does not exist in vhost {vhost!r} on {where}"
        else:
            reason = f"cannot check exchange {exchange!r} on {where}: {describe(exc)}"
        raise BrokerError(BrokerError.CHANNEL_FAILED, reason) from None


def _connect_failure(exc: BaseException, handshake: bytes, where: str, vhost: str, timeout: float,
                     tls: bool) -> BrokerError:
    """What a failed connect means, by the broker's own Connection.Close when it sent one."""
    close = _close_frame(handshake)
    if close is not None:
        code, text = close
        if code == 403:  # ACCESS_REFUSED: user or password
            return BrokerError(BrokerError.LOGIN_REFUSED, f"login refused by {where}: {text}")
        if code == 530:  # NOT_ALLOWED: no such vhost, or the user may not use it
            return BrokerError(BrokerError.LOGIN_REFUSED, f"vhost {vhost!r} refused by {where}: {text}")
        return BrokerError(BrokerError.REFUSED, f"{where} refused the connection: {code} {text}")
    if isinstance(exc, _Unreachable):
        return BrokerError(BrokerError.REFUSED, f"cannot reach {where}: {exc.reason}")
    if isinstance(exc, asyncio.TimeoutError):
        return BrokerError(BrokerError.REFUSED, f"no AMQP handshake from {where} within {timeout}s")
    if isinstance(exc, (aiormq.ProbableAuthenticationError, aiormq.AuthenticationError)):
        return BrokerError(BrokerError.LOGIN_REFUSED, f"login refused by {where}: {describe(exc)}")
    if isinstance(exc, (aiormq.IncompatibleProtocolError, EOFError, ConnectionError, ssl.SSLError)):
        hint = " (is a client certificate required?)" if tls else " (an AMQP port? TLS expected?)"
        return BrokerError(BrokerError.REFUSED, f"{where} closed the connection during the AMQP "
                           f"handshake{hint}: {describe(exc)}")
    return BrokerError(BrokerError.REFUSED, f"cannot connect to {where}: {describe(exc)}")


def _close_frame(data: bytes) -> tuple[int, str] | None:
    """The reply code and text of the first ``Connection.Close`` in the broker's bytes, if any."""
    offset = 0
    while offset < len(data):
        try:
            consumed, _, frame = pamqp.frame.unmarshal(data[offset:])
        except Exception:  # noqa: BLE001 - incomplete or not AMQP: no Close to find
            return None
        if isinstance(frame, spec.Connection.Close):
            return frame.reply_code or 0, frame.reply_text or ""
        if consumed <= 0:
            return None
        offset += consumed
    return None


_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def describe(exc: BaseException) -> str:
    """One readable line for a failure: the broker's own words for a close (``NOT_FOUND - no
    exchange 'x' in vhost '/'``), the system's for a socket error; never a Python repr."""
    if isinstance(exc, _Unreachable):
        return exc.reason
    if isinstance(exc, aiormq.AMQPConnectionError) and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__  # aiormq wraps a socket error in a repr of it
    if isinstance(exc, ssl.SSLError):
        return _ssl_reason(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    words = [str(a) for a in exc.args if isinstance(a, (str, int)) and str(a)]
    text = " ".join(words) if words else type(exc).__name__
    if isinstance(exc, (asyncio.TimeoutError, EOFError)) and not words:
        text = "timed out" if isinstance(exc, asyncio.TimeoutError) else "connection closed"
    return _OBJECT_REPR.sub(r"\1", text)


def _ssl_reason(exc: ssl.SSLError) -> str:
    # ssl's own errors carry these; getattr for one made by hand (tests, other libraries)
    verify_message = getattr(exc, "verify_message", None)
    if verify_message:
        return f"certificate verify failed: {verify_message}"
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    return _OBJECT_REPR.sub(r"\1", exc.strerror or type(exc).__name__)


def _text(value: object) -> str:
    """A server property as text (a field table may hold bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _where(url: URL) -> str:
    host = url.host or "?"
    return f"[{host}]:{url.port}" if ":" in host else f"{host}:{url.port}"


async def _discard(conn: aiormq.Connection, transports: _Transports) -> None:
    transports.abort()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(conn.close(), DISCARD_TIMEOUT)
