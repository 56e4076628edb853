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
import logging
import time
from typing import Any

from protocol.events import event_class, parse_classes
from protocol.keymask import KeyFilter
from protocol.slots import key_slot
from proxy.cluster.topology import Topology
from proxy.config import Config, RedisAddress
from proxy.events.cluster_source import ClusterSources
from proxy.events.errors import AmqpCommandError, BrokerError, LinkError
from proxy.events.fallback import FallbackList
from proxy.events.flags import ensure_notify_flags
from proxy.events.message import Event, IdSource, gap_event
from proxy.events.pipeline import Pipeline
from proxy.events.publisher import AmqpPublisher, BrokerState
from proxy.events.redis_link import RedisLink
from proxy.events.source import KeyspaceSource
from proxy.live import LiveConfig
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
                 metrics: Metrics | None = None) -> None:
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
        self.cluster: ClusterSources | None = None
        self.source: KeyspaceSource | ClusterSources
        if topology is None:
            self.source = KeyspaceSource(self.upstream, config.connect_timeout, self._on_keyspace,
                                         self._on_gap, self._on_subscribed, self._prepare_source)
        else:
            self.source = self.cluster = ClusterSources(
                topology, self.upstream, live, on_event=self.on_node_keyspace, on_gap=self.publish_gap,
                on_flags=self.cluster_flags_checked)
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
        """Subscribe to Redis and start the fallback pump; the broker connects on the first event."""
        if RESERVED not in self.fallback_key:
            log.warning("the fallback key %r is outside the reserved namespace (names containing %r): "
                        "the list is %r", self.fallback_key, RESERVED, self.fallback.key)
        await self.pipeline.start()
        await self.source.start()

    async def stop(self) -> None:
        """Stop reading Redis, wait (bounded) for confirms, store everything else in the list."""
        await self.source.stop()
        self.pipeline.hold_for_shutdown()
        await self.publisher.settle(min(STOP_CONFIRM_GRACE, self.live.current.shutdown_timeout))
        await self.publisher.disconnect(final=True)
        await self.pipeline.stop(STOP_STORE_TIMEOUT)
        if self._flags_task is not None:
            self._flags_task.cancel()
        self.fallback.close()

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

    def info(self) -> dict[str, object]:
        p, m = self.publisher, self.metrics
        sources = self.cluster.sources.values() if self.cluster is not None else [self.source]
        return {
            "amqp_state": p.state.value,
            "amqp_connections": m.amqp_connections,
            "source_state": self.source.state_name,
            "pipeline_mode": self.pipeline.mode.value,
            "events_seen": m.events_seen,
            "events_filtered": m.events_filtered,
            "events_own_keys": m.events_own_keys,
            "events_accepted": m.events_accepted,
            "events_published": m.events_published,
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
            **_last_error([p, self.pipeline, *sources]),
            **(self.cluster.info() if self.cluster is not None else {}),
        }

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
        self.on_node_keyspace(db, name, key)

    def on_node_keyspace(self, db: int, name: bytes, key: bytes,
                         headers: tuple[tuple[bytes, bytes], ...] = (), extra: bytes = b"") -> None:
        """One event (in cluster mode from one master: ``headers`` name its ``node`` and
        ``shard``): filter it by class, mask and own keys, then hand it to the pipeline."""
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
        self.pipeline.accept(Event.keyspace(self._ids.next(), int(time.time() * 1000), db, name, key,
                                            headers, extra))

    def publish_gap(self, start_ms: int, end_ms: int, source: bytes,
                    headers: tuple[tuple[bytes, bytes], ...]) -> None:
        """Cluster mode: a gap marker for one shard (``headers`` name the shard and its nodes)."""
        self.metrics.gaps += 1
        self.metrics.gap_ms += end_ms - start_ms
        log.warning("keyspace events of %s between %d and %d (%d ms) may be lost (failover or lost "
                    "subscription); a gap marker follows in the stream", source.decode(), start_ms,
                    end_ms, end_ms - start_ms)
        self.pipeline.accept(gap_event(self._ids.next(), end_ms, start_ms, end_ms, source, headers))

    def _fallback_lost(self, count: int, start_ms: int, end_ms: int) -> Event:
        """The fallback list vanished and ``count`` of its elements were not in memory: the gap
        marker that takes their place (``headers`` say why and how many)."""
        address = self.fallback.address
        source = f"{address.host}:{address.port}".encode()
        headers = ((b"reason", b"fallback_lost"), (b"lost", b"%d" % count))
        return gap_event(self._ids.next(), int(time.time() * 1000), start_ms, end_ms, source, headers)

    def cluster_flags_checked(self, summary: str, error: str) -> None:
        self.notify_keyspace_events = summary
        if error and error != self.notify_config_error:
            log.warning("notify-keyspace-events: %s", error)
        self.notify_config_error = error

    def _on_gap(self, start_ms: int, end_ms: int) -> None:
        self.metrics.gaps += 1
        self.metrics.gap_ms += end_ms - start_ms
        log.warning("keyspace events between %d and %d (%d ms) are lost: the subscription to Redis "
                    "was down; a gap marker follows in the stream", start_ms, end_ms, end_ms - start_ms)
        source = f"{self.upstream.host}:{self.upstream.port}".encode()
        self.pipeline.accept(gap_event(self._ids.next(), end_ms, start_ms, end_ms, source))

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


def _last_error(parts: list[Any]) -> dict[str, object]:
    """The error ``info`` shows: the latest one that still holds, else the latest one.

    Each part (publisher, pipeline, sources) keeps ``last_error``, ``last_error_ms`` (when it last
    happened) and ``last_error_current`` (cleared when that part works again)."""
    latest = max(parts, key=lambda p: (bool(p.last_error), p.last_error_current, p.last_error_ms))
    if not latest.last_error:
        return {"last_error": "", "last_error_time_ms": 0, "last_error_current": 0}
    return {"last_error": latest.last_error, "last_error_time_ms": latest.last_error_ms,
            "last_error_current": int(latest.last_error_current)}
