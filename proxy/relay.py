"""One client connection and its own upstream Redis connection.

Strategy: bytes go through untouched, both ways. Each client chunk is fed to a hiredis reader,
which splits it into commands in C; the relay adds up their canonical sizes (so it always knows
where the current command began) and looks only at the few names in
:data:`protocol.commands.NOTICED`. Redis's replies are not parsed at all.

A ``key_evt_amqp.*`` command is cut out of the stream and the client's later input is held. Its
reply must come after Redis's replies to everything sent before it: the :class:`admin.Barrier`
sends two commands of its own behind those (an authority probe and a marker whose reply is unique),
waits until the reply stream ends with the marker's reply, cuts both replies off, and only then
writes ours and releases the held input. Redis itself orders the replies; nothing is counted.

Rules (break one and replies go out of order):
1. Bytes reach Redis only once the relay knows they are not part of one of our commands. A chunk
   that ends inside a command whose name is not yet readable keeps that tail in ``_carry``.
2. Once Redis may send frames that answer no command (pub/sub, MONITOR, CLIENT REPLY/TRACKING),
   or the stream cannot be followed, the connection is a plain pipe (:attr:`Mode.PIPE`) for the
   rest of its life: our commands are relayed too, and Redis refuses them in place as unknown.
3. Client reading is paused for named reasons (:class:`Pause`) and resumes when none is left;
   what a transport delivers while paused is kept in ``_held`` (at most one read per pause).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import TYPE_CHECKING

import hiredis

from protocol import NEED_DATA, ProtocolError, RequestParser, framing, replies
from protocol.commands import NOTICED, Effect, effect_of, hello_version
from protocol.framing import SMALL_DIGITS, digits
from proxy import admin

if TYPE_CHECKING:
    from proxy.server import Server

log = logging.getLogger("key_evt_amqp.relay")

#: One of our commands longer than this is refused and the client closed (rule 1 holds it).
MAX_ADMIN_BYTES = 64 * 1024


class Mode(enum.Enum):
    FAST = "fast"  # hiredis splits multibulk commands
    EXACT = "exact"  # the pure-Python parser (inline commands, input hiredis cannot vouch for)
    PIPE = "pipe"  # bytes only (rule 2)
    CLOSING = "closing"


class Pause(enum.Enum):
    CONNECTING = "connecting"  # the upstream connection is not open yet
    UPSTREAM_FULL = "upstream-full"  # its write buffer is above the high-water mark
    BARRIER = "barrier"  # one of our commands waits for its place
    SHUTDOWN = "shutdown"


class ClientConnection(asyncio.Protocol):
    """The client side. Owns the upstream connection it opens when the client connects."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamConnection | None = None
        self.mode = Mode.FAST
        self.in_multi = False
        self.resp3 = False
        self.quitting = False
        self.barrier: admin.Barrier | None = None
        self._commands = hiredis.Reader(notEnoughData=NEED_DATA)
        self._exact: RequestParser | None = None
        self._exact_buf = bytearray()  # EXACT mode: bytes fed to the parser, not yet relayed
        self._exact_base = 0  # absolute stream offset of _exact_buf[0]
        self._carry = b""  # client bytes parsed but not relayed yet (rule 1)
        self._pending = 0  # bytes of the unfinished command seen so far, carry included
        self._held: list[bytes] = []
        self._pauses: set[Pause] = set()
        self._up_write = _nowhere  # the upstream transport's write, once connected

    # -- lifecycle -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=self.server.buffer_limit)  # type: ignore[union-attr]
        if not self.server.admit(self):
            self._fail("ERR max number of clients reached")
            return
        self._pause(Pause.CONNECTING)
        self.server.spawn(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        address = self.server.upstream_address
        loop = asyncio.get_running_loop()
        try:
            transport, upstream = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self), address.host, address.port),
                timeout=self.server.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
            log.warning("cannot reach Redis at %s:%s: %s", address.host, address.port, reason)
            self._fail(f"ERR key-evt-amqp: cannot reach Redis ({reason})")
            return
        if self.mode is Mode.CLOSING:
            transport.close()
            return
        self.upstream = upstream
        self._up_write = transport.write
        self._resume(Pause.CONNECTING)

    def connection_lost(self, exc: Exception | None) -> None:
        self.mode = Mode.CLOSING
        self.server.forget(self)
        if self.barrier is not None:
            self.barrier.cancel()
        if self.upstream is not None:
            self.upstream.close()  # close() flushes what the client sent before it left

    def upstream_lost(self) -> None:
        """Redis closed our connection: the client learns it, unless it asked for it (QUIT)."""
        if self.mode is Mode.CLOSING:
            return
        if self.barrier is not None:
            self.barrier.flush()
        self._fail(None if self.quitting else "ERR key-evt-amqp: lost the connection to Redis")

    def _fail(self, message: str | None) -> None:
        self.mode = Mode.CLOSING
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if message is not None:
                transport.write(replies.error(message))
            transport.close()

    # -- flow control (rule 3) -----------------------------------------------------------------

    def _pause(self, reason: Pause) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pause_reading()
        self._pauses.add(reason)

    def _resume(self, reason: Pause) -> None:
        self._pauses.discard(reason)
        self._continue()

    def _continue(self) -> None:
        """No pause left: process what was held back, then read again."""
        transport = self.transport
        while self._held and not self._pauses and self.mode is not Mode.CLOSING:
            self.data_received(self._held.pop(0))
        if not self._pauses and transport is not None and not transport.is_closing():
            transport.resume_reading()

    def pause_writing(self) -> None:
        # The client reads slower than Redis answers: stop reading Redis.
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def upstream_full(self, full: bool) -> None:
        """Redis reads slower than the client writes: stop reading the client, and back."""
        if full:
            self._pause(Pause.UPSTREAM_FULL)
        else:
            self._resume(Pause.UPSTREAM_FULL)

    # -- client -> Redis -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._pauses:
            self._held.append(data)  # delivered after pause_reading(): keep it for later
        elif self.mode is Mode.FAST:
            self._fast(data)
        elif self.mode is Mode.PIPE:
            self._up_write(data)
        elif self.mode is Mode.EXACT:
            self._exact_feed(data)

    def _fast(self, data: bytes) -> None:
        reader = self._commands
        reader.feed(data)
        gets = reader.gets
        commands = []
        append = commands.append
        noticed = False
        size = 0  # canonical size of the complete commands: where the last one ends
        try:
            while (command := gets()) is not NEED_DATA:
                append(command)
                if command.__class__ is not list:
                    if command is not None:
                        raise TypeError("a request that is not a multibulk")
                    size += 5  # `*-1\r\n`
                    continue
                n = len(command)
                size += 3 + (SMALL_DIGITS[n] if n < 10_000 else digits(n))
                for arg in command:
                    n = len(arg)
                    size += 5 + (SMALL_DIGITS[n] if n < 10_000 else digits(n)) + n
                if command and command[0].lower() in NOTICED:
                    noticed = True
        except (hiredis.ProtocolError, TypeError, AttributeError):
            # Inline commands, garbage, or elements that are not bulk strings.
            self._anomaly(data)
            return
        pending = self._pending + len(data) - size
        if pending < 0:
            self._anomaly(data)  # the sizes do not add up: not canonical, let the parser judge
            return
        if not noticed and not self._carry and (
            pending == 0 or pending > len(data) or not framing.holds_back(data[-pending:])
        ):
            # The common case: nothing to look at, nothing to keep back.
            self._pending = pending
            self._up_write(data)
            return
        self._careful(data, commands)

    def _careful(self, data: bytes, commands: list[object]) -> None:
        """Place each command in the chunk, act on the noticed ones, keep unvetted tails."""
        carry = self._carry
        stream = carry + data if carry else data
        plan = framing.place(stream, commands, self._pending - len(carry))
        if plan is None:
            self._anomaly(data)
            return
        for command, start, end in plan.commands:
            effect = _effect(command)
            if effect is Effect.ADMIN and self.mode is not Mode.PIPE:
                self._write_upstream(stream[:start])
                self._commands = hiredis.Reader(notEnoughData=NEED_DATA)
                self._carry, self._pending = b"", 0
                if end < len(stream):
                    self._held.insert(0, stream[end:])
                self._start_barrier(command)  # type: ignore[arg-type]
                return
            self._apply(effect, command)
        if self.mode is Mode.PIPE:
            self._write_upstream(stream)
            self._carry, self._pending = b"", 0
            return
        self._write_upstream(stream[:plan.relay_until])
        self._carry = stream[plan.relay_until:]
        ended = plan.commands[-1][2] if plan.commands else len(carry) - self._pending
        self._pending = len(stream) - ended
        if len(self._carry) > MAX_ADMIN_BYTES:
            self._refuse_and_close("ERR Protocol error: key_evt_amqp command too long")

    def _apply(self, effect: Effect | None, command: object) -> None:
        """Book-keeping for one command that is relayed (the caller relays its bytes)."""
        if effect is None:
            return
        if effect is Effect.UNCOUNTABLE or effect is Effect.ADMIN:
            self._become_pipe()
        elif effect is Effect.MULTI:
            self.in_multi = True
        elif effect is Effect.END_MULTI:
            self.in_multi = False
        elif effect is Effect.RESET:
            self.in_multi = self.resp3 = False
        elif effect is Effect.HELLO:
            version = hello_version(command)  # type: ignore[arg-type]
            if version in (2, 3):
                self.resp3 = version == 3
        elif effect is Effect.QUIT:
            self.quitting = True

    def _write_upstream(self, data: bytes) -> None:
        if data:
            self._up_write(data)

    def _become_pipe(self) -> None:
        if self.mode is not Mode.CLOSING:
            self.mode = Mode.PIPE

    def _anomaly(self, data: bytes) -> None:
        """hiredis refused the input or it is not canonical: the exact parser judges it."""
        stream = self._carry + data
        if self._pending > len(self._carry):
            # Part of the current command already reached Redis: Redis must judge it itself.
            log.debug("client input cannot be re-parsed from a boundary; relaying it as a pipe")
            self._write_upstream(stream)
            self._carry = b""
            self._become_pipe()
            return
        self._carry, self._pending = b"", 0
        self.mode = Mode.EXACT
        self._exact = RequestParser()
        self._exact_buf = bytearray()
        self._exact_base = 0
        self._exact_feed(stream)

    # -- EXACT mode: the pure-Python parser ------------------------------------------------------

    def _exact_feed(self, data: bytes) -> None:
        self._exact.feed(data)  # type: ignore[union-attr]
        self._exact_buf += data
        self._exact_resume()

    def _exact_take(self, until: int) -> bytes:
        """Remove and return the buffered bytes up to absolute offset ``until``."""
        cut = until - self._exact_base
        chunk = bytes(self._exact_buf[:cut])
        del self._exact_buf[:cut]
        self._exact_base = until
        return chunk

    def _exact_resume(self) -> None:
        parser = self._exact
        while parser is not None and self.mode is Mode.EXACT and not self._pauses:
            try:
                request = parser.next_request()
            except ProtocolError as exc:
                self._write_upstream(self._exact_take(parser.offset))
                self._refuse_and_close(exc.message)
                return
            if request is NEED_DATA:
                return
            args = list(request.args)
            effect = _effect(args)
            if effect is Effect.ADMIN:
                self._write_upstream(self._exact_take(request.start))
                self._exact_take(request.end)
                self._start_barrier(args)
                return
            self._apply(effect, args)
            self._write_upstream(self._exact_take(request.end))
            if self.mode is Mode.PIPE:
                self._write_upstream(bytes(self._exact_buf))  # the rest goes through unparsed
                self._exact, self._exact_buf = None, bytearray()

    # -- barriers: our replies in their place ----------------------------------------------------

    def _start_barrier(self, args: list[bytes] | None, error: str = "") -> None:
        self._pause(Pause.BARRIER)
        self.barrier = admin.Barrier(self, args, error=error)
        self.barrier.begin()

    def _refuse_and_close(self, message: str) -> None:
        """A protocol error: answer it after the replies Redis still owes, then close."""
        self._start_barrier(None, message)

    def inject(self, data: bytes) -> None:
        """Send a command of the barrier's to Redis (its reply never reaches the client)."""
        self._up_write(data)

    def barrier_done(self, reply: bytes, *, close: bool = False) -> None:
        """Redis owes nothing before ``reply``: send it, then release the held input."""
        self.barrier = None
        transport = self.transport
        if transport is None or transport.is_closing() or self.mode is Mode.CLOSING:
            return
        transport.write(reply)
        if close:
            self._fail(None)
            return
        self._pauses.discard(Pause.BARRIER)
        if self.mode is Mode.EXACT:
            self._exact_resume()  # the parser still holds what followed our command
        self._continue()

    # -- Redis -> client -----------------------------------------------------------------------

    def reply_data(self, data: bytes) -> None:
        if self.barrier is None:
            self.transport.write(data)  # type: ignore[union-attr]
        else:
            self.barrier.on_replies(data)


def _nowhere(data: bytes) -> None:
    """Stands in for the upstream's write until it is connected (client input is paused)."""


def _effect(command: object) -> Effect | None:
    if command.__class__ is not list or not command or command[0].__class__ is not bytes:  # type: ignore[index]
        return None
    return effect_of(command)  # type: ignore[arg-type]


class UpstreamConnection(asyncio.Protocol):
    """The Redis side of one client: hands every event to its :class:`ClientConnection`."""

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        # Bound straight to the client: one Python call less per reply chunk on the hot path.
        self.data_received = client.reply_data  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=self.client.server.buffer_limit)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.client.upstream_lost()

    def pause_writing(self) -> None:
        self.client.upstream_full(True)

    def resume_writing(self) -> None:
        self.client.upstream_full(False)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
