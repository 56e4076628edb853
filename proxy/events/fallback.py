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
from collections.abc import Sequence
from typing import Any

import hiredis

from proxy.config import RedisAddress
from proxy.events.errors import LinkError
from proxy.events.redis_link import RedisLink, open_link

__all__ = ["FallbackList"]

PUSH_CHUNK = 1000  # elements per RPUSH/LPUSH command
OP_TIMEOUT = 10.0  # seconds for one round trip before the link counts as dead


class FallbackList:
    """List operations; each returns what the caller needs to keep exact counts."""

    def __init__(self, address: RedisAddress, key: bytes, connect_timeout: float) -> None:
        self.address = address
        self.key = key
        self.connect_timeout = connect_timeout
        self.length = 0  # as of the last operation
        self._link: RedisLink | None = None
        self._connecting: asyncio.Lock | None = None

    async def _ensure(self) -> RedisLink:
        if self._link is not None and not self._link.closed:
            return self._link
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._link is None or self._link.closed:
                self._link = await open_link(self.address, self.connect_timeout)
        return self._link

    async def run(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[Any]:
        """Send ``commands`` in one write and return their replies (errors as values)."""
        link = await self._ensure()
        futures = link.pipeline(commands)
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), OP_TIMEOUT)
        except asyncio.TimeoutError:
            link.abort(LinkError("Redis did not answer in time"))
            raise LinkError(f"Redis did not answer within {OP_TIMEOUT}s") from None

    async def _checked(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[Any]:
        replies = await self.run(commands)
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise LinkError(f"Redis refused a fallback list command: {reply}")
        return replies

    async def push(self, entries: Sequence[bytes], cap: int, *, front: bool = False) -> int:
        """Append (or, with ``front``, put before the head, keeping their order) and apply the cap.

        Returns how many of the oldest elements the cap dropped.
        """
        if not entries:
            return 0
        if front:
            entries = entries[::-1]  # LPUSH a b c leaves c b a: reverse to keep the order
        verb = b"LPUSH" if front else b"RPUSH"
        commands: list[Sequence[bytes | str | int]] = [
            (verb, self.key, *entries[i:i + PUSH_CHUNK]) for i in range(0, len(entries), PUSH_CHUNK)]
        trim = cap > 0 and self.length + len(entries) > cap
        if trim:
            commands.append((b"LTRIM", self.key, -cap, -1))
        replies = await self._checked(commands)
        length = replies[len(commands) - 2 if trim else -1]
        dropped = max(0, length - cap) if trim else 0
        self.length = length - dropped
        return dropped

    async def read(self, offset: int, count: int) -> list[bytes]:
        """Up to ``count`` elements starting ``offset`` elements after the head."""
        (entries,) = await self._checked([(b"LRANGE", self.key, offset, offset + count - 1)])
        return entries

    async def remove(self, count: int) -> None:
        """Drop the ``count`` oldest elements (after the broker confirmed them)."""
        if count <= 0:
            return
        _, self.length = await self._checked([(b"LTRIM", self.key, count, -1), (b"LLEN", self.key)])

    async def refresh_length(self) -> int:
        (self.length,) = await self._checked([(b"LLEN", self.key)])
        return self.length

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
