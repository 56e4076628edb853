"""The fallback list in Redis: where events wait while the broker cannot take them.

An ordinary list under ``config.fallback_key`` in the upstream's db, written at the tail, read and
removed at the head (FIFO), one element per event in the format of :func:`message.dump_entry`.
Every operation here is one pipelined round trip on a private connection, reconnected on demand;
a dead Redis raises :class:`~proxy.events.errors.LinkError` and the caller retries later.

Size: ``cap > 0`` keeps the newest ``cap`` elements (``LTRIM -cap -1`` right after the push, the
oldest are dropped and counted by the caller), ``cap == 0`` is unlimited. ``cap < 0`` (off) is
handled by the caller: nothing is written then.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any

import hiredis

from proxy.config import RedisAddress
from proxy.events.errors import LinkError
from proxy.events.message import Event, dump_entry, load_entry
from proxy.events.redis_link import RedisLink, open_link

__all__ = ["FallbackList"]

PUSH_CHUNK = 1000  # elements per RPUSH/LPUSH command
OP_TIMEOUT = 10.0  # seconds for one round trip before the link counts as dead
MIRROR_LIMIT = 200_000  # newest list elements kept in memory to replay without LRANGE (0: off)


class FallbackList:
    """List operations; each returns what the caller needs to keep exact counts.

    The list's tail is mirrored in memory (:data:`MIRROR_LIMIT` events): what we just pushed is
    what the replayer reads next, so a read inside the mirror costs one ``LINDEX`` + ``LLEN`` to
    check that the list is still what we wrote (a unique message id at the batch's last position)
    instead of an ``LRANGE`` and a parse per element. Any surprise (a write by someone else, a new
    connection, a length we did not expect) empties the mirror and reads go to Redis again.
    """

    def __init__(self, address: RedisAddress, key: bytes, connect_timeout: float,
                 locate: Callable[[], RedisAddress] | None = None,
                 on_moved: Callable[[str], None] | None = None) -> None:
        self.address = address
        self.key = key
        self.connect_timeout = connect_timeout
        #: cluster mode: where the key's slot lives now (asked before each operation), and who
        #: hears about a ``MOVED`` (the topology)
        self.locate = locate
        self.on_moved = on_moved
        self.length = 0  # as of the last operation
        self.mirror_reads = 0
        self._mirror: deque[Event] = deque()
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
                self._mirror.clear()  # a new connection: the list may have changed meanwhile
                self._link = await open_link(self.address, self.connect_timeout)
        return self._link

    async def run(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[Any]:
        """Send ``commands`` in one write and return their replies (errors as values)."""
        link = await self._ensure()
        return await link.request(commands, OP_TIMEOUT)

    async def _checked(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[Any]:
        replies = await self.run(commands)
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                self._mirror.clear()
                text = str(reply)
                if text.startswith(("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN", "READONLY")):
                    # cluster mode: the slot is elsewhere now; reconnect where the map says
                    if self._link is not None:
                        self._link.close()
                    if self.on_moved is not None:
                        self.on_moved(text)
                raise LinkError(f"Redis refused a fallback list command: {reply}")
        return replies

    def _now_length(self, length: int, expected: int) -> None:
        """Record the list length after an operation; forget the mirror if it is not as expected."""
        if length != expected:
            self._mirror.clear()
        self.length = length
        mirror = self._mirror
        while len(mirror) > min(length, MIRROR_LIMIT):
            mirror.popleft()

    async def push(self, events: Sequence[Event], cap: int, *, front: bool = False) -> int:
        """Append (or, with ``front``, put before the head, keeping their order) and apply the cap.

        Returns how many of the oldest elements the cap dropped.
        """
        if not events:
            return 0
        entries = [dump_entry(e) for e in events]
        if front:
            entries.reverse()  # LPUSH a b c leaves c b a: reverse to keep the order
        verb = b"LPUSH" if front else b"RPUSH"
        commands: list[Sequence[bytes | str | int]] = [
            (verb, self.key, *entries[i:i + PUSH_CHUNK]) for i in range(0, len(entries), PUSH_CHUNK)]
        trim = cap > 0 and self.length + len(entries) > cap
        if trim:
            commands.append((b"LTRIM", self.key, -cap, -1))
        expected = self.length + len(entries)
        replies = await self._checked(commands)
        length = replies[len(commands) - 2 if trim else -1]
        if not front and length == expected:
            self._mirror.extend(events)
        dropped = max(0, length - cap) if trim else 0
        self._now_length(length - dropped, expected - dropped)
        return dropped

    async def read(self, offset: int, count: int, now_ms: int) -> list[Event | None]:
        """Up to ``count`` events starting ``offset`` elements after the head; None stands for an
        element that is not an event (see :func:`message.load_entry`)."""
        mirror = self._mirror
        start = self.length - len(mirror)
        if mirror and offset >= start and offset < self.length:
            first = offset - start
            events = list(islice(mirror, first, first + count))
            last = offset + len(events) - 1
            entry, length = await self._checked([(b"LINDEX", self.key, last), (b"LLEN", self.key)])
            if length == self.length and entry == dump_entry(events[-1]):
                self.mirror_reads += 1
                return events
            self._now_length(length, -1)  # not what we wrote: read it from Redis
        (entries,) = await self._checked([(b"LRANGE", self.key, offset, offset + count - 1)])
        return [load_entry(entry, now_ms) for entry in entries]

    async def remove(self, count: int) -> None:
        """Drop the ``count`` oldest elements (after the broker confirmed them)."""
        if count <= 0:
            return
        expected = max(0, self.length - count)
        _, length = await self._checked([(b"LTRIM", self.key, count, -1), (b"LLEN", self.key)])
        self._now_length(length, expected)

    async def refresh_length(self) -> int:
        (length,) = await self._checked([(b"LLEN", self.key)])
        self._now_length(length, self.length)
        return self.length

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
