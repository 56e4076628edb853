"""Cluster mode: one keyspace source per master, following failovers, never reading a replica.

Keyspace notifications are node-local (``docs/cluster.md``, "Events"), so :class:`ClusterSources`
keeps one :class:`NodeSource` (the single-node :class:`~proxy.events.source.KeyspaceSource`, one
instance per master) for every master in the topology's slot map, all feeding the one pipeline.

**No event twice.** A replica re-executes its master's writes and publishes events for them too;
a master demoted by a failover keeps its pub/sub clients and starts doing just that. So a source
never forwards an event it cannot prove a *master* emitted: its connection speaks RESP3 (where a
subscribed client may run any command), events are held in memory as they arrive, and a ``ROLE``
is sent behind them (one at a time, only while events wait, plus one per second when idle). Redis
answers in stream order, so a ``master`` reply certifies every event received before it: they are
released to the pipeline. A ``slave`` reply drops the held ones (counted, covered by a gap marker)
and the source stops reading that node for good. Cost: one ``ROLE`` per batch of events, and the
events wait one round trip.

**Failover.** When a master's subscription is lost, or its ``ROLE`` says ``slave``, the map is
polled every 0.2 s (instead of every 5 s) until it shows another master for those slots; the new
master gets a source, the old one is dropped, and once the new source's first ``ROLE`` says
``master`` a gap marker naming the shard (slot ranges), the old node and the new one is published
*before* the new master's first event. The marker's window starts at the last event the old master
delivered (at most 10 s before its last ``ROLE`` confirmation: the longest pause of a manual
failover), and ends when the new subscription was confirmed. Each connection sets the node's
``notify-keyspace-events`` *before* it subscribes (a restarted node has forgotten it), so from that
confirmation on the node emits everything selected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis

from protocol.events import notify_flags_update, parse_classes
from proxy.cluster.topology import Address, SlotMap, Topology, query
from proxy.config import RedisAddress
from proxy.events.errors import LinkError
from proxy.events.flags import ensure_notify_flags
from proxy.events.message import encode_headers
from proxy.events.redis_link import RedisLink, open_link
from proxy.events.source import PATTERN, KeyspaceSource, SourceState, now_ms, parse_channel
from proxy.live import LiveConfig

__all__ = ["ClusterSources", "NodeSource", "shard_label"]

log = logging.getLogger("proxy.events.cluster")

_Push = hiredis.PushNotification
IDLE_PROBE = 1.0  # seconds between ROLE probes on an idle subscription
ROLE_TIMEOUT = 5.0  # seconds without the answer to a ROLE before the connection counts as dead
RECONNECT_MAX = 1.0  # a master's source retries at least this often
FAST_POLL = 0.2  # seconds between map refreshes while a shard is not covered
SLOW_POLL = 1.0  # seconds between map refreshes otherwise
FLAGS_INTERVAL = 5.0  # seconds between checks of notify-keyspace-events on every node
PAUSE_WINDOW_MS = 10_000  # the longest client pause of a manual failover (2 x CLUSTER_MF_TIMEOUT)

Headers = tuple[tuple[bytes, bytes], ...]
#: ``(db, event name, key, headers, encoded headers)``: one event a master emitted, certified
OnEvent = Callable[[int, bytes, bytes, Headers, bytes], None]
#: ``(start_ms, end_ms, source node, headers)``: a shard's events in that window may be lost
OnGap = Callable[[int, int, bytes, Headers], None]
#: ``(summary, error)``: notify-keyspace-events as the nodes have it now, and what went wrong
OnFlags = Callable[[str, str], None]


def shard_label(slot_map: SlotMap, address: Address) -> str:
    """The slot ranges ``address`` owns: ``0-5460`` or ``0-100,200-5460``."""
    ranges: list[str] = []
    start = -1
    owners = slot_map.owners
    for slot in range(len(owners) + 1):
        mine = slot < len(owners) and owners[slot] == address
        if mine and start < 0:
            start = slot
        elif not mine and start >= 0:
            ranges.append(f"{start}-{slot - 1}")
            start = -1
    return ",".join(ranges)


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
                parsed = self._channels.get(channel, False)
                if parsed is False:
                    if len(self._channels) >= 4096:
                        self._channels.clear()
                    parsed = self._channels[channel] = parse_channel(channel)
                if parsed is not None:
                    self._held.append((parsed[0], parsed[1], reply[3]))
                    if not self._probe_out:
                        self._probe()
            elif reply[0] == b"psubscribe":
                self.state = SourceState.SUBSCRIBED
                if not self._probe_out:
                    self._probe()
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
                link.send_unanswered("PSUBSCRIBE", PATTERN)
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


class ClusterSources:
    """Keeps one :class:`NodeSource` per master of ``topology``; the service's ``source``.

    Every master's certified events go to ``on_event``, gap markers to ``on_gap``, and the state of
    ``notify-keyspace-events`` on the nodes to ``on_flags``. Nodes are reached with ``upstream``'s
    credentials; the event classes and the connect timeout are read from ``live`` when needed.
    """

    def __init__(self, topology: Topology, upstream: RedisAddress, live: LiveConfig, *,
                 on_event: OnEvent, on_gap: OnGap, on_flags: OnFlags) -> None:
        self.topology = topology
        self.upstream = upstream
        self.live = live
        self.on_event = on_event
        self.on_gap = on_gap
        self.on_flags = on_flags
        self.sources: dict[Address, NodeSource] = {}
        self.first_slots: dict[Address, int] = {}
        #: gaps waiting for the new master of a shard to be confirmed, by the new master's address
        self.pending: dict[Address, list[tuple[int, Address, str, str]]] = {}
        self.shard_gaps: dict[str, dict[str, Any]] = {}
        self.notify: dict[Address, str] = {}  # node -> its notify-keyspace-events
        self.notify_errors: dict[Address, str] = {}
        self.switches = 0
        self.dropped_retired = 0  # dropped_unconfirmed of the sources already retired
        self._retired: list[NodeSource] = []
        self._wake = asyncio.Event()
        self._flags_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._seen_map: SlotMap | None = None
        self._masters: list[Address] = []
        self._labels: dict[Address, str] = {}
        self._first: dict[Address, int] = {}

    # ---- the interface of KeyspaceSource, as the service uses it ------------------------------

    @property
    def reconnects(self) -> int:
        return sum(s.reconnects for s in self.sources.values())

    @property
    def state_name(self) -> str:
        if self._stopping:
            return "stopped"
        if not self.sources:
            return "connecting"
        if all(s.confirmed for s in self.sources.values()):
            return "subscribed"
        return "degraded"

    async def start(self) -> None:
        self.topology.listeners.append(self._wake.set)
        loop = asyncio.get_running_loop()
        self._reconcile()
        self._tasks = [loop.create_task(self._follow(), name="cluster-sources"),
                       loop.create_task(self._flags_loop(), name="cluster-notify-flags")]

    async def stop(self) -> None:
        self._stopping = True
        if self._wake.set in self.topology.listeners:
            self.topology.listeners.remove(self._wake.set)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in [*self.sources.values(), *self._retired]),
                             return_exceptions=True)

    def check_flags_soon(self) -> None:
        self._flags_wanted.set()

    # ---- following the map -------------------------------------------------------------------------

    def _trouble(self) -> None:
        self.topology.refresh_soon()
        self._wake.set()

    async def _follow(self) -> None:
        while True:
            degraded = not self.sources or not all(s.confirmed for s in self.sources.values())
            try:
                await asyncio.wait_for(self._wake.wait(), FAST_POLL if degraded else SLOW_POLL)
            except asyncio.TimeoutError:
                self.topology.refresh_soon()
            self._wake.clear()
            try:
                self._reconcile()
            except Exception:  # noqa: BLE001 - a bug here must not stop following the cluster
                log.exception("following the cluster map failed")
            await self._reap_retired()

    def _reconcile(self) -> None:
        """Add a source for every master of the map; retire the sources that no longer count.

        A source whose ``ROLE`` still says master is kept even when the map no longer lists it:
        maps read from a node that has not heard of a failover yet would make a new master's
        source come and go. It leaves when its ``ROLE`` says ``slave`` (or its connection is lost)
        and the map names someone else.
        """
        slot_map = self.topology.full_map  # not the MOVED-patched one: shard labels need whole maps
        if slot_map is None or self._stopping:
            return
        if slot_map is not self._seen_map:
            self._seen_map = slot_map
            owners = slot_map.owners
            self._masters = [m for m in slot_map.masters if m in owners]
            self._labels = {m: shard_label(slot_map, m) for m in self._masters}
            self._first = {m: owners.index(m) for m in self._masters}
            if any(n not in self.notify for n in (*slot_map.masters, *slot_map.replicas)):
                self.check_flags_soon()  # a node we have not configured yet (a replica that joined)
        for address in self._masters:
            source = self.sources.get(address)
            if source is not None and source.demoted:  # listed as master again: look again
                self._retire(address, address)
                source = None
            if source is None:
                source = self._add(address)
                self.check_flags_soon()
            shard = self._labels[address]
            if shard != source.shard or not source.node_id:
                source.set_identity(slot_map.node_id(address), shard, address)
            self.first_slots[address] = self._first[address]
        for address in [a for a, s in self.sources.items() if a not in self._labels and not s.confirmed]:
            first = self.first_slots.get(address, -1)
            self._retire(address, slot_map.owners[first] if first >= 0 else None)

    def _add(self, address: Address) -> NodeSource:
        node = self.upstream.at(address)
        source: NodeSource

        def on_event(db: int, name: bytes, key: bytes) -> None:
            self.on_event(db, name, key, source.headers, source.extra)

        def on_gap(start: int, end: int) -> None:
            self._publish_gap(start, end, address, source.node_id, source.shard, address)

        def on_subscribed() -> None:
            self._confirmed(address)

        async def prepare(link: RedisLink) -> None:
            timeout = self.live.current.connect_timeout
            value, error = await ensure_notify_flags(lambda c: link.request(c, timeout), self._classes(),
                                                     node_name(address))
            if value:
                self.notify[address] = value
            if error:
                self.notify_errors[address] = error
            else:
                self.notify_errors.pop(address, None)

        source = NodeSource(node, self.live.current.connect_timeout, on_event, on_gap, on_subscribed,
                            self._trouble, prepare)
        self.sources[address] = source
        log.info("keyspace source for master %s", node_name(address))
        source._task = asyncio.get_running_loop().create_task(source._run(),
                                                              name=f"keyspace-source-{address[1]}")
        return source

    def _retire(self, address: Address, successor: Address | None) -> None:
        """Stop reading ``address``; the gap of its shard waits for ``successor``'s confirmation."""
        source = self.sources.pop(address)
        # stop reading at once; nothing more of this node reaches the pipeline
        source.demoted = True
        if source._link is not None:
            source._link.abort()
        self._retired.append(source)
        gaps = [] if successor == address else self.pending.pop(address, [])
        if source.ever_confirmed:
            gaps.append((source.gap_start_ms(), address, source.node_id, source.shard))
            self.switches += 1
            log.warning("keyspace source %s dropped: slots %s now on %s", node_name(address), source.shard,
                        node_name(successor) if successor else "?")
        if not gaps:
            return
        if successor is None:
            log.error("slots %s have no master in the map: their gap marker waits", source.shard)
            self.pending.setdefault(address, []).extend(gaps)
            return
        self.pending.setdefault(successor, []).extend(gaps)
        new = self.sources.get(successor)
        if new is not None and new.confirmed:
            self._confirmed(successor)

    async def _reap_retired(self) -> None:
        retired, self._retired = self._retired, []
        self.dropped_retired += sum(s.dropped for s in retired)
        if retired:
            await asyncio.gather(*(s.stop() for s in retired), return_exceptions=True)

    def _confirmed(self, address: Address) -> None:
        """A master's subscription is confirmed: publish the gaps its shard waited for."""
        source = self.sources.get(address)
        end = source.confirmed_at_ms if source is not None and source.confirmed_at_ms else now_ms()
        for start, old, node_id, shard in self.pending.pop(address, []):
            self._publish_gap(start, max(end, start), old, node_id, shard, address)
        self.check_flags_soon()

    def _publish_gap(self, start: int, end: int, old: Address, node_id: str, shard: str,
                     new: Address) -> None:
        entry = self.shard_gaps.setdefault(shard, {"gaps": 0, "gap_ms": 0})
        entry["gaps"] += 1
        entry["gap_ms"] += end - start
        entry["last"] = f"{start}-{end}"
        entry["from"] = node_name(old)
        entry["to"] = node_name(new)
        headers = ((b"node", node_name(old).encode()), (b"node_id", node_id.encode()),
                   (b"shard", shard.encode()), (b"new_node", node_name(new).encode()))
        self.on_gap(start, end, node_name(old).encode(), headers)

    # ---- notify-keyspace-events on every node ----------------------------------------------------

    async def _flags_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._flags_wanted.wait(), FLAGS_INTERVAL)
            except asyncio.TimeoutError:
                pass
            self._flags_wanted.clear()
            slot_map = self.topology.full_map
            if slot_map is None:
                continue
            nodes = dict.fromkeys((*slot_map.masters, *slot_map.replicas))
            for gone in [a for a in (*self.notify, *self.notify_errors) if a not in nodes]:
                self.notify.pop(gone, None)  # left the map (killed, removed): stop reporting it
                self.notify_errors.pop(gone, None)
            await asyncio.gather(*(self._ensure_flags(node) for node in nodes), return_exceptions=True)
            error = "; ".join(f"{node_name(a)}: {e}" for a, e in self.notify_errors.items() if e)
            self.on_flags(self._flags_summary(), error)

    def _flags_summary(self) -> str:
        values = set(self.notify.values())
        return values.pop() if len(values) == 1 else ",".join(
            f"{node_name(a)}={v}" for a, v in sorted(self.notify.items()))

    def _classes(self) -> frozenset[str]:
        return parse_classes(self.live.current.events)

    async def _ensure_flags(self, address: Address) -> None:
        auth = self.upstream
        classes = self._classes()
        try:
            (reply,) = await query(address, ("CONFIG", "GET", "notify-keyspace-events"), auth=auth)
            if isinstance(reply, hiredis.ReplyError) or not isinstance(reply, list) or len(reply) < 2:
                self.notify_errors[address] = f"CONFIG GET refused: {reply}"
                return
            current = reply[1].decode()
            wanted = notify_flags_update(current, classes)
            if wanted is not None:
                (answer,) = await query(address, ("CONFIG", "SET", "notify-keyspace-events", wanted), auth=auth)
                if isinstance(answer, hiredis.ReplyError):
                    self.notify_errors[address] = f"CONFIG SET refused: {answer}"
                    return
                log.info("notify-keyspace-events on %s changed from %r to %r", node_name(address), current, wanted)
                current = wanted
            self.notify[address] = current
            self.notify_errors.pop(address, None)
        except (OSError, asyncio.TimeoutError, hiredis.HiredisError) as exc:
            self.notify_errors[address] = f"unreachable: {exc!r}"
            self.notify.pop(address, None)

    # ---- info ----------------------------------------------------------------------------------------

    def info(self) -> dict[str, object]:
        out: dict[str, object] = {
            "cluster_sources": len(self.sources),
            "cluster_sources_subscribed": sum(1 for s in self.sources.values() if s.confirmed),
            "cluster_source_switches": self.switches,
            "cluster_events_dropped_unconfirmed": self.dropped_retired + sum(
                s.dropped for s in (*self.sources.values(), *self._retired)),
            "cluster_nodes_notify_ok": sum(1 for a in self.notify if not self.notify_errors.get(a)),
        }
        now = time.time() * 1000
        for i, (address, s) in enumerate(sorted(self.sources.items())):
            out[f"cluster_source_{i}"] = (
                f"node={node_name(address)},id={s.node_id},shard={s.shard},state={s.state_name},"
                f"subscribed_at_ms={s.confirmed_at_ms},events={s.events},"
                f"dropped_unconfirmed={s.dropped},role_probes={s.probes},reconnects={s.reconnects},"
                f"idle_ms={int(now - s.last_event_ms) if s.last_event_ms else -1}")
        for shard, g in sorted(self.shard_gaps.items()):
            out[f"cluster_gaps_{shard}"] = (f"gaps={g['gaps']},gap_ms={g['gap_ms']},last={g['last']},"
                                            f"from={g['from']},to={g['to']}")
        return out
