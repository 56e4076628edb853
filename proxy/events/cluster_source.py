"""Cluster mode: one keyspace source per master, following failovers, never reading a replica.

Keyspace notifications are node-local (``docs/cluster.md``, "Events"), so :class:`ClusterSources`
keeps one :class:`~proxy.events.node_source.NodeSource` (the single-node
:class:`~proxy.events.source.KeyspaceSource` with a ``ROLE`` guard against events a replica
emitted: "No event twice" there) for every master in the topology's slot map, all feeding the
one pipeline.

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
from collections.abc import Callable
from typing import Any

import hiredis

from protocol.events import notify_flags_update, parse_classes
from proxy.cluster.topology import Address, SlotMap, Topology, query
from proxy.config import RedisAddress
from proxy.errors import check_cancelled, stopped
from proxy.events.flags import ensure_notify_flags
from proxy.events.node_source import NodeSource, node_name
from proxy.events.redis_link import RedisLink
from proxy.events.source import now_ms
from proxy.live import LiveConfig

__all__ = ["ClusterSources", "shard_label"]

log = logging.getLogger("key_evt_amqp.events.cluster")

FAST_POLL = 0.2  # seconds between map refreshes while a shard is not covered
SLOW_POLL = 1.0  # seconds between map refreshes otherwise
FLAGS_INTERVAL = 5.0  # seconds between checks of notify-keyspace-events on every node

Headers = tuple[tuple[bytes, bytes], ...]
#: ``(db, event name, key, headers, encoded headers, source)``: one event a master emitted, certified
OnEvent = Callable[[int, bytes, bytes, Headers, bytes, NodeSource], None]
#: ``(start_ms, end_ms, source node, headers, the new master's source)``: a shard's events in that
#: window may be lost
OnGap = Callable[[int, int, bytes, Headers, "NodeSource | None"], None]
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



class ClusterSources:
    """Keeps one :class:`NodeSource` per master of ``topology``; the service's ``source``.

    Every master's certified events go to ``on_event``, gap markers to ``on_gap``, and the state of
    ``notify-keyspace-events`` on the nodes to ``on_flags``. Nodes are reached with ``upstream``'s
    credentials; the event classes and the connect timeout are read from ``live`` when needed.
    """

    def __init__(self, topology: Topology, upstream: RedisAddress, live: LiveConfig, *,
                 on_event: OnEvent, on_gap: OnGap, on_flags: OnFlags,
                 on_retire: Callable[[NodeSource], None] = lambda source: None) -> None:
        self.topology = topology
        self.on_retire = on_retire
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
        await stopped(self._tasks)
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
            check_cancelled()
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
            self.on_event(db, name, key, source.headers, source.extra, source)

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
        self.on_retire(source)
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
        self.on_gap(start, end, node_name(old).encode(), headers, self.sources.get(new))

    # ---- notify-keyspace-events on every node ----------------------------------------------------

    async def _flags_loop(self) -> None:
        while True:
            check_cancelled()
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
