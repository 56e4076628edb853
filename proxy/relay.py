"""One client connection and its own upstream Redis connection.

Strategy: bytes go through untouched. Each client chunk is fed to a hiredis reader, which splits
it into commands in C; the relay counts them (``sent``) and looks only at the few names in
:data:`protocol.commands.NOTICED`. Each upstream chunk is fed to a second hiredis reader which
counts replies (``replied``). Those two counters are what place our own replies: a
``key_evt_amqp.*`` command is cut out of the stream, the client's later input is held, and our
reply is written once Redis has answered everything sent before it (a *barrier*). Nothing after
the barrier reaches Redis until our reply is out, so the reply stream never needs splitting.

Rules (break one and replies go out of order):
1. Bytes reach Redis only once the relay knows they are not part of one of our commands. A chunk
   that ends inside a command whose name is not yet visible keeps that tail in ``_carry``.
2. ``sent`` counts commands that Redis answers with exactly one reply; ``replied`` counts frames.
   When that stops being true (pub/sub, MONITOR, CLIENT REPLY/TRACKING, a desynchronised stream)
   the connection becomes a plain pipe (:attr:`Mode.PIPE`) for the rest of its life: our commands
   are then relayed to Redis, which refuses them in place as unknown commands.
3. Client reading is paused for named reasons (:class:`Pause`) and resumes when none is left.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import TYPE_CHECKING

import hiredis

from protocol import NEED_DATA, ProtocolError, RequestParser, replies
from protocol.commands import ADMIN_PREFIX, NOTICED, Effect, effect_of, hello_version
from protocol.framing import _DIGITS, digits
from protocol import framing
from proxy import admin

if TYPE_CHECKING:
    from proxy.server import Server

log = logging.getLogger("key_evt_amqp.relay")

_PREFIX_LEN = len(ADMIN_PREFIX)
#: An admin command whose bytes pass this is refused and the client closed (rule 1 holds it).
MAX_ADMIN_BYTES = 64 * 1024


class Mode(enum.Enum):
    FAST = "fast"  # hiredis splits multibulk commands
    EXACT = "exact"  # the pure-Python parser (inline commands, or input hiredis cannot vouch for)
    PIPE = "pipe"  # uncountable: bytes only, our commands go to Redis and are refused there
    CLOSING = "closing"


class Pause(enum.Enum):
    CONNECTING = "connecting"  # upstream not connected yet
    UPSTREAM_FULL = "upstream-full"  # upstream write buffer above its high-water mark
    BARRIER = "barrier"  # one of our commands is waiting for Redis's earlier replies
    SHUTDOWN = "shutdown"


class ClientConnection(asyncio.Protocol):
    """The client side. Owns the upstream connection it opens when the client connects."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamConnection | None = None
        self.mode = Mode.FAST
        self.sent = 0  # commands relayed that Redis answers with one reply each
        self.replied = 0  # reply frames Redis sent
        self.in_multi = False
        self.resp3 = False
        self._commands = hiredis.Reader(notEnoughData=NEED_DATA)
        self._replies = hiredis.Reader(notEnoughData=NEED_DATA)
        self._exact: RequestParser | None = None
        self._exact_buf = bytearray()  # EXACT mode: bytes fed to the parser, not yet relayed
        self._exact_base = 0  # absolute stream offset of _exact_buf[0]
        self._carry = b""  # client bytes parsed but not yet relayed (rule 1)
        self._pending = 0  # bytes of the unfinished command seen so far, carry included
        self._held: list[bytes] = []  # client input that arrived while reading was paused
        self._barrier: admin.Barrier | None = None
        self._reply_tail = b""  # reply bytes kept back while an authority probe is answered
        self._pauses: set[Pause] = set()
        self._up_write = _closed_write  # the upstream transport's write, once connected

    # -- lifecycle -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=self.server.buffer_limit)
        if not self.server.admit(self):
            transport.write(replies.error("ERR max number of clients reached"))
            transport.close()
            self.mode = Mode.CLOSING
            return
        self._pause(Pause.CONNECTING)
        self.server.spawn(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        address = self.server.upstream_address
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(self), address.host, address.port
                ),
                timeout=self.server.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timeout"
            log.warning("cannot reach Redis at %s:%s: %s", address.host, address.port, reason)
            self._fail(f"ERR key-evt-amqp: Redis is unreachable ({reason})")
            return
        if self.mode is Mode.CLOSING or self.transport is None or self.transport.is_closing():
            upstream.close()
            return
        self.upstream = upstream
        self._up_write = upstream.transport.write  # type: ignore[union-attr]
        self._resume(Pause.CONNECTING)

    def connection_lost(self, exc: Exception | None) -> None:
        self.mode = Mode.CLOSING
        self.server.forget(self)
        if self._barrier is not None:
            self._barrier.cancel()
        if self.upstream is not None:
            self.upstream.close()  # flushes what the client sent before it went away

    def upstream_lost(self) -> None:
        """Redis closed our upstream connection: tell the client if it waits for replies."""
        if self.mode is Mode.CLOSING:
            return
        waiting = self.mode is Mode.PIPE or self.replied < self.sent
        if self._reply_tail and self.transport is not None:
            self.transport.write(self._reply_tail)
        self._fail("ERR key-evt-amqp: the connection to Redis was lost" if waiting else None)

    def _fail(self, message: str | None) -> None:
        self.mode = Mode.CLOSING
        if self.transport is not None and not self.transport.is_closing():
            if message is not None:
                self.transport.write(replies.error(message))
            self.transport.close()

    # -- flow control --------------------------------------------------------------------------

    def _pause(self, reason: Pause) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pause_reading()
        self._pauses.add(reason)

    def _resume(self, reason: Pause) -> None:
        self._pauses.discard(reason)
        self._continue()

    def _continue(self) -> None:
        """No pause left: process what was held back, then read again."""
        if self._pauses or self.transport is None or self.transport.is_closing():
            return
        self._drain_held()
        if not self._pauses and not self.transport.is_closing():
            self.transport.resume_reading()

    def _drain_held(self) -> None:
        """Process input that arrived while paused, in order, until something pauses again."""
        while self._held and not self._pauses and self.mode is not Mode.CLOSING:
            self.data_received(self._held.pop(0))

    def pause_writing(self) -> None:
        # The client reads slower than Redis answers: stop reading Redis.
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def upstream_full(self, full: bool) -> None:
        """Redis reads slower than the client writes: stop reading the client (and back)."""
        if full:
            self._pause(Pause.UPSTREAM_FULL)
        else:
            self._resume(Pause.UPSTREAM_FULL)

    # -- client -> Redis -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._pauses:
            # Reading is paused, but a transport may still deliver what it had already read:
            # keep it, bounded by that one read, for when the pause ends.
            self._held.append(data)
            return
        mode = self.mode
        if mode is Mode.FAST:
            self._fast(data)
        elif mode is Mode.PIPE:
            self._up_write(data)
        elif mode is Mode.EXACT:
            self._exact_feed(data)

    def _fast(self, data: bytes) -> None:
        pending = self._pending  # bytes of the unfinished command seen so far (carry included)
        if not pending and data[:1] != b"*":
            self._to_exact(data)  # an inline command, or garbage
            return
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
                        raise hiredis.ProtocolError("not a multibulk request")
                    size += 5
                    continue
                size += 3 + (_DIGITS[len(command)] if len(command) < 10_000 else digits(len(command)))
                for arg in command:
                    n = len(arg)
                    size += 5 + (_DIGITS[n] if n < 10_000 else digits(n)) + n
                if command:
                    low = command[0].lower()
                    if low in NOTICED or low[:_PREFIX_LEN] == ADMIN_PREFIX:
                        noticed = True
        except (hiredis.ProtocolError, TypeError, AttributeError):  # an element that is no string
            self._anomaly(data)
            return
        pending += len(data) - size
        if pending < 0:
            self._anomaly(data)  # sizes do not add up: not canonical, let the exact parser judge
            return
        if not noticed and not self._carry and (
            pending == 0 or pending > len(data) or not framing.holds_back(data[-pending:])
        ):
            # The common case: nothing of interest, nothing to keep back.
            self.sent += len(commands) - commands.count(None) - commands.count([])
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
                self._write_upstream(stream[:max(start, 0)])
                self._commands = hiredis.Reader(notEnoughData=NEED_DATA)
                self._carry, self._pending = b"", 0
                rest = stream[end:]
                if rest:
                    self._held.insert(0, rest)
                self._start_admin(command)  # type: ignore[arg-type]
                return
            self._apply(effect, command)
        if self.mode is Mode.PIPE:
            self._write_upstream(stream)
            self._carry, self._pending = b"", 0
            return
        self._write_upstream(stream[:plan.relay_until])
        self._carry = stream[plan.relay_until:]
        self._pending = len(stream) - (plan.commands[-1][2] if plan.commands else -self._pending + len(carry))
        if len(self._carry) > MAX_ADMIN_BYTES:
            self._refuse_and_close("ERR Protocol error: key_evt_amqp command too long")

    def _apply(self, effect: Effect | None, command: object) -> None:
        """Book-keeping for one relayed command (its bytes are relayed by the caller)."""
        if command is None or command == []:
            return  # `*0` and `*-1`: Redis ignores them and sends nothing back
        self.sent += 1
        if effect is None:
            return
        if effect is Effect.UNCOUNTABLE or effect is Effect.ADMIN:
            self._become_pipe()
        elif effect is Effect.MULTI:
            self.in_multi = True
        elif effect is Effect.END_MULTI:
            self.in_multi = False
        elif effect is Effect.RESET:
            self.in_multi = False
            self.resp3 = False
        elif effect is Effect.HELLO:
            version = hello_version(command)  # type: ignore[arg-type]
            if version in (2, 3):
                self.resp3 = version == 3

    def _write_upstream(self, data: bytes) -> None:
        if data and self.upstream is not None:
            self.upstream.write(data)

    def _become_pipe(self) -> None:
        if self.mode is not Mode.CLOSING:
            self.mode = Mode.PIPE

    def _anomaly(self, data: bytes) -> None:
        """hiredis refused the input or it is not in canonical form: let the exact parser judge."""
        if self._pending > len(self._carry):
            # Part of the current command already reached Redis: Redis must judge it itself.
            log.debug("client input not re-parseable; relaying it as a plain pipe")
            self._write_upstream(self._carry + data)
            self._carry = b""
            self._become_pipe()
            return
        stream = self._carry + data
        self._carry = b""
        self._to_exact(stream)

    # -- EXACT mode: the pure-Python parser ------------------------------------------------------

    def _to_exact(self, stream: bytes) -> None:
        """From a request boundary on, parse this client with the exact parser (rare, slower)."""
        self.mode = Mode.EXACT
        self._exact = RequestParser()
        self._exact_buf = bytearray()
        self._exact_base = 0
        self._exact_feed(stream)

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
        assert parser is not None
        while self.mode is Mode.EXACT and not self._pauses:
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
                self._start_admin(args)
                return
            self._apply(effect, args)
            self._write_upstream(self._exact_take(request.end))
            if self.mode is Mode.PIPE:
                # What the parser still holds goes through unparsed.
                self._write_upstream(bytes(self._exact_buf))
                self._exact_buf = bytearray()
                self._exact = None

    # -- our commands --------------------------------------------------------------------------

    def _start_admin(self, args: list[bytes]) -> None:
        self._pause(Pause.BARRIER)
        self._barrier = admin.Barrier(self, args)
        self._barrier.begin()

    def _refuse_and_close(self, message: str) -> None:
        """A protocol error: answer it after Redis's pending replies, then close this client."""
        self._pause(Pause.BARRIER)
        self._barrier = admin.Barrier(self, None, error=message)
        self._barrier.begin()

    def inject(self, data: bytes) -> None:
        """Send a command of our own to Redis; its reply is taken out of the stream by the barrier."""
        self.sent += 1
        self.upstream.write(data)  # type: ignore[union-attr]

    def barrier_done(self, reply: bytes, *, close: bool = False) -> None:
        """The barrier's reply is ready and Redis owes nothing before it: send it, release input."""
        self._barrier = None
        transport = self.transport
        if transport is None or transport.is_closing() or self.mode is Mode.CLOSING:
            return
        transport.write(reply)
        if close:
            self.mode = Mode.CLOSING
            transport.close()
            return
        self._pauses.discard(Pause.BARRIER)
        if self.mode is Mode.EXACT:
            self._exact_resume()  # the parser still holds what followed our command
        self._continue()

    # -- Redis -> client -----------------------------------------------------------------------

    def reply_data(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.mode is Mode.CLOSING:
            return
        if self.mode is Mode.PIPE:
            transport.write(data)
            return
        reader = self._replies
        reader.feed(data)
        gets = reader.gets
        n = 0
        try:
            while gets() is not NEED_DATA:
                n += 1
        except hiredis.ProtocolError:
            log.warning("Redis sent a frame the relay cannot parse; relaying as a plain pipe")
            self._become_pipe()
            transport.write(self._reply_tail + data)
            self._reply_tail = b""
            return
        self.replied += n
        barrier = self._barrier
        if barrier is None:
            transport.write(data)
            return
        barrier.on_replies(data)


def _closed_write(data: bytes) -> None:
    """Stands in for the upstream's write until it is connected (input is paused until then)."""


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
        transport.set_write_buffer_limits(high=self.client.server.buffer_limit)

    def data_received(self, data: bytes) -> None:
        self.client.reply_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.client.upstream_lost()

    def pause_writing(self) -> None:
        self.client.upstream_full(True)

    def resume_writing(self) -> None:
        self.client.upstream_full(False)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
