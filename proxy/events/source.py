"""The source: a dedicated Redis connection subscribed to ``__keyevent@*__:*``.

Redis drops a pub/sub client that reads too slowly, so this reader never waits for anything: each
``pmessage`` is parsed in ``data_received`` and handed synchronously to ``on_event(db, name, key)``.
Whoever receives it must not block either (the service queues it in memory or for the fallback).

When the connection drops, the source reconnects with backoff. Events published meanwhile are lost
by nature (pub/sub is fire and forget); once subscribed again the source calls
``on_gap(start_ms, end_ms)`` *before* the first event of the new subscription, so the marker sits in
the stream exactly where the hole is.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

from proxy.config import RedisAddress
from proxy.events.errors import LinkError
from proxy.events.redis_link import RedisLink, open_link

__all__ = ["KeyspaceSource", "SourceState", "parse_channel"]

log = logging.getLogger("proxy.events.source")

PATTERN = b"__keyevent@*__:*"
_PREFIX = b"__keyevent@"
PING_INTERVAL = 5.0  # seconds between liveness PINGs on an idle subscription
RECONNECT_MIN = 0.1
RECONNECT_MAX = 5.0
#: Distinct channels remembered (db x event name); past it the cache is cleared and refilled.
CHANNEL_CACHE_LIMIT = 4096


class SourceState(enum.Enum):
    STOPPED = "stopped"
    CONNECTING = "connecting"
    SUBSCRIBED = "subscribed"
    BACKOFF = "backoff"


def parse_channel(channel: bytes) -> tuple[int, bytes] | None:
    """``__keyevent@3__:set`` -> ``(3, b"set")``; None for anything else."""
    if not channel.startswith(_PREFIX):
        return None
    end = channel.find(b"__:", len(_PREFIX))
    if end < 0:
        return None
    try:
        db = int(channel[len(_PREFIX):end])
    except ValueError:
        return None
    return db, channel[end + 3:]


def now_ms() -> int:
    return int(time.time() * 1000)


class KeyspaceSource:
    """Subscribe, reconnect, report gaps. ``start()`` once, ``stop()`` once."""

    def __init__(self, address: RedisAddress, connect_timeout: float,
                 on_event: Callable[[int, bytes, bytes], None],
                 on_gap: Callable[[int, int], None],
                 on_subscribed: Callable[[], None]) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.on_event = on_event
        self.on_gap = on_gap
        self.on_subscribed = on_subscribed
        self.state = SourceState.STOPPED
        self.last_error = ""
        self.last_error_ms = 0  # when it last happened (Unix ms)
        self.last_error_current = False  # until the subscription is back
        self.reconnects = 0
        self._channels: dict[bytes, tuple[int, bytes] | None] = {}
        self._link: RedisLink | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost_at_ms: int | None = None
        self._pong_due = False
        self._lost: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="keyspace-source")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._link is not None:
            self._link.close()
        self.state = SourceState.STOPPED

    def _on_push(self, reply: Any) -> None:
        # Hot path: one call per keyspace event.
        if type(reply) is not list:  # an error reply: PSUBSCRIBE refused (ACL without &*), ...
            self._note_error(f"Redis refused the subscription: {reply}")
            if self._link is not None:
                self._link.abort()
            return
        if reply[0] == b"pmessage":
            channel = reply[2]
            parsed = self._channels.get(channel, False)
            if parsed is False:
                if len(self._channels) >= CHANNEL_CACHE_LIMIT:
                    self._channels.clear()
                parsed = self._channels[channel] = parse_channel(channel)
            if parsed is not None:
                self.on_event(parsed[0], parsed[1], reply[3])
        elif reply[0] == b"psubscribe":
            self._subscribed()
        elif reply[0] == b"pong":
            self._pong_due = False

    def _subscribed(self) -> None:
        self.state = SourceState.SUBSCRIBED
        self.last_error_current = False
        if self._lost_at_ms is not None:
            start, self._lost_at_ms = self._lost_at_ms, None
            self.on_gap(start, now_ms())
        self.on_subscribed()

    def _on_lost(self, exc: BaseException | None) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    async def _run(self) -> None:
        delay = RECONNECT_MIN
        loop = asyncio.get_running_loop()
        while True:
            self.state = SourceState.CONNECTING
            self._lost = loop.create_future()
            try:
                self._link = await open_link(self.address, self.connect_timeout, select_db=False,
                                             on_push=self._on_push, on_lost=self._on_lost)
                self._link.send_unanswered("PSUBSCRIBE", PATTERN)
            except LinkError as exc:
                self._note_error(str(exc))
                self.state = SourceState.BACKOFF
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_MIN
            await self._watch(self._link, self._lost)
            if self._lost_at_ms is None and self.state is SourceState.SUBSCRIBED:
                self._lost_at_ms = now_ms()
                self.reconnects += 1
            self._note_error(f"subscription to {self.address.masked_url()} lost")
            self.state = SourceState.BACKOFF
            await asyncio.sleep(RECONNECT_MIN)

    async def _watch(self, link: RedisLink, lost: asyncio.Future[None]) -> None:
        """Return when the link is lost; PING it when idle so a dead peer is noticed."""
        self._pong_due = False
        while not lost.done():
            try:
                await asyncio.wait_for(asyncio.shield(lost), PING_INTERVAL)
            except asyncio.TimeoutError:
                if self._pong_due:
                    link.abort(LinkError("no PONG from Redis"))
                    return
                self._pong_due = True
                try:
                    link.send_unanswered("PING")
                except LinkError:
                    return

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("keyspace source: %s", message)
        self.last_error, self.last_error_ms, self.last_error_current = message, now_ms(), True
