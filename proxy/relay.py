"""One client connection, relayed to its own upstream Redis connection (:mod:`proxy.upstream`).

Strategy: bytes go through untouched, both ways. Each client chunk is fed to a hiredis reader,
which splits it into commands in C; the relay adds up their canonical sizes (so it always knows
where the current command began) and looks only at the few names in
:data:`protocol.commands.NOTICED`. Redis's replies are not parsed at all.

A ``key_evt_amqp.*`` command is cut out of the stream and the client's later input is held. Its
reply must come after Redis's replies to everything sent before it: the :class:`admin.Barrier`
sends two commands of its own behind those (an authority probe and a marker whose reply is unique),
waits until the reply stream ends with the marker's reply, cuts both replies off, and only then
writes ours and releases the held input. Redis itself orders the replies; nothing is counted.

Rules (break one and replies go out of order, or one client costs every client):
1. Bytes reach Redis only once the relay knows they are not part of one of our commands. A chunk
   that ends inside a command whose name is not yet readable keeps that tail in ``_carry``.
2. Once Redis may send frames that answer no command (pub/sub, MONITOR, CLIENT REPLY/TRACKING),
   or the stream cannot be followed, the connection is a plain pipe (:attr:`Mode.PIPE`) for the
   rest of its life: our commands are relayed too, and Redis refuses them in place as unknown.
3. Client reading is paused for named reasons (:class:`Pause`) and resumes when none is left;
   what a transport delivers while paused is kept in ``_held``, at most ``buffer_limit`` bytes
   (past that the transport is told again to stop reading: under uvloop a pause asked for inside
   ``connection_made`` does not take).
4. hiredis never sees a chunk that :func:`_risky` refuses: it preallocates a list for every
   declared count (``*2147483647`` would cost 16 GiB) and buffers every bulk whole. Such chunks,
   and input hiredis refuses, go to the exact parser (:attr:`Mode.EXACT`), which streams: it keeps
   only the arguments the relay looks at, and counts other bodies off as they are relayed. The
   connection goes back to hiredis at the next request boundary.
5. Redis judges every protocol error itself. When the exact parser finds one, the bytes it saw go
   to Redis and the client is no longer read (:attr:`Mode.DONE`): Redis answers with its own
   error and closes, and the client gets exactly that. After ``QUIT`` too, nothing more is sent.
6. When Redis closes the connection, the client gets every byte Redis sent and then a close, as
   from Redis itself: never a reply of ours. A client's half-close (end of input) reaches Redis
   once everything before it has, so replies still flow back until Redis closes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import hiredis

from protocol import NEED_DATA, ProtocolError, RequestParser, framing, replies
from protocol.commands import ADMIN_PREFIX, MAX_ADMIN_NAME, NOTICED, Effect, effect_of, hello_version
from protocol.framing import SMALL_DIGITS, Tail, digits, judge_tail
from protocol.requests import KEEP_ALL, KeptTooLong
from proxy import admin
from proxy.connect import open_redis, tls_reason
from proxy.offline import OfflineConnection, is_local
from proxy.ratelog import RateLimitedLog
from proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from proxy.runtime import Runtime
    from proxy.state import ServerState

log = logging.getLogger("key_evt_amqp.relay")
_quiet_log = RateLimitedLog(log)

_PREFIX_LEN = len(ADMIN_PREFIX)
#: One of our commands longer than this is refused and the client closed (rule 1 holds it).
MAX_ADMIN_BYTES = 64 * 1024
#: An unfinished command hiredis holds may grow to this; past it the exact parser takes over and
#: streams the rest (a big value is relayed as it arrives, never held whole).
MAX_FAST_PENDING = 64 * 1024
#: How much of one read is parsed in one event-loop iteration. uvloop reads up to 256 KiB at once;
#: with a dozen clients flooding pipelined commands, parsing all of each read would keep every other
#: client waiting for tens of milliseconds per iteration. The rest of a longer read is parsed in
#: the next iteration, in order, with reading paused meanwhile (Pause.BUDGET).
READ_BUDGET = 64 * 1024
#: After a client's end of input, how long a command of ours may wait for its place (behind a
#: blocked BLPOP it would wait forever) before the end of input is passed on to Redis anyway.
EOF_BARRIER_WAIT = 1.0
#: After a protocol error was forwarded (rule 5), how long Redis has to close the connection.
DONE_WAIT = 5.0
_LLONG_MAX = 2**63 - 1

# Rule 4: what hiredis must not see. hiredis preallocates a list for the count of every `*`, `~`,
# `>` and `|` header (a `%` map it does not), so a count of two digits or more goes to the exact
# parser, and so does a header cut by the end of a read (its digits may go on in the next one).
# Bulks need no check: hiredis holds only what arrived, and MAX_FAST_PENDING bounds that. Nested
# arrays of at most 9 elements are left to hiredis: Redis refuses them at once, and what hiredis
# builds for them meanwhile is bounded by MAX_FAST_PENDING too. A value that happens to match costs
# one read in the exact parser, nothing more.
# Both searches start from a literal byte (SRE then scans with memchr), and the RESP3 one runs only
# when one of its bytes is there at all (an int needle: `in` then costs ~200 instructions, a bytes
# needle ~2,200). Measured with callgrind: ~2,500 instructions for a read of one SET, ~500 per
# command at -P 16; a loop over find() in Python costs more (each index or call is ~1,000).
_COUNT = re.compile(rb"\*(?:\d\d|\d?\Z)").search
_RESP3_COUNT = re.compile(rb"[~>|](?:\d\d|\d?\Z)").search


def _risky(data: bytes) -> bool:
    """Whether hiredis must not see this read (rule 4). Inlined in the hot path."""
    return _COUNT(data) is not None or (
        (126 in data or 62 in data or 124 in data) and _RESP3_COUNT(data) is not None
    )


class Mode(enum.Enum):
    FAST = "fast"  # hiredis splits multibulk commands
    EXACT = "exact"  # the streaming exact parser (inline, risky or non-canonical input)
    PIPE = "pipe"  # bytes only (rule 2)
    DONE = "done"  # Redis will close: nothing more is read or sent (rule 5)
    CLOSING = "closing"


class Pause(enum.Enum):
    BUDGET = "budget"  # the rest of a long read waits for the next loop iteration
    CONNECTING = "connecting"  # the upstream connection is not open yet
    UPSTREAM_FULL = "upstream-full"  # its write buffer is above the high-water mark
    BARRIER = "barrier"  # one of our commands waits for its place
    SHUTDOWN = "shutdown"


_FAST = Mode.FAST
_RELAY = Tail.RELAY
#: Names of other lengths need no lookup (GET, SET, HSET, ... are never looked at twice).
_NOTICED_LENGTHS = frozenset({len(name) for name in NOTICED} | set(range(_PREFIX_LEN, MAX_ADMIN_NAME + 1)))
#: How many arguments the exact parser keeps: ours whole, a noticed command's name and first
#: argument (HELLO's version, CLIENT's subcommand), only the name of any other.
_NOTICED_KEEP = 2


def _keep(name: bytes) -> int:
    if len(name) in _NOTICED_LENGTHS:
        low = name.lower()
        if low[:_PREFIX_LEN] == ADMIN_PREFIX:
            return KEEP_ALL
        if low in NOTICED:
            return _NOTICED_KEEP
    return 1


class ClientConnection(asyncio.Protocol):
    """The client side. Owns the upstream connection it opens when the client connects."""

    def __init__(self, server_state: ServerState, runtime: Runtime) -> None:
        self.server_state = server_state
        self.runtime = runtime  # for our own commands (:mod:`proxy.admin`)
        self._metrics = server_state.metrics  # bytes each way, commands: counted per read
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamConnection | None = None
        self.mode = Mode.FAST
        self.in_multi = False
        self.resp3 = False
        self.barrier: admin.Barrier | None = None
        self._commands = hiredis.Reader(notEnoughData=NEED_DATA)
        self._carry = b""  # client bytes parsed but not relayed yet (rule 1)
        self._pending = 0  # bytes of the unfinished command seen so far, carry included
        self._partial = bytearray()  # those bytes, for a hand-over to the exact parser (rule 4)
        self._exact: RequestParser | None = None
        self._exact_buf = bytearray()  # EXACT mode: bytes fed to the parser, not yet relayed
        self._exact_sent = 0  # the parser's offset of _exact_buf[0]
        self._held: list[bytes] = []  # input read while paused, in order
        self._held_bytes = 0
        self._pauses: set[Pause] = set()
        self._reading = True
        self._client_eof = False  # the client ended its input (half-close)
        self._eof_sent = False
        self._timer: asyncio.TimerHandle | None = None
        self._up_write: Callable[[bytes], object] = _nowhere  # the upstream's write, once connected

    # -- lifecycle -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = self.transport = cast(asyncio.Transport, transport)  # a stream protocol: create_server/create_connection
        stream.set_write_buffer_limits(high=self.server_state.buffer_limit)
        if not self.server_state.admit(self):
            self._fail("ERR max number of clients reached")
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("client %s connected", stream.get_extra_info("peername"))
        self._pause(Pause.CONNECTING)
        self.server_state.spawn(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        address = self.server_state.upstream
        try:
            transport, upstream = await open_redis(
                address, lambda: UpstreamConnection(self, self.server_state.buffer_limit),
                timeout=self.server_state.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else tls_reason(exc)
            # One line per interval, not one per client: clients reconnect in tight loops.
            _quiet_log.warn("unreachable", "cannot reach Redis at %s: %s", address.name, reason)
            # Closed without a reply, as if Redis had refused the connection: clients retry on
            # a lost connection, not on an error reply. A client on this machine may still read
            # key_evt_amqp.info first (proxy/offline.py).
            if self.transport is not None and self.mode is not Mode.CLOSING and is_local(self.transport):
                held, self._held = self._held, []
                self._held_bytes = 0
                OfflineConnection(self, self.runtime, self.transport).start(held)
                return
            self._fail(None)
            return
        if self.mode is Mode.CLOSING:
            transport.close()
            return
        self.upstream = upstream
        self._up_write = transport.write
        self._resume(Pause.CONNECTING)

    def connection_lost(self, exc: Exception | None) -> None:
        self.mode = Mode.CLOSING
        self.server_state.forget(self)
        if log.isEnabledFor(logging.DEBUG) and self.transport is not None:
            log.debug("client %s disconnected", self.transport.get_extra_info("peername"))
        self._cancel_timer()
        if self.barrier is not None:
            self.barrier.cancel()
            self.barrier = None
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.pause_reading()  # its replies have nowhere to go
            upstream.close()  # close() flushes what the client sent before it left
        self._release()

    def _release(self) -> None:
        """Drop every buffer at once: a gone client must not hold memory until the next GC."""
        self._commands = hiredis.Reader(notEnoughData=NEED_DATA)
        self._held.clear()
        self._held_bytes = 0
        self._exact = None
        self._exact_buf = bytearray()
        self._partial = bytearray()
        self._carry = b""
        self._up_write = _nowhere

    def upstream_lost(self) -> None:
        """Redis closed our connection: the client gets what Redis sent, then the same close."""
        if self.mode is Mode.CLOSING:
            return
        if self.barrier is not None:
            self.barrier.flush()
            self.barrier.cancel()
            self.barrier = None
        self._fail(None)

    def eof_received(self) -> bool:
        """The client ended its input: pass that on to Redis after what came before it (rule 6)."""
        self._client_eof = True
        self._send_eof()
        return True  # keep writing to the client: Redis's replies are still on their way

    def _send_eof(self, force: bool = False) -> None:
        """Half-close Redis's side once nothing of the client's waits here (or when forced)."""
        if not self._client_eof or self._eof_sent or self.mode is Mode.CLOSING:
            return
        if not force and (self._pauses or self._held or self.barrier is not None):
            if self.barrier is not None and self._timer is None:
                # Behind a blocked command our reply would wait forever: pass the end on anyway.
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(EOF_BARRIER_WAIT, self._send_eof, True)
            return
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            if not force and Pause.CONNECTING in self._pauses:
                return
            self._fail(None)
            return
        self._eof_sent = True
        # What is still held (an unfinished command) can no longer become one of ours: Redis gets
        # it, and judges it as it would have straight from the client.
        if self.mode is Mode.EXACT and self._exact_buf:
            self._exact_relay(self._exact_sent + len(self._exact_buf))
        elif self._carry:
            self._up_write(self._carry)
            self._carry = b""
        if upstream.transport.can_write_eof():
            upstream.transport.write_eof()
        else:
            upstream.close()
        # Nothing more may be written (uvloop raises after write_eof): a barrier that completes
        # later, or a shutdown, sends nowhere; Redis closes once it has answered.
        self._up_write = _nowhere

    def _fail(self, message: str | None) -> None:
        self.mode = Mode.CLOSING
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if message is not None:
                transport.write(replies.error(message))
            transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- flow control (rule 3) -----------------------------------------------------------------

    def _pause(self, reason: Pause) -> None:
        self._pauses.add(reason)
        if reason is not Pause.BARRIER:
            self._stop_reading()
        # Behind a barrier the client is still read (bounded by _hold): a client that leaves
        # while its command waits behind a blocked one must be noticed, or its Redis connection
        # (and the blocked command) would outlive it.

    def _stop_reading(self) -> None:
        # Asked again each time, not once: a pause asked for in connection_made is lost on uvloop.
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()
            self._reading = False

    def _hold(self, data: bytes, *, first: bool = False, at: int | None = None) -> None:
        if first:
            self._held.insert(0, data)
        elif at is not None:
            self._held.insert(at, data)
        else:
            self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > self.server_state.buffer_limit:
            self._stop_reading()

    def _resume(self, reason: Pause) -> None:
        self._pauses.discard(reason)
        self._continue()

    def _continue(self) -> None:
        """No pause left: process what was held back, then read again."""
        while self._held and not self._pauses and self.mode is not Mode.CLOSING:
            data = self._held.pop(0)
            self._held_bytes -= len(data)
            self._metrics.client_bytes_in -= len(data)  # counted when it was read
            self.data_received(data)
        transport = self.transport
        if (
            not self._pauses and not self._reading and self.mode is not Mode.DONE
            and transport is not None and not transport.is_closing()
        ):
            transport.resume_reading()
            self._reading = True
        self._send_eof()

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
        self._metrics.client_bytes_in += len(data)  # read again from _continue: subtracted there
        if len(data) > READ_BUDGET and not self._pauses and (self.mode is _FAST or self.mode is Mode.EXACT):
            self._over_budget(data)
            return
        if self._pauses or self.mode is not _FAST:
            if self.mode is Mode.PIPE and not self._pauses:
                self._up_write(data)
            else:
                self._corked(self._not_fast, data)
            return
        if _COUNT(data) is not None or (  # rule 4, _risky() inlined
            (126 in data or 62 in data or 124 in data) and _RESP3_COUNT(data) is not None
        ):
            self._corked(self._to_exact, data, [])
            return
        # The hot path, inline on purpose: every Python call here costs throughput at -P 1.
        reader = self._commands
        reader.feed(data)
        gets = reader.gets
        commands: list[object] = []
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
            self._corked(self._to_exact, data, commands)
            return
        except (TypeError, AttributeError):  # the last request is not a list of bulk strings
            commands.pop()
            self._corked(self._to_exact, data, commands)
            return
        self._metrics.commands_relayed += len(commands)
        pending = self._pending + len(data) - size
        if not noticed and not self._carry and (
            pending == 0
            or len(data) < pending  # the unfinished command began earlier: judged then
            or 0 < pending and judge_tail(data[-pending:]) is _RELAY
        ):
            # The common case: nothing to look at, nothing to keep back.
            if pending:
                if pending > MAX_FAST_PENDING:
                    self._corked(self._to_exact, data, commands)
                    return
                self._keep_partial(data, pending)
            self._pending = pending
            self._up_write(data)
            return
        self._corked(self._careful, data, commands)

    def _corked(self, handle: Callable[..., None], *args: object) -> None:
        """Run a slow path with its writes to Redis gathered into one: one client read becomes at
        most one write, as it would reach Redis straight from the client (Redis's verdict on a
        long line depends on how its reads group the bytes), and one syscall instead of several."""
        real = self._up_write
        if real is _nowhere:
            handle(*args)
            return
        parts: list[bytes] = []
        gather = self._up_write = parts.append
        try:
            handle(*args)
        finally:
            if self._up_write is gather:  # not replaced meanwhile (a close sets _nowhere)
                self._up_write = real
                if parts:
                    real(parts[0] if len(parts) == 1 else b"".join(parts))

    def _over_budget(self, data: bytes) -> None:
        """Parse READ_BUDGET bytes now and the rest in the next iteration. Held reads may wait
        behind this one (it can come from _continue): the rest goes before them, right after
        what the first part itself held back (that is put at the front)."""
        waiting = len(self._held)
        self._metrics.client_bytes_in -= READ_BUDGET  # counted when it was read
        self.data_received(data[:READ_BUDGET])
        if self.mode is Mode.CLOSING or self.mode is Mode.DONE:
            return
        self._hold(data[READ_BUDGET:], at=len(self._held) - waiting)
        if Pause.BUDGET not in self._pauses:
            self._pause(Pause.BUDGET)
            asyncio.get_running_loop().call_soon(self._resume, Pause.BUDGET)

    def _keep_partial(self, data: bytes, pending: int) -> None:
        """Remember the unfinished command's bytes (rule 4 may hand it to the exact parser)."""
        if pending <= len(data):
            self._partial = bytearray(data[len(data) - pending:])
        else:
            self._partial += data

    def _not_fast(self, data: bytes) -> None:
        if self._pauses:
            self._hold(data)
        elif self.mode is Mode.PIPE:
            self._up_write(data)
        elif self.mode is Mode.EXACT:
            self._exact_feed(data)
        elif self.mode is Mode.DONE:
            self._stop_reading()  # Redis ignores what follows; so do we

    def _stream(self, data: bytes) -> tuple[bytes, int]:
        """The bytes from the unfinished command's start on, and how many of them Redis has."""
        if not self._pending:
            return data, 0
        return bytes(self._partial) + data, self._pending - len(self._carry)

    def _careful(self, data: bytes, commands: list[object]) -> None:
        """Place each command in the chunk, act on the noticed ones, judge the unfinished tail."""
        stream, sent = self._stream(data)
        placed = framing.locate(stream, commands)
        if placed is None:
            self._enter_exact(stream, sent)
            return
        sent = self._walk(stream, placed, sent)
        if sent < 0:
            return
        end = placed[-1][2] if placed else 0
        self._settle(stream, end, sent)

    def _walk(self, stream: bytes, placed: list[tuple[object, int, int]], sent: int) -> int:
        """Act on each placed command and relay up to it; returns how much of ``stream`` Redis
        has, or -1 when one of ours (or a QUIT) stopped the walk (the rest is then held or
        dropped)."""
        for command, start, end in placed:
            effect = _effect(command)
            if effect is Effect.ADMIN and self.mode is not Mode.PIPE:
                self._write_upstream(stream[sent:start])
                self._reset_fast()
                if end < len(stream):
                    self._hold(stream[end:], first=True)
                if end - start > MAX_ADMIN_BYTES:
                    self._refuse_and_close("ERR Protocol error: key_evt_amqp command too long")
                else:
                    self._start_barrier(command)  # type: ignore[arg-type]  # hiredis gives object; _effect() checked it is a list of bytes
                return -1
            if effect is Effect.HELLO and self.mode is not Mode.PIPE and not self.in_multi:
                version = hello_version(command)  # type: ignore[arg-type]  # hiredis gives object; _effect() checked it is a list of bytes
                if version is not None:
                    # Which protocol our replies must speak depends on whether HELLO succeeds.
                    self._write_upstream(stream[sent:end])
                    self._reset_fast()
                    if end < len(stream):
                        self._hold(stream[end:], first=True)
                    self._start_barrier(None, hello=version)
                    return -1
            if effect is Effect.QUIT and self.mode is not Mode.PIPE and not self.in_multi:
                # Redis answers QUIT and closes; what follows it is never read (rule 5).
                self._write_upstream(stream[sent:end])
                self._done()
                return -1
            self._apply(effect, command)
        return sent

    def _settle(self, stream: bytes, end: int, sent: int) -> None:
        """Relay a walked stream whose last complete command ends at ``end``; judge the rest."""
        if self.mode is Mode.PIPE or end == len(stream):
            self._write_upstream(stream[sent:])
            self._reset_fast()
            return
        tail = stream[end:]
        verdict = judge_tail(tail)
        if verdict is Tail.RELAY:
            self._write_upstream(stream[sent:])
            self._carry, self._pending = b"", len(tail)
            self._partial = bytearray(tail)
        elif verdict is Tail.HOLD:
            self._write_upstream(stream[sent:end])
            self._carry, self._pending = tail, len(tail)
            self._partial = bytearray(tail)
            if self._pending > MAX_ADMIN_BYTES:
                self._refuse_and_close("ERR Protocol error: key_evt_amqp command too long")
        else:
            self._write_upstream(stream[sent:end])
            self._enter_exact(tail, max(0, sent - end))

    def _reset_fast(self) -> None:
        """At a request boundary: hiredis starts afresh, nothing is unfinished."""
        self._commands = hiredis.Reader(notEnoughData=NEED_DATA)
        self._carry, self._pending, self._partial = b"", 0, bytearray()

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
            version = hello_version(command)  # type: ignore[arg-type]  # hiredis gives object; _effect() checked it is a list of bytes
            if version in (2, 3):
                self.resp3 = version == 3

    def _write_upstream(self, data: bytes) -> None:
        if data:
            self._up_write(data)

    def _piped(self) -> bool:
        return self.mode is Mode.PIPE

    def _become_pipe(self) -> None:
        if self.mode is not Mode.CLOSING and self.mode is not Mode.DONE:
            self.mode = Mode.PIPE

    def _done(self) -> None:
        """Redis will answer and close (QUIT, or a protocol error it was sent): read no more."""
        self.mode = Mode.DONE
        self._stop_reading()
        self._held.clear()
        self._held_bytes = 0
        self._exact, self._exact_buf = None, bytearray()
        self._reset_fast()
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(DONE_WAIT, self._done_waited)

    def _done_waited(self) -> None:
        self._timer = None
        if self.mode is Mode.DONE:
            log.warning("Redis did not close a connection after a protocol error or QUIT; closing it")
            if self.upstream is not None:
                self.upstream.close()
            self._fail(None)

    # -- EXACT mode: the streaming exact parser (rule 4) ----------------------------------------

    def _to_exact(self, data: bytes, commands: list[object]) -> None:
        """hiredis must not, or cannot, go on: act on the commands it placed, then hand the rest,
        from the unfinished command's first byte, to the exact parser."""
        stream, sent = self._stream(data)
        placed = framing.locate(stream, commands) if commands else []
        if placed is None:
            self._enter_exact(stream, sent)
            return
        if placed:
            sent = self._walk(stream, placed, sent)
            if sent < 0:
                return
        end = placed[-1][2] if placed else 0
        if self.mode is Mode.PIPE:
            self._write_upstream(stream[sent:])
            self._reset_fast()
            return
        self._write_upstream(stream[sent:end])
        self._enter_exact(stream[end:], max(0, sent - end))

    def _enter_exact(self, stream: bytes, sent: int) -> None:
        """From a request's first byte on, parse exactly; Redis already has ``sent`` bytes of it."""
        if self.upstream is not None:
            self.upstream.keep_spare()  # Redis may refuse what follows and close (rule 5)
        self._reset_fast()
        self.mode = Mode.EXACT
        self._exact = RequestParser(keep=_keep, max_bulk=_LLONG_MAX, max_kept=MAX_ADMIN_BYTES)
        self._exact_buf = bytearray(stream[sent:])
        self._exact_sent = sent
        self._exact.feed(stream)
        self._exact_resume()

    def _exact_feed(self, data: bytes) -> None:
        parser = self._exact
        assert parser is not None
        room = parser.passing_room
        if room and not self._exact_buf:
            # The body of an argument nobody looks at, with nothing before it waiting: it goes to
            # Redis as it came, no copy (a 512 MiB SET streams at the speed of the sockets).
            taken = min(room, len(data))
            parser.absorb(taken)
            self._exact_sent += taken
            self._up_write(data if taken == len(data) else data[:taken])
            if taken == len(data):
                return
            data = data[taken:]
        parser.feed(data)
        self._exact_buf += data
        self._exact_resume()

    def _exact_relay(self, until: int, *, send: bool = True) -> None:
        """Relay (or drop) the buffered bytes up to the parser's offset ``until``."""
        cut = until - self._exact_sent
        if cut <= 0:
            return
        if send:
            with memoryview(self._exact_buf) as view:  # one copy, released before the buffer shrinks
                self._up_write(bytes(view[:cut]))
        del self._exact_buf[:cut]
        self._exact_sent = until

    def _exact_resume(self) -> None:
        parser = self._exact
        until = self._exact_sent  # relayed in one write when the loop stops, not one per request
        while parser is not None and self.mode is Mode.EXACT and not self._pauses:
            try:
                request = parser.next_request()
            except KeptTooLong:
                self._exact_relay(max(until, parser.forwardable))
                self._exact, self._exact_buf = None, bytearray()
                self._refuse_and_close("ERR Protocol error: key_evt_amqp command too long")
                return
            except ProtocolError:
                # Rule 5: Redis gets what we saw, answers with its own error and closes.
                self._exact_relay(self._exact_sent + len(self._exact_buf))
                self._done()
                return
            if request is NEED_DATA:
                self._exact_relay(max(until, parser.forwardable))
                if parser.at_boundary:
                    self.mode = Mode.FAST  # back to hiredis (its reader was reset on the way in)
                    self._exact, self._exact_buf = None, bytearray()
                return
            args = list(request.args)
            effect = _effect(args)
            if effect is None:
                until = request.end
                continue
            if effect is Effect.ADMIN:
                self._exact_relay(request.start)
                self._exact_relay(request.end, send=False)
                if request.end - request.start > MAX_ADMIN_BYTES:  # an inline one (multibulk: KeptTooLong)
                    self._exact, self._exact_buf = None, bytearray()
                    self._refuse_and_close("ERR Protocol error: key_evt_amqp command too long")
                else:
                    self._start_barrier(args)
                return
            if effect is Effect.HELLO and not self.in_multi and hello_version(args) is not None:
                self._exact_relay(request.end)
                self._start_barrier(None, hello=hello_version(args))
                return
            if effect is Effect.QUIT and not self.in_multi:
                self._exact_relay(request.end)
                self._done()
                return
            self._apply(effect, args)
            until = request.end
            if self._piped():  # _apply() may have made it a pipe
                self._write_upstream(bytes(self._exact_buf))  # the rest goes through unparsed
                self._exact, self._exact_buf = None, bytearray()
                return
        self._exact_relay(until)

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
        elif self.mode in (Mode.FAST, Mode.EXACT) and self.barrier is None and not self._eof_sent:
            self._start_barrier(None, drain=True)

    def _refuse_and_close(self, message: str) -> None:
        """A limit of ours: answer it after the replies Redis still owes, then close."""
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
        if self._timer is not None and self.mode is not Mode.DONE:
            self._cancel_timer()
        self._pauses.discard(Pause.BARRIER)
        if self.mode is Mode.EXACT:
            self._exact_resume()  # the parser still holds what followed our command
        self._continue()

    # -- Redis -> client -----------------------------------------------------------------------

    def reply_data(self, data: bytes) -> None:
        self._metrics.client_bytes_out += len(data)
        if self.barrier is None:
            self.transport.write(data)  # type: ignore[union-attr]  # hot path: no reply can come before the transport is set
        else:
            self.barrier.on_replies(data)


def _nowhere(data: bytes) -> None:
    """Stands in for the upstream's write until it is connected (client input is paused)."""


def _effect(command: object) -> Effect | None:
    if command.__class__ is not list or not command or command[0].__class__ is not bytes:
        return None
    return effect_of(command)
