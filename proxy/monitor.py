"""``--metrics-listen``: Prometheus text on ``/metrics``, ``/healthz`` and ``/readyz``.

Served from the proxy's own event loop, so every answer is the state of this very moment, and it
answers while Redis or the broker is down (nothing here waits for either). The server is plain
asyncio streams: it is asked once every few seconds, not on any hot path.

- ``/metrics``: :mod:`proxy.metrics` in the Prometheus text format (``prometheus-client``'s
  encoder, fed by a collector that reads the counters and ``key_evt_amqp.info`` when scraped);
- ``/healthz``: 200 ``ok`` while the process answers (liveness);
- ``/readyz``: 200 when Redis is reachable (the event subscription is up) and events can go
  somewhere (the broker is connected or idle, or the fallback list is on and answered its last
  operation), else 503; the JSON body says which: ``{"ready": .., "redis": .., "broker": ..,
  "fallback": .., "broker_state": .., "source_state": ..}``.

Limits (every request is untrusted): the request head at most :data:`HEAD_LIMIT` bytes, read
within :data:`READ_TIMEOUT` seconds, one request per connection (``Connection: close``), at most
:data:`MAX_CONNECTIONS` at once (more are closed at once).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from proxy.metrics import COUNTERS, GAUGES, LATENCY_BUCKETS_S, STATES, Metrics

__all__ = ["Monitor", "render"]

log = logging.getLogger("key_evt_amqp.monitor")

HEAD_LIMIT = 8 * 1024  # bytes of request line and headers
READ_TIMEOUT = 5.0  # seconds to send the request head
MAX_CONNECTIONS = 64  # at once; more are closed without an answer

Info = Callable[[], dict[str, object]]  # key_evt_amqp.info's fields (Runtime.info)
Health = Callable[[], dict[str, object]]  # /readyz's body, with "ready" (Runtime.health)


class _Collector(Collector):
    """Reads the counters and the ``info`` fields when scraped (nothing is copied before)."""

    def __init__(self, metrics: Metrics, info: Info) -> None:
        self.metrics = metrics
        self.info = info

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        families: dict[str, CounterMetricFamily] = {}
        for spec in COUNTERS:
            family = families.get(spec.name)
            if family is None:
                family = families[spec.name] = CounterMetricFamily(
                    spec.name, spec.help, labels=[k for k, _ in spec.labels])
            family.add_metric([v for _, v in spec.labels], getattr(m, spec.attribute) * spec.scale)
        yield from families.values()
        admin = CounterMetricFamily("key_evt_amqp_admin_commands", "key_evt_amqp.* commands by "
                                    "name and result (ok, error, refused: no authority)",
                                    labels=["command", "result"])
        for (verb, result), count in sorted(m.admin.items()):
            admin.add_metric([verb, result], count)
        yield admin
        yield _latency(m)
        info = self.info()
        for field, (name, text) in GAUGES.items():
            if field in info:
                yield GaugeMetricFamily(name, text, value=float(info[field]))  # type: ignore[arg-type]  # the info fields named in GAUGES are numbers
        for field, (name, text) in STATES.items():
            state = GaugeMetricFamily(name, text, labels=["state"])
            state.add_metric([str(info.get(field, ""))], 1)
            yield state


def _latency(m: Metrics) -> HistogramMetricFamily:
    histogram = m.publish_latency
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip(LATENCY_BUCKETS_S, histogram.counts):
        total += count
        buckets.append((repr(bound), total))
    buckets.append(("+Inf", total + histogram.counts[-1]))
    return HistogramMetricFamily("key_evt_amqp_publish_latency_seconds",
                                 "from reading an event to the broker's confirm", buckets=buckets,
                                 sum_value=histogram.sum_ms / 1000)


def render(metrics: Metrics, info: Info) -> bytes:
    """The Prometheus text of everything, as of now."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics, info))
    return generate_latest(registry)


class Monitor:
    """The HTTP endpoint; :meth:`start` listens, :meth:`close` stops."""

    def __init__(self, metrics: Metrics, info: Info, health: Health) -> None:
        self.metrics = metrics
        self.info = info
        self.health = health
        self.address = ""
        self._server: asyncio.base_events.Server | None = None
        self._open = 0

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host``:``port``; raises OSError when that is not possible."""
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True,
                                                  limit=HEAD_LIMIT)
        sock_host, sock_port = self._server.sockets[0].getsockname()[:2]
        self.address = f"[{sock_host}]:{sock_port}" if ":" in sock_host else f"{sock_host}:{sock_port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open <= MAX_CONNECTIONS:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
                writer.write(self._answer(head))
                await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError):
            pass
        except Exception:  # a bug must cost one answer, not the endpoint
            log.exception("metrics endpoint failed")
        finally:
            self._open -= 1
            writer.close()

    def _answer(self, head: bytes) -> bytes:
        method, _, rest = head.partition(b" ")
        target = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"method not allowed\n", b"text/plain", head_only=False)
        head_only = method == b"HEAD"
        if target == b"/metrics":
            return _response(200, render(self.metrics, self.info), CONTENT_TYPE_LATEST.encode(), head_only)
        if target == b"/healthz":
            return _response(200, b"ok\n", b"text/plain", head_only)
        if target == b"/readyz":
            health = self.health()
            body = json.dumps(health).encode() + b"\n"
            return _response(200 if health["ready"] else 503, body, b"application/json", head_only)
        return _response(404, b"not found: /metrics, /healthz, /readyz\n", b"text/plain", head_only)


_REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 503: b"Service Unavailable"}


def _response(status: int, body: bytes, content_type: bytes, head_only: bool) -> bytes:
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, _REASONS[status], content_type, len(body)))
    return head if head_only else head + body
