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
from protocol.commands import ADMIN_PREFIX, NOTICED, Effect, effect_of, hello_version
from protocol.framing import SMALL_DIGITS, Tail, digits, judge_tail
from proxy import admin

if TYPE_CHECKING:
    from proxy.server import Server

log = logging.getLogger("key_evt_amqp.relay")

_PREFIX_LEN = len(ADMIN_PREFIX)
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


_FAST = Mode.FAST
_RELAY = Tail.RELAY
#: Names of other lengths need no lookup (GET, SET, HSET, ... are never looked at twice).
_NOTICED_LENGTHS = frozenset({len(name) for name in NOTICED} | set(range(_PREFIX_LEN, framing.MAX_ADMIN_NAME + 1)))


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
        self._held: list[bytes] = []  # input read while paused, in order
        self._held_bytes = 0
        self._pauses: set[Pause] = set()
        self._reading = True
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
            self.barrier = None
        if self.upstream is not None:
            self.upstream.pause_reading()  # its replies have nowhere to go
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
        self._pauses.add(reason)
        if reason is not Pause.BARRIER:
            self._stop_reading()
        # Behind a barrier the client is still read (bounded by _hold): a client that leaves
        # while its command waits behind a blocked one must be noticed, or its Redis connection
        # (and the blocked command) would outlive it.

    def _stop_reading(self) -> None:
        if self._reading and self.transport is not None:
            self.transport.pause_reading()
            self._reading = False

    def _hold(self, data: bytes, *, first: bool = False) -> None:
        if first:
            self._held.insert(0, data)
        else:
            self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > self.server.buffer_limit:
            self._stop_reading()

    def _resume(self, reason: Pause) -> None:
        self._pauses.discard(reason)
        self._continue()

    def _continue(self) -> None:
        """No pause left: process what was held back, then read again."""
        while self._held and not self._pauses and self.mode is not Mode.CLOSING:
            data = self._held.pop(0)
            self._held_bytes -= len(data)
            self.data_received(data)
        transport = self.transport
        if not self._pauses and not self._reading and transport is not None and not transport.is_closing():
            transport.resume_reading()
            self._reading = True

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
        if self._pauses or self.mode is not _FAST:
            self._not_fast(data)
            return
        # The hot path, inline on purpose: every Python call here costs throughput at -P 1.
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
                if command and len(command[0]) in _NOTICED_LENGTHS:
                    low = command[0].lower()
                    if low in NOTICED or low[:_PREFIX_LEN] == ADMIN_PREFIX:
                        noticed = True
        except hiredis.ProtocolError:  # inline commands, garbage
            self._anomaly(data, commands)
            return
        except (TypeError, AttributeError):  # the last request is not a list of bulk strings
            commands.pop()
            self._anomaly(data, commands)
            return
        pending = self._pending + len(data) - size
        if not noticed and not self._carry and (
            pending == 0
            or len(data) < pending  # the unfinished command began earlier: judged then
            or 0 < pending and judge_tail(data[-pending:]) is _RELAY
        ):
            # The common case: nothing to look at, nothing to keep back.
            self._pending = pending
            self._up_write(data)
            return
        self._careful(data, commands)

    def _not_fast(self, data: bytes) -> None:
        if self._pauses:
            self._hold(data)
        elif self.mode is Mode.PIPE:
            self._up_write(data)
        elif self.mode is Mode.EXACT:
            self._exact_feed(data)

    def _careful(self, data: bytes, commands: list[object]) -> None:
        """Place each command in the chunk, act on the noticed ones, judge the unfinished tail."""
        carry = self._carry
        stream = carry + data if carry else data
        relayed_before = self._pending - len(carry)
        placed = framing.locate(stream, commands, relayed_before)
        if placed is None:
            self._anomaly(data, [])
            return
        if not self._walk(stream, placed):
            return
        end = placed[-1][2] if placed else -relayed_before
        self._settle(stream, end, relayed_before)

    def _walk(self, stream: bytes, placed: list[tuple[object, int, int]]) -> bool:
        """Act on each placed command; False when one of ours stopped the walk (the rest of the
        stream is then held, and the commands before it relayed)."""
        for command, start, end in placed:
            effect = _effect(command)
            if effect is Effect.ADMIN and self.mode is not Mode.PIPE:
                self._write_upstream(stream[:start])
                self._commands = hiredis.Reader(notEnoughData=NEED_DATA)
                self._carry, self._pending = b"", 0
                if end < len(stream):
                    self._hold(stream[end:], first=True)
                if end - start > MAX_ADMIN_BYTES:
                    self._refuse_and_close("ERR Protocol error: key_evt_amqp command too long")
                else:
                    self._start_barrier(command)  # type: ignore[arg-type]
                return False
            if effect is Effect.HELLO and self.mode is not Mode.PIPE and not self.in_multi:
                version = hello_version(command)  # type: ignore[arg-type]
                if version is not None:
                    # Which protocol our replies must speak depends on whether HELLO succeeds.
                    self._write_upstream(stream[:end])
                    self._commands = hiredis.Reader(notEnoughData=NEED_DATA)
                    self._carry, self._pending = b"", 0
                    if end < len(stream):
                        self._hold(stream[end:], first=True)
                    self._start_barrier(None, hello=version)
                    return False
            self._apply(effect, command)
        return True

    def _settle(self, stream: bytes, end: int, relayed_before: int) -> None:
        """Relay a walked stream whose last complete command ends at ``end``; judge the rest."""
        if self.mode is Mode.PIPE:
            self._write_upstream(stream)
            self._carry, self._pending = b"", 0
            return
        if end < 0 or end == len(stream):
            # No command began here (the unfinished one was judged earlier), or none is unfinished.
            self._write_upstream(stream)
            self._carry, self._pending = b"", relayed_before + len(stream) if end < 0 else 0
            return
        verdict = judge_tail(stream[end:])
        if verdict is Tail.RELAY:
            self._write_upstream(stream)
            self._carry, self._pending = b"", len(stream) - end
        elif verdict is Tail.HOLD:
            self._write_upstream(stream[:end])
            self._carry = stream[end:]
            self._pending = len(self._carry)
            if self._pending > MAX_ADMIN_BYTES:
                self._refuse_and_close("ERR Protocol error: key_evt_amqp command too long")
        else:
            self._write_upstream(stream[:end])
            self._enter_exact(stream[end:])

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
            # Reached only where no barrier can watch the reply (inside MULTI): assume success.
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

    def _anomaly(self, data: bytes, commands: list[object]) -> None:
        """hiredis refused the input, or it is not canonical: relay the commands before the odd
        spot, and let the exact parser judge from there (Redis's own answer, in its place)."""
        carry = self._carry
        stream = carry + data if carry else data
        relayed_before = self._pending - len(carry)
        self._carry = b""
        placed = framing.locate(stream, commands, relayed_before) if commands else []
        if placed is not None and placed and not self._walk(stream, placed):
            return
        end = placed[-1][2] if placed else -relayed_before
        if placed is None or end < 0:
            # Part of the command at fault already reached Redis: only Redis can judge it. It
            # answers with its own protocol error and closes; no second error from us then.
            log.debug("client input cannot be re-parsed from a boundary; relaying it as a pipe")
            self._write_upstream(stream)
            self.quitting = True
            self._become_pipe()
            return
        self._write_upstream(stream[:end])
        self._enter_exact(stream[end:])

    # -- EXACT mode: the pure-Python parser ------------------------------------------------------

    def _enter_exact(self, stream: bytes) -> None:
        """From a request boundary on, this client is parsed by the exact parser (rare, slower)."""
        self._carry, self._pending = b"", 0
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
        while parser is not None and self.mode is Mode.EXACT and not self._pauses:
            try:
                request = parser.next_request()
            except ProtocolError as exc:
                # Nothing of the request at fault reaches Redis: our answer is Redis's own text.
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
            if effect is Effect.HELLO and not self.in_multi and hello_version(args) is not None:
                self._write_upstream(self._exact_take(request.end))
                self._start_barrier(None, hello=hello_version(args))
                return
            self._apply(effect, args)
            self._write_upstream(self._exact_take(request.end))
            if self.mode is Mode.PIPE:
                self._write_upstream(bytes(self._exact_buf))  # the rest goes through unparsed
                self._exact, self._exact_buf = None, bytearray()

    # -- barriers: our replies in their place ----------------------------------------------------

    def _start_barrier(
        self, args: list[bytes] | None, error: str = "", *, drain: bool = False, hello: int | None = None
    ) -> None:
        self._pause(Pause.BARRIER)
        self.barrier = admin.Barrier(self, args, error=error, drain=drain, hello=hello)
        self.barrier.begin()

    def shut_down(self) -> None:
        """Read no more; close once Redis has answered what was sent (the server bounds the wait).

        Where replies cannot be followed (a pipe, or our own reply pending) the server's
        deadline closes the connection instead.
        """
        self._pause(Pause.SHUTDOWN)
        self._held.clear()
        self._held_bytes = 0
        if self.upstream is None:
            self._fail(None)
        elif self.mode in (Mode.FAST, Mode.EXACT) and self.barrier is None:
            self._start_barrier(None, drain=True)

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


class RedisSide(asyncio.Protocol):
    """A connection the proxy opened to a Redis node: the pause/resume/close every kind shares."""

    transport: asyncio.Transport | None = None

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class UpstreamConnection(RedisSide):
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
