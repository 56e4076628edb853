"""A minimal Redis connection for the pipeline: commands with futures, or a stream of pushes.

The proxy's relay never parses replies; the pipeline needs two private connections that do:
the keyspace subscriber (:mod:`proxy.events.source`) and the command link the fallback list and
``CONFIG`` use (:mod:`proxy.events.fallback`). Both are an :class:`asyncio.Protocol` with a
``hiredis.Reader``: no StreamReader, no task per read.

Replies are matched to commands in order. A reply that arrives while no command waits (a pub/sub
message) goes to ``on_push``. Error replies are values (``hiredis.ReplyError``), never raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis

from protocol.commands import encode_command
from proxy.config import RedisAddress
from proxy.connect import open_redis, tls_reason
from proxy.events.errors import LinkError
from proxy.ratelog import RateLimitedLog

__all__ = ["LocatedLink", "RedisLink", "open_link"]

#: A reply may be as large as a key (512 MB in theory); hiredis buffers it. Our commands only read
#: lists of events and short strings, so this is the limit of one unread reply stream.
MAX_PENDING_COMMANDS = 100_000  # commands awaiting replies; more is a bug in the caller

_rlog = RateLimitedLog(logging.getLogger("key_evt_amqp.events.redis"))


class RedisLink(asyncio.Protocol):
    """One connection. Use :func:`open_link`; then :meth:`execute` / :meth:`pipeline`.

    ``on_push(reply)`` receives replies nobody waits for; ``on_lost(exc)`` is called once when the
    connection ends (``exc`` None for a local close).
    """

    def __init__(self, on_push: Callable[[Any], None] | None = None,
                 on_lost: Callable[[BaseException | None], None] | None = None) -> None:
        self._reader = hiredis.Reader()
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self.on_push = on_push
        self.on_lost = on_lost
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream protocol: create_server/create_connection

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters = self._waiters
        on_push = self.on_push
        try:
            while (reply := reader.gets()) is not False:
                if waiters:
                    waiter = waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(reply)
                elif on_push is not None:
                    try:
                        on_push(reply)
                    except Exception:  # a bug in one event must not cost the subscription
                        _rlog.warn("push", "handling a message from Redis failed: %r", reply, exc_info=True)
        except hiredis.ProtocolError as exc:
            self.abort(LinkError(f"bad reply from Redis: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc if exc is not None else None)

    # API
    def execute(self, *args: bytes | str | int) -> asyncio.Future[Any]:
        """Send one command; the future resolves to its reply (or fails with LinkError)."""
        return self.pipeline([args])[0]

    def pipeline(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[asyncio.Future[Any]]:
        """Send several commands in one write; one future per command, in order."""
        if self.closed or self._transport is None:
            raise LinkError("Redis link closed")
        if len(self._waiters) + len(commands) > MAX_PENDING_COMMANDS:
            raise LinkError("too many Redis commands in flight")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._waiters.extend(futures)
        self._transport.write(b"".join(encode_command(*c) for c in commands))
        return futures

    async def request(self, commands: Sequence[Sequence[bytes | str | int]], timeout: float) -> list[Any]:
        """Send ``commands`` in one write and return their replies (errors as values).

        Raises LinkError when the link fails, or when ``timeout`` seconds pass without every reply
        (the link is aborted then: its replies would no longer match their commands).
        """
        futures = self.pipeline(commands)
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except asyncio.TimeoutError:
            self.abort(LinkError("Redis did not answer in time"))
            raise LinkError(f"Redis did not answer within {timeout}s") from None

    def send_unanswered(self, *args: bytes | str | int) -> None:
        """Send a command whose replies go to ``on_push`` (PSUBSCRIBE, PING when subscribed)."""
        if self.closed or self._transport is None:
            raise LinkError("Redis link closed")
        self._transport.write(encode_command(*args))

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the connection now; waiting commands fail with LinkError."""
        if self._transport is not None:
            self._transport.abort()
        self._finish(exc)

    def close(self) -> None:
        self.abort(None)

    def _finish(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        error = LinkError(f"Redis connection lost: {exc}" if exc else "Redis connection closed")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # mark retrieved: a caller may have stopped waiting
        if self.on_lost is not None:
            self.on_lost(exc)


async def open_link(address: RedisAddress, timeout: float, *, select_db: bool = True,
                    on_push: Callable[[Any], None] | None = None,
                    on_lost: Callable[[BaseException | None], None] | None = None) -> RedisLink:
    """Connect, AUTH and SELECT as ``address`` says. Raises LinkError (reason without password)."""
    try:
        _, link = await open_redis(address, lambda: RedisLink(on_push, on_lost), timeout=timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else tls_reason(exc)
        raise LinkError(f"cannot connect to {address.masked_url()}: {reason}") from None
    setup: list[tuple[bytes | str | int, ...]] = []
    if address.password is not None:
        setup.append(("AUTH", address.username, address.password) if address.username
                     else ("AUTH", address.password))
    if select_db and address.db:
        setup.append(("SELECT", address.db))
    if setup:
        try:
            replies = await asyncio.wait_for(asyncio.gather(*link.pipeline(setup)), timeout)
        except (LinkError, asyncio.TimeoutError) as exc:
            link.close()
            raise LinkError(f"Redis setup failed on {address.masked_url()}: {exc!r}") from None
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                link.close()
                raise LinkError(f"Redis refused AUTH/SELECT on {address.masked_url()}: {reply}")
    return link


class LocatedLink:
    """A command link that reconnects on demand, to wherever ``locate()`` says (cluster mode: the
    master of one slot now; otherwise always ``address``). The fallback list and the fleet's
    lease each have one."""

    def __init__(self, address: RedisAddress, connect_timeout: float,
                 locate: Callable[[], RedisAddress] | None = None) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.locate = locate
        self.last_op = 0.0  # time.monotonic() of the last round trip
        self._link: RedisLink | None = None
        self._connecting: asyncio.Lock | None = None

    async def _ensure(self) -> RedisLink:
        if self.locate is not None:
            address = self.locate()
            if address != self.address:  # the slot's master changed (failover, migration)
                self.address = address
                if self._link is not None:
                    self._link.close()
        if self._link is not None and not self._link.closed:
            return self._link
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._link is None or self._link.closed:
                self._link = await open_link(self.address, self.connect_timeout)
        return self._link

    async def run(self, commands: Sequence[Sequence[bytes | str | int]], timeout: float) -> list[Any]:
        """Send ``commands`` in one write and return their replies (errors as values)."""
        link = await self._ensure()
        self.last_op = time.monotonic()
        return await link.request(commands, timeout)

    def reconnect(self) -> None:
        """Drop the connection: the next command opens a new one (where ``locate`` says)."""
        if self._link is not None:
            self._link.close()

    def close(self) -> None:
        self.reconnect()
