"""The source: a dedicated Redis connection subscribed to ``__keyevent@*__:*``.

Redis drops a pub/sub client that reads too slowly, so this reader never waits for anything: each
``pmessage`` is parsed in ``data_received`` and handed synchronously to ``on_event(db, name, key)``.
Whoever receives it must not block either (the service queues it in memory or for the fallback).

When the connection drops, the source reconnects with backoff. Events published meanwhile are lost
by nature (pub/sub is fire and forget); once subscribed again the source calls
``on_gap(start_ms, end_ms)`` *before* the first event of the new subscription, so the marker sits in
the stream exactly where the hole is. The window is chosen so that every write whose event did not
arrive lies inside it:

- start: the last moment up to which every event is known to have arrived. A ``PING <now>`` goes
  out every :data:`PING_INTERVAL`; Redis answers it behind every event it published before, so
  its ``PONG`` proves that nothing executed before the ``PING`` was sent is missing.
- end: the confirmation of the new subscription, which is sent only after ``prepare(link)`` ran on
  the same connection: the service sets ``notify-keyspace-events`` there first (a restarted Redis
  has lost it), so from the confirmation on Redis emits everything selected.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.config import RedisAddress
from proxy.errors import check_cancelled, stopped
from proxy.events.errors import LinkError
from proxy.events.redis_link import RedisLink, open_link
from proxy.events.stream import MARKER_CHANNEL, MARKER_DB

__all__ = ["KeyspaceSource", "SourceState", "parse_channel"]

log = logging.getLogger("key_evt_amqp.events.source")

PATTERN = b"__keyevent@*__:*"
_PREFIX = b"__keyevent@"
PING_INTERVAL = 1.0  # seconds between PINGs: each PONG moves the start of a future gap up
PONG_TIMEOUT = 5.0  # seconds without a PONG before the connection counts as dead
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
                 on_subscribed: Callable[[], None],
                 prepare: Callable[[RedisLink], Awaitable[None]] | None = None) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.on_event = on_event
        self.on_gap = on_gap
        self.on_subscribed = on_subscribed
        #: runs on each new connection before it subscribes; raises LinkError to retry
        self.prepare = prepare
        self.state = SourceState.STOPPED
        self.last_error = ""
        self.last_error_ms = 0  # when it last happened (Unix ms)
        self.last_error_current = False  # until the subscription is back
        self.reconnects = 0
        self._channels: dict[bytes, tuple[int, bytes] | None] = {}
        self._link: RedisLink | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost_at_ms: int | None = None
        #: every event of a write Redis executed before this moment (Unix ms) has arrived
        self._good_ms = 0
        self._last_pong = 0.0  # time.monotonic() of the last PONG (or of the subscription)
        self._lost: asyncio.Future[None] | None = None
        #: the SUBSCRIBE to the fleet's marker channel is not answered yet
        self._marker_sub_pending = False
        self.markers_refused = ""  # why Redis refused that SUBSCRIBE (ACL channel rules)
        #: Sentinel moved the master: the next gap starts at this moment at the latest (move())
        self._moved_ms: int | None = None
        self._wake = asyncio.Event()  # cuts a reconnect backoff short

    @property
    def state_name(self) -> str:
        """The state as ``key_evt_amqp.info`` shows it (``source_state``)."""
        return self.state.value

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="keyspace-source")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await stopped([task])
        if self._link is not None:
            self._link.close()
        self.state = SourceState.STOPPED

    def _subscribe(self, link: RedisLink) -> None:
        """The keyspace pattern, then the fleet's checkpoint markers (``stream.py``) on the same
        connection: Redis delivers both in the order it publishes them."""
        link.send_unanswered("PSUBSCRIBE", PATTERN)
        link.send_unanswered("SUBSCRIBE", MARKER_CHANNEL)
        self._marker_sub_pending = True

    def _marker_refused(self, reply: Any) -> bool:
        """An error reply that answers the marker SUBSCRIBE (ACL channel rules): the events still
        flow; this instance cannot follow checkpoints (it stays a lone forwarder or a blind standby)."""
        if not self._marker_sub_pending or self.state is not SourceState.SUBSCRIBED:
            return False
        self._marker_sub_pending = False
        if not self.markers_refused:
            log.warning("keyspace source: Redis refused SUBSCRIBE %s (%s): fleet checkpoints are not "
                        "followed; allow the channel to the proxy's Redis user (&%s)",
                        MARKER_CHANNEL.decode(), reply, MARKER_CHANNEL.decode())
        self.markers_refused = str(reply)
        return True

    def move(self, since_ms: int) -> None:
        """Sentinel made another server the master: subscribe again (:func:`~proxy.connect.open_redis`
        now leads there). Writes on the new master may have begun at ``since_ms``: the gap marker of
        the switch starts there at the latest, and ends with the new subscription's confirmation."""
        self._moved_ms = since_ms if self._moved_ms is None else min(self._moved_ms, since_ms)
        if self._link is not None and not self._link.closed:
            self._link.abort(LinkError("the master changed"))
        self._wake.set()

    def _on_push(self, reply: Any) -> None:
        # Hot path: one call per keyspace event.
        if type(reply) is not list:  # an error reply: PSUBSCRIBE refused (ACL without &*), ...
            if self._marker_refused(reply):
                return
            self._note_error(f"Redis refused the subscription: {reply}")
            if self._link is not None:
                self._link.abort()
            return
        if reply[0] == b"pmessage":
            channel = reply[2]
            if channel in self._channels:
                parsed = self._channels[channel]
            else:
                if len(self._channels) >= CHANNEL_CACHE_LIMIT:
                    self._channels.clear()
                parsed = self._channels[channel] = parse_channel(channel)
            if parsed is not None:
                self.on_event(parsed[0], parsed[1], reply[3])
        elif reply[0] == b"message":
            if reply[1] == MARKER_CHANNEL:
                self.on_event(MARKER_DB, b"", reply[2])
        elif reply[0] == b"psubscribe":
            self._subscribed()
        elif reply[0] == b"subscribe":
            self._marker_sub_pending = False
            self.markers_refused = ""
        elif reply[0] == b"pong":
            self._pong(reply)

    def _pong(self, reply: list[Any]) -> None:
        """``["pong", b"<ms the PING was sent>"]``: nothing executed before then is missing."""
        self._last_pong = time.monotonic()
        try:
            self._good_ms = max(self._good_ms, int(reply[1]))
        except (IndexError, TypeError, ValueError):
            pass

    def _subscribed(self) -> None:
        self.state = SourceState.SUBSCRIBED
        if self.last_error_current or not self.last_error_ms:
            log.info("keyspace source: subscribed to %s%s", self.address.masked_url(),
                     " again" if self.last_error_ms else "")
        self.last_error_current = False
        now = self._good_ms = now_ms()
        self._last_pong = time.monotonic()
        starts = [s for s in (self._lost_at_ms, self._moved_ms) if s is not None]
        self._lost_at_ms = self._moved_ms = None
        if starts:
            start = min(starts)
            self.on_gap(start, max(start, now))
        self.on_subscribed()

    def _on_lost(self, exc: BaseException | None) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    async def _run(self) -> None:
        delay = RECONNECT_MIN
        loop = asyncio.get_running_loop()
        while True:
            check_cancelled()
            self.state = SourceState.CONNECTING
            self._lost = loop.create_future()
            link: RedisLink | None = None
            try:
                link = self._link = await open_link(self.address, self.connect_timeout, select_db=False,
                                                    on_push=self._on_push, on_lost=self._on_lost)
                if self.prepare is not None:
                    await self.prepare(link)
                self._subscribe(link)
            except LinkError as exc:
                if link is not None:
                    link.close()
                self._note_error(str(exc))
                self.state = SourceState.BACKOFF
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_MIN
            await self._watch(link, self._lost)
            if self._lost_at_ms is None and self.state is SourceState.SUBSCRIBED:
                self._lost_at_ms = self._good_ms
                self.reconnects += 1
            self._note_error(f"subscription to {self.address.masked_url()} lost")
            self.state = SourceState.BACKOFF
            await asyncio.sleep(RECONNECT_MIN)

    async def _watch(self, link: RedisLink, lost: asyncio.Future[None]) -> None:
        """Return when the link is lost; PING it every :data:`PING_INTERVAL` (see the module
        docstring) and give up on it after :data:`PONG_TIMEOUT` without a PONG."""
        self._last_pong = time.monotonic()
        while not lost.done():
            try:
                await asyncio.wait_for(asyncio.shield(lost), PING_INTERVAL)
            except asyncio.TimeoutError:
                if time.monotonic() - self._last_pong > PONG_TIMEOUT:
                    link.abort(LinkError("no PONG from Redis"))
                    return
                try:
                    link.send_unanswered("PING", now_ms())
                except LinkError:
                    return

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("keyspace source: %s", message)
        self.last_error, self.last_error_ms, self.last_error_current = message, now_ms(), True
