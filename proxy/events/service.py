"""The event pipeline as the admin layer sees it: :class:`EventService`.

Wires the parts together::

    KeyspaceSource --(db, name, key)--> filters --Event--> Pipeline --> AmqpPublisher --> RabbitMQ
    (PSUBSCRIBE)                        classes, masks,     |   ^
                                        own keys            v   | replay
                                                        FallbackList (Redis list)

and keeps what follows the configuration in force (:class:`~proxy.live.LiveConfig`, to which it
subscribes): the filters and the ``notify-keyspace-events`` letters Redis must have; it also runs
connect/disconnect. In cluster mode the source is :class:`~.cluster_source.ClusterSources`.
``docs/events.md`` describes the message format, the gap marker, the list format and the
guarantees.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import Sequence
from typing import Any

import hiredis

from protocol.events import event_class, parse_classes
from protocol.keymask import KeyFilter
from protocol.slots import key_slot
from proxy.cluster.topology import Address, Topology, query
from proxy.config import Config, RedisAddress
from proxy.events.cluster_source import ClusterSources
from proxy.errors import CommandError
from proxy.events.errors import AmqpCommandError, BrokerError, LinkError
from proxy.events.fallback import FallbackList
from proxy.events.fleet import Fleet, FleetKeys, Role, Stream, gap_for
from proxy.events.flags import ensure_notify_flags
from proxy.events.message import Event, IdSource, gap_event
from proxy.events.node_source import NodeSource
from proxy.events.pipeline import Pipeline
from proxy.events.publisher import AmqpPublisher, BrokerState
from proxy.events.redis_link import LocatedLink, RedisLink
from proxy.events.source import KeyspaceSource
from proxy.events.stream import MARKER_DB, Takeover
from proxy.live import LiveConfig
from proxy.sentinel import SentinelWatch
from proxy.metrics import Metrics

__all__ = ["EventService"]

log = logging.getLogger("key_evt_amqp.events")

#: Event names whose class verdict is cached; past it the cache starts over (module events can
#: have any name, so the set of names is not bounded by Redis).
CLASS_CACHE_LIMIT = 4096
STOP_CONFIRM_GRACE = 2.0  # seconds at shutdown to wait for outstanding confirms
STOP_STORE_TIMEOUT = 5.0  # seconds at shutdown to write the unconfirmed events to the list
#: Every key whose name contains this belongs to a fallback list, ours or another instance's: no
#: instance forwards events of such keys, whatever its own key and db. (Two proxies with other
#: keys would otherwise forward each other's RPUSH events into their own lists, for ever.)
RESERVED = b"key_evt_amqp"
CLUSTER_FALLBACK_KEY = b"{key_evt_amqp}:fallback"


def fallback_key_for(key: bytes) -> bytes:
    """The fallback list's key: ``key`` itself if it is in the reserved namespace (it contains
    ``key_evt_amqp``, as the module's default does), else ``key`` + ``:key_evt_amqp``."""
    return key if RESERVED in key else key + b":" + RESERVED


def cluster_fallback_key(key: bytes) -> bytes:
    """The fallback list's key in cluster mode: ``key`` (in the reserved namespace, as
    :func:`fallback_key_for`) if it has a hash tag, else the default ``{key_evt_amqp}:fallback``
    (one slot, whichever master owns it)."""
    start = key.find(b"{")
    if start >= 0 and key.find(b"}", start + 1) > start + 1:
        return fallback_key_for(key)
    return CLUSTER_FALLBACK_KEY


class EventService:
    """Start once, stop once; the admin layer calls the rest from any command.

    In cluster mode (``topology`` given) there is a source per master and the fallback list lives
    on one slot: its key gets a hash tag (``{key_evt_amqp}:fallback`` unless the configured key
    has one) and it is written on whichever master owns that slot now (``docs/cluster.md``).
    """

    def __init__(self, live: LiveConfig, topology: Topology | None = None,
                 sentinel: SentinelWatch | None = None, metrics: Metrics | None = None) -> None:
        config = live.current
        self.live = live
        self.metrics = metrics if metrics is not None else Metrics()
        #: fixed at start, as the fallback list's key (a new one applies at the next start)
        self.upstream = config.upstream
        self.fallback_key = config.fallback_key
        self._ids = IdSource()
        self.publisher = AmqpPublisher(live, self, self.metrics)  # the service relays on_ready/on_settled
        self.fallback = self._fallback_list(topology)
        self.pipeline = Pipeline(live, self.publisher, self.fallback, self.metrics)
        fleet_link = LocatedLink(self.fallback.address, config.connect_timeout, self.fallback.locate)
        self.fleet = Fleet(FleetKeys(self.fallback.key), self.fallback.key, fleet_link,
                           listen=f"{config.listen_host}:{config.listen_port}", version=_version(),
                           promote=self._promote, demote=self._demote, safe_seq=self.pipeline.safe_seq,
                           accepted_seq=self._accepted_seq, standby_limit=config.standby_buffer)
        self.fallback.fence = self.fleet.fence
        self.publisher.may_publish = self.fleet.may_publish
        self._stream = self.fleet.stream(b"")  # single-node mode: the one stream
        self.fleet_sources: dict[bytes, NodeSource] = {}  # cluster mode: stream tag -> its source
        self.cluster: ClusterSources | None = None
        self.source: KeyspaceSource | ClusterSources
        if topology is None:
            self.source = KeyspaceSource(self.upstream, config.connect_timeout, self._on_keyspace,
                                         self._on_gap, self._on_subscribed, self._prepare_source)
        else:
            self.fleet.drop_stream(b"")
            self.source = self.cluster = ClusterSources(
                topology, self.upstream, live, on_event=self.on_node_keyspace, on_gap=self.publish_gap,
                on_flags=self.cluster_flags_checked, on_retire=self._source_retired)
        self.sentinel = sentinel  # Sentinel mode: the subscription follows the master it names
        self.replicas_notify: dict[str, str] = {}  # replica -> its notify-keyspace-events or the error
        if sentinel is not None:
            sentinel.listeners.append(self._master_switched)
            sentinel.on_replicas = self._prepare_replicas
        self.notify_keyspace_events = ""
        self.notify_config_error = ""
        self._flags_task: asyncio.Task[None] | None = None
        self._set_filters(config)
        live.subscribe(self._config_changed)

    def _fallback_list(self, topology: Topology | None) -> FallbackList:
        timeout = self.live.current.connect_timeout
        if topology is None:
            return FallbackList(self.upstream, fallback_key_for(self.fallback_key), timeout,
                                on_lost=self._fallback_lost, metrics=self.metrics)
        key = cluster_fallback_key(self.fallback_key)
        slot = key_slot(key)
        seed = (self.upstream.host, self.upstream.port)

        def locate() -> RedisAddress:
            return self.upstream.at(topology.owner(slot) or seed)

        def on_moved(error: str) -> None:
            parts = error.split()
            if parts[0] == "MOVED" and len(parts) == 3:
                host, _, port = parts[2].rpartition(":")
                topology.moved(int(parts[1]), (host.strip("[]"), int(port)))
            else:
                topology.refresh_soon()

        return FallbackList(locate(), key, timeout, locate=locate, on_moved=on_moved,
                            on_lost=self._fallback_lost, metrics=self.metrics)

    # ---- configuration ------------------------------------------------------------------

    def _set_filters(self, config: Config) -> None:
        self._classes = parse_classes(config.events)
        self._class_ok: dict[bytes, bool] = {}
        self._keys = KeyFilter(config.keymasks)

    def _config_changed(self, config: Config) -> None:
        """A new configuration is in force: filters from the next event on; the publisher and
        the pipeline read theirs from :attr:`live` (broker address, credentials and heartbeat at
        the next (re)connect)."""
        if (self.fallback_key, self.upstream) != (config.fallback_key, config.upstream):
            log.warning("a new fallback key or upstream applies at the next start of the proxy")
        classes = self._classes
        self._set_filters(config)
        if classes != self._classes:
            self._schedule_flags_check()

    # ---- life-cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to Redis and join the fleet: the instance that holds the lease starts the
        pipeline (``_promote``). Connect to the broker now (in the background: ``connected to ...``
        or a WARNING with the cause follows in the log), or at the first event with
        ``amqp_connect`` lazy: a standby connects too, so that a takeover publishes at once."""
        config = self.live.current
        if RESERVED not in self.fallback_key:
            log.warning("the fallback key %r is outside the reserved namespace (names containing %r): "
                        "the list is %r", self.fallback_key, RESERVED, self.fallback.key)
        if config.amqp_tls and not config.amqp_tls_verify:
            log.warning("amqp: TLS certificate verification is OFF (--amqp-tls-verify off): whoever "
                        "sits between the proxy and RabbitMQ can pose as the broker and read the "
                        "password and every event")
        await self.source.start()
        self.fleet.start()
        if config.amqp_connect == "start":
            self.publisher.ensure_connected()

    async def stop(self) -> None:
        """Hand over to a standby when there is one (``fleet.py``), stop reading Redis, wait
        (bounded) for confirms, store everything else in the list, give the lease up."""
        handed_over = await self.fleet.begin_handover()
        await self.source.stop()
        all_safe = True
        if self.fleet.forwarding:
            self.pipeline.hold_for_shutdown()
            await self.publisher.settle(min(STOP_CONFIRM_GRACE, self.live.current.shutdown_timeout))
            await self.publisher.disconnect(final=True)
            all_safe = await self.pipeline.stop(STOP_STORE_TIMEOUT)
        else:
            await self.publisher.disconnect(final=True)
        await self.fleet.finish(handed_over, all_safe)
        if self._flags_task is not None:
            self._flags_task.cancel()
        self.fallback.close()

    # ---- the fleet --------------------------------------------------------------------------

    def _accepted_seq(self) -> int:
        return self.pipeline.seq

    def _promote(self, takeovers: list[tuple[Stream, Takeover]]) -> None:
        """This instance took the lease: publish what each stream's buffer holds after its done
        marker (behind a gap marker where that cannot be proven), then start the pipeline."""
        for stream, takeover in takeovers:
            source = self.fleet_sources.get(stream.tag)
            headers = source.headers if source is not None else ()
            gap = gap_for(takeover, self._source_name(source), headers, self._ids.next())
            if gap is not None:
                assert gap.gap is not None
                self._count_gap(*gap.gap)
                self.metrics.events_accepted += 1
                self.pipeline.accept(gap)
            for event in takeover.events:
                self.pipeline.accept(event)
        asyncio.get_running_loop().create_task(self.pipeline.start())

    def _demote(self) -> None:
        self.pipeline.abandon()
        self.publisher.abandon()

    def _source_name(self, source: NodeSource | None) -> bytes:
        if source is not None:
            return source.address.name.encode()
        master = self.sentinel.master if self.sentinel is not None else None
        return (master or self.upstream).name.encode()

    def _source_retired(self, source: NodeSource) -> None:
        stream = source.fleet_stream
        if isinstance(stream, Stream):
            stream.live = False

    def _stream_of(self, source: NodeSource) -> Stream:
        """The fleet's stream of a master (cluster mode): named by its node id, which every
        instance reads from the same slot map."""
        stream = source.fleet_stream
        if stream is None:
            tag = source.node_id[:12].encode() + b"." if source.node_id else b"%d." % source.address.port
            stream = source.fleet_stream = self.fleet.stream(tag)
            self.fleet_sources[stream.tag] = source
        assert isinstance(stream, Stream)
        return stream

    def _deliver(self, stream: Stream, event: Event) -> None:
        """An event or gap marker in ``stream``'s order: the pipeline's if this instance is the
        forwarder, else the standby buffer's."""
        self.metrics.events_accepted += 1
        if self.fleet.role is Role.FORWARDER:
            if not stream.ended:
                self.pipeline.accept(event)
        else:
            stream.buffer.add(event)

    # ---- commands -----------------------------------------------------------------------------

    async def connect(self) -> str:
        """``key_evt_amqp.connect``: connect now, with the configuration in force."""
        if self.publisher.state is BrokerState.READY:
            raise AmqpCommandError("AMQP CONNECT ERROR: 6")
        try:
            await self.publisher.connect_now()
        except BrokerError as exc:
            raise AmqpCommandError(f"AMQP CONNECT ERROR: {exc.code}") from None
        return "AMQP CONNECT OK"

    async def disconnect(self) -> str:
        """``key_evt_amqp.disconnect``: stop publishing until ``connect``. Events keep being stored
        in the fallback list meanwhile (they are undeliverable, not unwanted) and replay after it."""
        self.pipeline.hold_for_shutdown()
        was_connected = await self.publisher.disconnect()
        if not was_connected:
            raise AmqpCommandError("AMQP DISCONNECT ERROR: 1")
        return "AMQP DISCONNECT OK"

    async def set_enabled(self, enabled: bool) -> None:
        """The fleet's ``amqp_enabled`` changed (a ``connect``/``disconnect`` sent to another
        instance, or ``config_reset``): stop publishing as :meth:`disconnect` does, or, if
        disconnected, connect again as at start (in the background, retrying). No reply."""
        if not enabled:
            if self.publisher.state is not BrokerState.DISABLED:
                self.pipeline.hold_for_shutdown()
                await self.publisher.disconnect()
        elif self.publisher.state is BrokerState.DISABLED:
            self.publisher.state = BrokerState.IDLE
            self.publisher.ensure_connected()

    def info(self) -> dict[str, object]:
        p, m = self.publisher, self.metrics
        sources = self.cluster.sources.values() if self.cluster is not None else [self.source]
        return {
            "amqp_state": p.state.value,
            "amqp_node": p.node,
            "amqp_cluster_name": p.cluster_name,
            "amqp_connections": m.amqp_connections,
            "source_state": self.source.state_name,
            "pipeline_mode": self.pipeline.mode.value,
            "events_seen": m.events_seen,
            "events_filtered": m.events_filtered,
            "events_own_keys": m.events_own_keys,
            "events_accepted": m.events_accepted,
            "events_published": m.events_published,
            "amqp_messages_written": p.written,
            "amqp_writes_fenced": p.fenced_writes,
            "events_confirmed": m.events_confirmed,
            "events_nacked": m.events_nacked,
            "events_returned": m.events_returned,
            "publish_timeouts": m.publish_timeouts,
            "events_in_flight": p.in_flight,
            "events_held": len(self.pipeline.hold),
            "events_to_fallback": m.events_to_fallback,
            "events_replayed": m.events_replayed,
            "events_waiting_for_fallback": len(self.pipeline.spill) + len(self.pipeline.failed_direct),
            "events_dropped": m.events_dropped,
            "events_dropped_fallback_full": m.dropped_fallback_full,
            "events_dropped_fallback_off": m.dropped_fallback_off,
            "events_dropped_overflow": m.dropped_overflow,
            "events_dropped_fallback_lost": m.fallback_lost,
            "fallback_restored": m.fallback_restored,
            "fallback_skipped_entries": m.fallback_skipped_entries,
            "fallback_length": self.fallback.length,
            "fallback_key": self.fallback.key.decode("utf-8", "backslashreplace"),
            "replay_failures": m.replay_failures,
            "gaps": m.gaps,
            "gap_ms_total": m.gap_ms,
            "source_reconnects": self.source.reconnects,
            "notify_keyspace_events": self.notify_keyspace_events,
            "notify_config_error": self.notify_config_error,
            **_last_error([p, self.pipeline, *sources, self.fleet]),
            **self.fleet.info(),
            **(self._sentinel_info() if self.sentinel is not None else {}),
            **(self.cluster.info() if self.cluster is not None else {}),
        }

    async def fleet_members(self) -> list[dict[str, str]]:
        """``key_evt_amqp.fleet``: the live instances, from their heartbeats in Redis."""
        try:
            members = await self.fleet.members()
        except LinkError as exc:
            raise CommandError(f"ERR the fleet's members cannot be read from Redis: {exc}") from None
        now = time.time() * 1000
        out = []
        for member in sorted(members, key=lambda m: m["id"]):
            started = int(member.pop("started_ms", "0") or 0)
            member.pop("seen_ms", None)
            member["uptime_s"] = str(int((now - started) / 1000)) if started else "?"
            member["self"] = "yes" if member["id"] == self.fleet.instance else "no"
            out.append(member)
        return out

    def health(self) -> dict[str, object]:
        """What ``/readyz`` says: whether Redis is reachable (the subscription is up), the broker
        usable (connected, or idle: it connects on the first event) and the fallback list on and
        answering (its last operation did not fail)."""
        state = self.publisher.state
        return {
            "redis": self.source.state_name == "subscribed",
            "broker": state is BrokerState.READY or (state is BrokerState.IDLE and not self.publisher.last_error_current),
            "fallback": self.live.current.fallback_size >= 0 and not self.pipeline.last_error_current,
            "broker_state": state.value,
            "source_state": self.source.state_name,
        }

    # ---- events -------------------------------------------------------------------------------

    def _on_keyspace(self, db: int, name: bytes, key: bytes) -> None:
        # Hot path: every keyspace event Redis publishes (single-node mode: no node headers).
        self._on_stream_event(self._stream, db, name, key, (), b"")

    def on_node_keyspace(self, db: int, name: bytes, key: bytes, headers: tuple[tuple[bytes, bytes], ...],
                         extra: bytes, source: NodeSource) -> None:
        """One event of a master (cluster mode): ``headers`` name its ``node`` and ``shard``."""
        stream = source.fleet_stream
        if stream is None:
            stream = self._stream_of(source)
        self._on_stream_event(stream, db, name, key, headers, extra)  # type: ignore[arg-type]

    def _on_stream_event(self, stream: Stream, db: int, name: bytes, key: bytes,
                         headers: tuple[tuple[bytes, bytes], ...], extra: bytes) -> None:
        """One message of ``stream``: a fleet marker, or an event to filter by class, mask and
        own keys and hand to the pipeline (the forwarder) or the standby buffer."""
        cursor = stream.cursor
        if db == MARKER_DB:
            self.fleet.on_marker(stream, key)
            return
        cursor.n += 1
        self.fleet.since_marker += 1
        metrics = self.metrics
        metrics.events_seen += 1
        ok = self._class_ok.get(name)
        if ok is None:
            if len(self._class_ok) >= CLASS_CACHE_LIMIT:
                self._class_ok.clear()
            ok = self._class_ok[name] = event_class(name) in self._classes
        if not ok or not self._keys.matches(key):
            metrics.events_filtered += 1
            return
        if RESERVED in key:  # a fallback list (any instance's): forwarding it would loop
            metrics.events_own_keys += 1
            return
        event = Event.keyspace(cursor.message_id(), int(time.time() * 1000), db, name, key, headers, extra)
        self.metrics.events_accepted += 1
        if self.fleet.role is Role.FORWARDER:
            if not stream.ended:  # handing over: what follows our marker is the next forwarder's
                self.pipeline.accept(event)
        else:
            stream.buffer.add(event)

    def publish_gap(self, start_ms: int, end_ms: int, source: bytes,
                    headers: tuple[tuple[bytes, bytes], ...], successor: NodeSource | None) -> None:
        """Cluster mode: a gap marker for one shard (``headers`` name the shard and its nodes),
        in the stream of the master whose subscription ends it."""
        self._count_gap(start_ms, end_ms)
        log.warning("keyspace events of %s between %d and %d (%d ms) may be lost (failover or lost "
                    "subscription); a gap marker follows in the stream", source.decode(), start_ms,
                    end_ms, end_ms - start_ms)
        event = gap_event(self._ids.next(), end_ms, start_ms, end_ms, source, headers)
        if successor is not None:
            self._deliver(self._stream_of(successor), event)
        elif self.fleet.role is Role.FORWARDER:
            self.metrics.events_accepted += 1
            self.pipeline.accept(event)

    def _count_gap(self, start_ms: int, end_ms: int) -> None:
        self.metrics.gaps += 1
        self.metrics.gap_ms += end_ms - start_ms

    def _fallback_lost(self, count: int, start_ms: int, end_ms: int) -> Event:
        """The fallback list vanished and ``count`` of its elements were not in memory: the gap
        marker that takes their place (``headers`` say why and how many)."""
        address = self.fallback.address
        source = address.name.encode()
        headers = ((b"reason", b"fallback_lost"), (b"lost", b"%d" % count))
        return gap_event(self._ids.next(), int(time.time() * 1000), start_ms, end_ms, source, headers)

    def cluster_flags_checked(self, summary: str, error: str) -> None:
        self.notify_keyspace_events = summary
        if error and error != self.notify_config_error:
            log.warning("notify-keyspace-events: %s", error)
        self.notify_config_error = error

    def _on_gap(self, start_ms: int, end_ms: int) -> None:
        self._count_gap(start_ms, end_ms)
        log.warning("keyspace events between %d and %d (%d ms) are lost: the subscription to Redis "
                    "was down; a gap marker follows in the stream", start_ms, end_ms, end_ms - start_ms)
        master = self.sentinel.master if self.sentinel is not None else None
        source = (master or self.upstream).name.encode()
        self._deliver(self._stream, gap_event(self._ids.next(), end_ms, start_ms, end_ms, source))

    # ---- Sentinel ------------------------------------------------------------------------------

    def _master_switched(self, old: RedisAddress, new: RedisAddress, since_ms: int) -> None:
        """Sentinel moved the master: subscribe there (the gap marker starts at ``since_ms`` at the
        latest) and let the fallback list reconnect at its next operation."""
        if isinstance(self.source, KeyspaceSource):
            self.source.move(since_ms)
        self.fallback.close()

    async def _prepare_replicas(self, replicas: tuple[RedisAddress, ...]) -> None:
        """``notify-keyspace-events`` on every replica, before any of them is promoted (merged as
        on the master: the letters we need are added, none removed)."""
        found: dict[str, str] = {}
        for replica in replicas:
            node = (replica.host, replica.port)

            async def run(commands: Sequence[Sequence[bytes | str | int]], node: Address = node,
                          replica: RedisAddress = replica) -> list[Any]:
                return await query(node, *[tuple(a if isinstance(a, bytes | str) else str(a) for a in c)
                                           for c in commands], auth=replica)

            try:
                value, error = await ensure_notify_flags(run, self._classes, replica.name)
            except (OSError, asyncio.TimeoutError, hiredis.HiredisError, LinkError) as exc:
                value, error = "", f"unreachable: {exc}"
            found[replica.name] = error or value
            if error:
                log.warning("notify-keyspace-events on replica %s: %s", replica.name, error)
        self.replicas_notify = found

    def _sentinel_info(self) -> dict[str, object]:
        assert self.sentinel is not None
        return {**self.sentinel.info(),
                "sentinel_replicas_notify": ",".join(f"{r}={v}" for r, v in sorted(self.replicas_notify.items()))}

    def _on_subscribed(self) -> None:
        pass  # notify-keyspace-events was checked on the same connection just before

    async def _prepare_source(self, link: RedisLink) -> None:
        """Before each subscription, on the subscriber's connection (so on the very server it will
        read): make Redis publish what we select. Redis forgets it on restart; doing it before
        subscribing makes the subscription's confirmation the end of the gap (``source.py``)."""
        timeout = self.live.current.connect_timeout
        self._flags_checked(*await ensure_notify_flags(lambda c: link.request(c, timeout), self._classes))

    # ---- publisher callbacks (relayed to the pipeline) -----------------------------------

    def on_ready(self) -> None:
        self.pipeline.on_ready()

    def on_settled(self, confirmed: list, failed: list) -> None:  # type: ignore[type-arg]  # the publisher's batches, typed in publisher.py
        self.pipeline.on_settled(confirmed, failed)

    # ---- notify-keyspace-events ------------------------------------------------------------

    def _schedule_flags_check(self) -> None:
        if self.cluster is not None:
            self.cluster.check_flags_soon()
            return
        if self._flags_task is None or self._flags_task.done():
            self._flags_task = asyncio.get_running_loop().create_task(self._ensure_notify_flags())

    async def _ensure_notify_flags(self) -> None:
        """The selection changed at run time: make Redis publish the classes we forward now."""
        try:
            self._flags_checked(*await ensure_notify_flags(self.fallback.run, self._classes))
        except LinkError as exc:
            self._config_refused(f"cannot check notify-keyspace-events: {exc}")

    def _flags_checked(self, value: str, error: str) -> None:
        if value:
            self.notify_keyspace_events = value
        if error:
            self._config_refused(error)
        else:
            self.notify_config_error = ""

    def _config_refused(self, message: str) -> None:
        if message != self.notify_config_error:
            log.warning("%s; events are forwarded only if an operator enabled them "
                        "(notify-keyspace-events needs E and the selected classes)", message)
        self.notify_config_error = message


def _version() -> str:
    try:
        return importlib.metadata.version("key-evt-amqp")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _last_error(parts: list[Any]) -> dict[str, object]:
    """The error ``info`` shows: the latest one that still holds, else the latest one.

    Each part (publisher, pipeline, sources) keeps ``last_error``, ``last_error_ms`` (when it last
    happened) and ``last_error_current`` (cleared when that part works again)."""
    latest = max(parts, key=lambda p: (bool(p.last_error), p.last_error_current, p.last_error_ms))
    if not latest.last_error:
        return {"last_error": "", "last_error_time_ms": 0, "last_error_current": 0}
    return {"last_error": latest.last_error, "last_error_time_ms": latest.last_error_ms,
            "last_error_current": int(latest.last_error_current)}
