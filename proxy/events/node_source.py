"""One master's keyspace source in cluster mode, never forwarding what a replica emitted.

**No event twice.** A replica re-executes its master's writes and publishes events for them too;
a master demoted by a failover keeps its pub/sub clients and starts doing just that. So a source
never forwards an event it cannot prove a *master* emitted: its connection speaks RESP3 (where a
subscribed client may run any command), events are held in memory as they arrive, and a ``ROLE``
is sent behind them (one at a time, only while events wait, plus one per second when idle). Redis
answers in stream order, so a ``master`` reply certifies every event received before it: they are
released to the pipeline. A ``slave`` reply drops the held ones (counted, covered by a gap marker)
and the source stops reading that node for good. Cost: one ``ROLE`` per batch of events, and the
events wait one round trip.

:class:`NodeSource` is the single-node :class:`~proxy.events.source.KeyspaceSource` with that
guard; :class:`~proxy.events.cluster_source.ClusterSources` keeps one per master.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis

from proxy.cluster.topology import Address
from proxy.config import RedisAddress
from proxy.errors import check_cancelled
from proxy.events.errors import LinkError
from proxy.events.message import encode_headers
from proxy.events.redis_link import RedisLink, open_link
from proxy.events.source import KeyspaceSource, SourceState, now_ms, parse_channel
from proxy.events.stream import MARKER_CHANNEL, MARKER_DB

__all__ = ["NodeSource", "node_name"]

log = logging.getLogger("key_evt_amqp.events.cluster")

_Push = hiredis.PushNotification
IDLE_PROBE = 1.0  # seconds between ROLE probes on an idle subscription
ROLE_TIMEOUT = 5.0  # seconds without the answer to a ROLE before the connection counts as dead
RECONNECT_MAX = 1.0  # a master's source retries at least this often
PAUSE_WINDOW_MS = 10_000  # the longest client pause of a manual failover (2 x CLUSTER_MF_TIMEOUT)


def node_name(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"



class NodeSource(KeyspaceSource):
    """The keyspace source of one master, with the ``ROLE`` guard described above."""

    def __init__(self, address: RedisAddress, connect_timeout: float,
                 on_event: Callable[[int, bytes, bytes], None],
                 on_gap: Callable[[int, int], None],
                 on_subscribed: Callable[[], None],
                 on_trouble: Callable[[], None],
                 prepare: Callable[[RedisLink], Awaitable[None]] | None = None) -> None:
        super().__init__(address, connect_timeout, on_event, on_gap, on_subscribed, prepare)
        self.on_trouble = on_trouble
        self.fleet_stream: object = None  # the fleet's Stream of this master (events/fleet.py)
        self.created_ms = now_ms()
        self.headers: tuple[tuple[bytes, bytes], ...] = ()
        self.extra = b""
        self.shard = ""
        self.node_id = ""
        self.confirmed = False  # the current subscription's ROLE said master
        self.ever_confirmed = False
        self.confirmed_at_ms = 0
        self.certified_ms = 0  # when the last ROLE that Redis answered with master was sent
        self.last_event_ms = 0  # the same, for the last ROLE that released events
        self.demoted = False
        self.events = 0
        self.dropped = 0  # held events dropped (node demoted or lost before a ROLE answer)
        self.probes = 0
        self._held: list[tuple[int, bytes, bytes]] = []
        self._probe_out = False
        self._probe_sent = 0.0
        self._probe_sent_ms = 0

    def set_identity(self, node_id: str, shard: str, address: Address) -> None:
        self.node_id, self.shard = node_id, shard
        self.headers = ((b"node", node_name(address).encode()), (b"shard", shard.encode()))
        self.extra = encode_headers(self.headers)

    def gap_start_ms(self) -> int:
        """Where the window of possibly lost events of this node begins."""
        if self._lost_at_ms is not None:
            return self._lost_at_ms
        if not self.ever_confirmed:
            return self.created_ms
        return max(self.last_event_ms, self.certified_ms - PAUSE_WINDOW_MS)

    @property
    def state_name(self) -> str:
        if self.demoted:
            return "demoted"
        if self.state is SourceState.SUBSCRIBED and not self.confirmed:
            return "confirming"
        return self.state.value

    # ---- the stream ------------------------------------------------------------------------------

    def _on_push(self, reply: Any) -> None:
        # Hot path: one call per keyspace event (RESP3: events are push messages).
        kind = type(reply)
        if kind is _Push:
            if reply[0] == b"pmessage":
                channel = reply[2]
                if channel in self._channels:
                    parsed = self._channels[channel]
                else:
                    if len(self._channels) >= 4096:
                        self._channels.clear()
                    parsed = self._channels[channel] = parse_channel(channel)
                if parsed is not None:
                    self._held.append((parsed[0], parsed[1], reply[3]))
                    if not self._probe_out:
                        self._probe()
            elif reply[0] == b"message":
                if reply[1] == MARKER_CHANNEL:  # a fleet checkpoint: held in its place, as events
                    self._held.append((MARKER_DB, b"", reply[2]))
                    if not self._probe_out:
                        self._probe()
            elif reply[0] == b"psubscribe":
                self.state = SourceState.SUBSCRIBED
                if not self._probe_out:
                    self._probe()
            elif reply[0] == b"subscribe":
                self._marker_sub_pending = False
                self.markers_refused = ""
            elif reply[0] == b"pong":
                self._last_pong = time.monotonic()
        elif kind is list:  # the ROLE reply
            self._probe_out = False
            if reply and reply[0] == b"master":
                self._certified()
            else:
                self._demoted(reply)
        elif kind is bytes:  # +PONG
            self._last_pong = time.monotonic()
        elif self._marker_refused(reply):
            pass
        else:  # an error reply: PSUBSCRIBE or ROLE refused
            self._probe_out = False
            self._note_error(f"Redis refused the subscription or ROLE: {reply}")
            if self._link is not None:
                self._link.abort()

    def _probe(self) -> None:
        if self._link is None or self._link.closed:
            return
        self._probe_out = True
        self._probe_sent = time.monotonic()
        self._probe_sent_ms = now_ms()
        self.probes += 1
        self._link.send_unanswered("ROLE")

    def _certified(self) -> None:
        now = now_ms()
        # Redis ran the ROLE after it was sent: every event of a write executed before the send
        # arrived ahead of this reply (a later gap may start there, not at the reply)
        sent = self._probe_sent_ms
        self.certified_ms = sent
        if not self.confirmed:
            self.confirmed = self.ever_confirmed = True
            self.confirmed_at_ms = now
            self.last_error_current = False
            if self._lost_at_ms is not None:  # back on the same node, still a master
                start, self._lost_at_ms = self._lost_at_ms, None
                self.on_gap(start, now)
            self.on_subscribed()  # the manager's gap marker for this shard goes first
        held = self._held
        if held:
            self._held = []
            self.last_event_ms = sent
            self.events += len(held)
            on_event = self.on_event
            for db, name, key in held:
                on_event(db, name, key)
            if self._held and not self._probe_out:
                self._probe()

    def _demoted(self, reply: Any) -> None:
        if self._held:
            self.dropped += len(self._held)
            self._held = []
        if not self.demoted:
            log.warning("keyspace source %s: the node is no longer a master (%r); not reading it",
                        node_name((self.address.host, self.address.port)), reply[:1])
        self.demoted = True
        if self._link is not None:
            self._link.abort()
        self.on_trouble()

    # ---- connection ------------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.1
        loop = asyncio.get_running_loop()
        while not self.demoted:
            check_cancelled()
            self.state = SourceState.CONNECTING
            self.confirmed = False
            self._probe_out = False
            self._lost = loop.create_future()
            try:
                link = await open_link(self.address, self.connect_timeout, select_db=False,
                                       on_push=self._on_push, on_lost=self._on_lost)
                self._link = link
                if self.prepare is not None:
                    # notify-keyspace-events on this very node before subscribing (as source.py)
                    try:
                        await self.prepare(link)
                    except LinkError:
                        link.close()
                        raise
                try:
                    hello = await asyncio.wait_for(link.execute("HELLO", "3"), self.connect_timeout)
                except asyncio.TimeoutError:
                    link.close()
                    raise LinkError("no answer to HELLO 3") from None
                if isinstance(hello, hiredis.ReplyError):
                    link.close()
                    raise LinkError(f"HELLO 3 refused (Redis 6 or later is needed in cluster mode): {hello}")
                self._subscribe(link)
            except LinkError as exc:
                self._note_error(str(exc))
                if self._lost_at_ms is None and self.ever_confirmed:
                    self._lost_at_ms = self.gap_start_ms()
                self.state = SourceState.BACKOFF
                self.on_trouble()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = 0.1
            await self._watch(link, self._lost)
            if self._held:  # never certified: they may be a demoted node's replicated writes
                self.dropped += len(self._held)
                self._held = []
            if self._lost_at_ms is None and self.ever_confirmed:
                self._lost_at_ms = self.gap_start_ms()
                self.reconnects += 1
            self.confirmed = False
            if not self.demoted:
                self._note_error(f"subscription to {self.address.masked_url()} lost")
                self.state = SourceState.BACKOFF
                self.on_trouble()
                await asyncio.sleep(0.1)
        self.state = SourceState.STOPPED

    async def _watch(self, link: RedisLink, lost: asyncio.Future[None]) -> None:
        """Return when the link is lost; ``ROLE`` every second when idle, and a ``ROLE`` unanswered
        for :data:`ROLE_TIMEOUT` seconds counts as a dead node."""
        while not lost.done():
            try:
                await asyncio.wait_for(asyncio.shield(lost), IDLE_PROBE)
            except asyncio.TimeoutError:
                if self._probe_out:
                    if time.monotonic() - self._probe_sent >= ROLE_TIMEOUT:
                        link.abort(LinkError("no answer to ROLE from Redis"))
                        return
                    continue
                try:
                    self._probe()
                except LinkError:
                    return
