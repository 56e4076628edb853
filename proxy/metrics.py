"""The proxy's one registry of counters: :class:`Metrics`, read by ``info`` and ``/metrics``.

Every counter is a plain integer attribute of one :class:`Metrics` object, built once by
:func:`proxy.server.serve` and handed to whoever counts (the client connections through the
:class:`~proxy.state.ServerState`, the event service, pipeline, publisher and fallback list).
Counting is one attribute increment, ``metrics.events_seen += 1``: no lookup, no label, no lock
(everything runs on the one event loop). Readers take the values when they are asked:

- ``key_evt_amqp.info`` (:class:`~proxy.runtime.Runtime`, :meth:`EventService.info
  <proxy.events.service.EventService.info>`): the counters under their ``info`` names, with the
  states and gauges of the parts that own them (connected clients, fallback length, ...);
- ``/metrics`` (:mod:`proxy.monitor`): :data:`COUNTERS` in Prometheus text, the gauges from the same
  ``info`` fields (:data:`GAUGES`, :data:`STATES`), the admin command counts and the publish latency
  histogram.

Besides the counters: :attr:`Metrics.admin` counts our commands by name and result (a dict: they
are rare), and :attr:`Metrics.publish_latency` is the time from reading an event to the broker's
confirm (:class:`LatencyHistogram`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["COUNTERS", "GAUGES", "LATENCY_BUCKETS_S", "STATES", "CounterSpec", "LatencyHistogram", "Metrics"]

#: Upper bounds (seconds) of the publish latency buckets; one more bucket holds the rest (+Inf).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                     30.0, 60.0, 300.0)


class LatencyHistogram:
    """Counts per bucket of the time from reading an event to its confirm, and their sum."""

    __slots__ = ("bounds_ms", "counts", "sum_ms")

    def __init__(self) -> None:
        self.bounds_ms = [b * 1000 for b in LATENCY_BUCKETS_S]
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)  # the last one: above every bound
        self.sum_ms = 0

    def observe_confirmed(self, now_ms: int, confirmed: Iterable[tuple[Any, ...]]) -> None:
        """Each ``(event, ...)`` of ``confirmed`` was confirmed at ``now_ms``: its latency is
        counted from ``event.timestamp_ms``, the moment the proxy read it (Unix ms)."""
        counts, bounds = self.counts, self.bounds_ms
        total = 0
        for entry in confirmed:
            ms = now_ms - entry[0].timestamp_ms
            counts[bisect_left(bounds, ms)] += 1
            total += ms
        self.sum_ms += total

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True, slots=True)
class CounterSpec:
    """One counter: its attribute, its Prometheus name and help, and its labels there (several
    attributes may share a name with different labels, e.g. the drop reasons)."""

    attribute: str
    name: str
    help: str
    labels: tuple[tuple[str, str], ...] = ()
    scale: float = 1.0  # the counter's unit in the Prometheus unit (ms -> s: 0.001)


def _c(attribute: str, name: str, text: str, scale: float = 1.0, **labels: str) -> CounterSpec:
    return CounterSpec(attribute, "key_evt_amqp_" + name, text, tuple(labels.items()), scale)


_DROPPED = "events lost on purpose, by reason (see README: Guarantees)"

#: Every counter of :class:`Metrics`, in the order ``/metrics`` shows them.
COUNTERS: tuple[CounterSpec, ...] = (
    _c("clients_accepted", "client_connections_total", "client connections accepted (admitted or not)"),
    _c("clients_rejected", "client_connections_rejected_total", "client connections refused: max-clients reached"),
    _c("client_bytes_in", "client_read_bytes_total", "bytes read from clients and relayed to Redis"),
    _c("client_bytes_out", "client_written_bytes_total", "bytes of Redis replies relayed to clients"),
    _c("commands_relayed", "commands_relayed_total", "client commands split by the fast path (hiredis) and relayed"),
    _c("events_seen", "events_seen_total", "keyspace events read from Redis"),
    _c("events_filtered", "events_filtered_total", "events not forwarded: class or key mask not selected"),
    _c("events_own_keys", "events_own_keys_total", "events of fallback list keys (never forwarded)"),
    _c("events_accepted", "events_accepted_total", "events (and gap markers) taken by the pipeline"),
    _c("events_published", "events_published_total", "messages sent to the broker (replays included)"),
    _c("events_routed", "events_routed_total", "messages published with a route chosen per event "
       "(routing key template, --route, or --format json)"),
    _c("events_json", "events_json_total", "messages published in the JSON format"),
    _c("routing_keys_truncated", "routing_keys_truncated_total", "routing keys cut to 255 bytes (+ ~hash)"),
    _c("events_confirmed", "events_confirmed_total", "messages the broker confirmed (ack)"),
    _c("events_nacked", "events_nacked_total", "messages the broker refused (nack): stored again"),
    _c("events_returned", "events_returned_total", "messages returned unroutable (no queue bound): stored again"),
    _c("publish_timeouts", "publish_timeouts_total", "connections dropped for a confirm overdue"),
    _c("amqp_connections", "amqp_connections_total", "connections opened to the broker"),
    _c("events_to_fallback", "events_to_fallback_total", "events written to the fallback list"),
    _c("events_replayed", "events_replayed_total", "events replayed from the fallback list and confirmed"),
    _c("replay_failures", "replay_failures_total", "replay batches that failed (retried after a backoff)"),
    _c("dropped_fallback_full", "events_dropped_total", _DROPPED, reason="fallback_full"),
    _c("dropped_fallback_off", "events_dropped_total", _DROPPED, reason="fallback_off"),
    _c("dropped_overflow", "events_dropped_total", _DROPPED, reason="overflow"),
    _c("fallback_lost", "events_dropped_total", _DROPPED, reason="fallback_lost"),
    _c("fallback_restored", "fallback_restored_total", "events written back after the list vanished"),
    _c("fallback_skipped_entries", "fallback_skipped_entries_total", "fallback list elements that were not events"),
    _c("gaps", "gaps_total", "gap markers: times the subscription to Redis was down"),
    _c("gap_ms", "gap_seconds_total", "time covered by gap markers (seconds)", 0.001),
)

#: ``info`` fields that ``/metrics`` shows as gauges: field -> (Prometheus name, help).
GAUGES: dict[str, tuple[str, str]] = {
    "uptime_in_seconds": ("key_evt_amqp_uptime_seconds", "seconds since the proxy started"),
    "connected_clients": ("key_evt_amqp_clients_connected", "client connections open now"),
    "events_in_flight": ("key_evt_amqp_events_in_flight", "messages sent, not confirmed yet"),
    "events_held": ("key_evt_amqp_events_held", "events held in memory while the broker connects"),
    "events_waiting_for_fallback": ("key_evt_amqp_events_waiting_for_fallback",
                                    "events in memory waiting to be written to the fallback list"),
    "fallback_length": ("key_evt_amqp_fallback_length", "elements in the fallback list (to replay)"),
    "source_reconnects": ("key_evt_amqp_source_reconnects", "reconnections of the event subscription"),
    "cluster_sources": ("key_evt_amqp_cluster_sources", "masters subscribed to or being subscribed"),
    "cluster_sources_subscribed": ("key_evt_amqp_cluster_sources_subscribed", "masters subscribed"),
    "fleet_takeovers": ("key_evt_amqp_fleet_takeovers", "times this instance became the forwarder"),
    "fleet_demotions": ("key_evt_amqp_fleet_demotions", "times it lost the lease while forwarding"),
    "fleet_checkpoint_lag_ms": ("key_evt_amqp_fleet_checkpoint_lag_ms",
                                "ms since the newest done checkpoint (-1: none yet)"),
    "fleet_standby_buffer": ("key_evt_amqp_fleet_standby_buffer",
                             "events a standby keeps for a takeover"),
    "fleet_standby_dropped": ("key_evt_amqp_fleet_standby_dropped",
                              "events a standby dropped past --standby-buffer"),
}

#: ``info`` fields that are states: ``/metrics`` shows ``name{state="<value>"} 1``.
STATES: dict[str, tuple[str, str]] = {
    "amqp_state": ("key_evt_amqp_broker_state", "broker connection: idle, connecting, ready, backoff, "
                   "disabled, stopped"),
    "source_state": ("key_evt_amqp_source_state", "event subscription to Redis"),
    "pipeline_mode": ("key_evt_amqp_pipeline_mode", "direct, holding, or spilling (the fallback list "
                      "is in use: replaying)"),
    "fleet_role": ("key_evt_amqp_fleet_role", "forwarder (publishes the events) or standby"),
}


class Metrics:
    """Every counter of the proxy (names and meaning: :data:`COUNTERS`), starting at 0."""

    __slots__ = (*(spec.attribute for spec in COUNTERS), "published_direct", "confirmed_direct",
                 "admin", "publish_latency")

    clients_accepted: int
    clients_rejected: int
    client_bytes_in: int
    client_bytes_out: int
    commands_relayed: int
    events_seen: int
    events_filtered: int
    events_own_keys: int
    events_accepted: int
    events_published: int
    events_routed: int
    events_json: int
    routing_keys_truncated: int
    events_confirmed: int
    events_nacked: int
    events_returned: int
    publish_timeouts: int
    amqp_connections: int
    events_to_fallback: int
    events_replayed: int
    replay_failures: int
    dropped_fallback_full: int
    dropped_fallback_off: int
    dropped_overflow: int
    fallback_lost: int
    fallback_restored: int
    fallback_skipped_entries: int
    gaps: int
    gap_ms: int
    published_direct: int  # the pipeline's own bookkeeping (not shown)
    confirmed_direct: int
    #: our commands by (verb, result): result is ``ok``, ``error`` or ``refused`` (no authority)
    admin: dict[tuple[str, str], int]
    publish_latency: LatencyHistogram

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
        self.admin = {}
        self.publish_latency = LatencyHistogram()

    @property
    def events_dropped(self) -> int:
        """Every event lost on purpose, whatever the reason."""
        return self.dropped_fallback_full + self.dropped_fallback_off + self.dropped_overflow + self.fallback_lost

    def count_admin(self, verb: str, result: str) -> None:
        key = (verb, result)
        self.admin[key] = self.admin.get(key, 0) + 1
