"""The broker side: one AMQP connection, one confirm-mode channel, many messages in flight.

The hot path bypasses aiormq's ``Channel.basic_publish``, which costs a lock, three pamqp objects,
a queue hand-off and a drain per message (measured 9x slower): events are encoded by
:class:`~proxy.events.message.FrameEncoder` and written to the socket many at a time through a
:class:`~proxy.events.amqp_wire.ConfirmLink`, which hands ``basic.ack``/``basic.nack``/
``basic.return`` and the connection's end straight to :class:`AmqpPublisher`; it tracks the
in-flight window by delivery tag. aiormq itself is only used in :mod:`proxy.events.amqp_wire`.

Outcomes go to the sink in publish order as ``sink.on_settled(confirmed, failed)``; an in-flight
entry is ``(event, batch, index)`` as given to :meth:`AmqpPublisher.publish`. An event counts as
confirmed only on ``basic.ack`` without a ``basic.return`` before it. It fails on nack, return,
publish timeout, heartbeat silence, a channel or connection close: the sink stores it again.

Several nodes (a RabbitMQ cluster): each connection attempt tries them all, in a random order
(as RabbitMQ's own clients do: any node serves any client, and a shuffle spreads proxies over the
cluster), the node just lost last. A lost connection fails what was in flight to the sink (the
fallback list keeps it) and the next node takes over: see :meth:`AmqpPublisher._open`.

Limits: at most ``config.publish_window`` messages unconfirmed, at most
:data:`WRITE_BUFFER_LIMIT` bytes queued in the socket; past either, :meth:`room` is 0 and the
caller keeps events elsewhere (the fallback list). Nothing here grows without bound.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from yarl import URL

from proxy.amqp_tls import client_context
from proxy.config import Config
from proxy.errors import check_cancelled
from proxy.events.amqp_wire import CHANNEL, ConfirmLink, LinkListener, open_link
from proxy.events.errors import BrokerError
from proxy.events.message import Event, FrameEncoder
from protocol.routing import Router, json_body
from proxy.live import LiveConfig
from proxy.metrics import Metrics
from proxy.ratelog import RateLimitedLog

__all__ = ["AmqpPublisher", "BrokerState", "InFlight"]

log = logging.getLogger("key_evt_amqp.events.publisher")

WRITE_BUFFER_LIMIT = 4 * 1024 * 1024  # bytes queued in the socket before publishing pauses
RECONNECT_MIN = 0.25
RECONNECT_MAX = 5.0
STABLE_AFTER = 10.0  # seconds a connection must live before the reconnect delay starts over
HEARTBEAT_SILENCE = 1.5  # heartbeats without any frame from the broker before it counts as dead
DISCONNECT_GRACE = 2.0  # seconds `disconnect` waits for confirms before closing
CLOSE_TIMEOUT = 2.0  # seconds a polite close may take before the socket is dropped

InFlight = tuple[Event, Any, int]  # (event, batch, index): the sink's own bookkeeping


class BrokerState(enum.Enum):
    IDLE = "idle"  # enabled, not connected: connects on the first event (lazy, as the module)
    CONNECTING = "connecting"
    READY = "ready"
    BACKOFF = "backoff"  # connection lost or refused: retrying with backoff
    DISABLED = "disabled"  # after key_evt_amqp.disconnect: no connection until connect
    STOPPED = "stopped"


class Sink(Protocol):
    def on_ready(self) -> None: ...
    def on_settled(self, confirmed: list[InFlight], failed: list[InFlight]) -> None: ...


def amqp_url(config: Config, node: tuple[str, int] | None = None) -> URL:
    """The aiormq URL for ``config`` at ``node`` (default: the first); it contains the password:
    never log it. The vhost and TLS are given to :func:`open_link` apart."""
    host, port = node or config.amqp_nodes[0]
    return URL.build(scheme="amqp", user=config.amqp_user, password=config.amqp_password,
                     host=host, port=port, path="/",
                     query={"heartbeat": str(max(0, config.heartbeat)), "name": "key-evt-amqp"})


def _node_name(node: tuple[str, int]) -> str:
    host, port = node
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Which failure speaks for a failed round over several nodes: a refused login or vhost says the
#: settings are wrong (4), a missing exchange too (5); unreachable nodes (3) say the least.
_CODE_WEIGHT = {BrokerError.LOGIN_REFUSED: 3, BrokerError.CHANNEL_FAILED: 2, BrokerError.REFUSED: 1}


class AmqpPublisher:
    """Connects (lazily, or on :meth:`connect_now`), publishes, tracks confirms, reconnects."""

    def __init__(self, live: LiveConfig, sink: Sink, metrics: Metrics | None = None) -> None:
        self.live = live
        self.metrics = metrics if metrics is not None else Metrics()
        self.sink = sink
        self.state = BrokerState.IDLE
        self.last_error = ""
        self.last_error_ms = 0  # when it last happened (Unix ms)
        self.last_error_current = False  # until a connection opens or a message is confirmed
        self.node = ""  # host:port of the node connected to; "" when none
        self.cluster_name = ""  # the broker's cluster name, from the last connection
        self._last_node: tuple[str, int] | None = None
        self._tls: tuple[tuple[object, ...], ssl.SSLContext | None] | None = None
        self._link: ConfirmLink | None = None
        self._encoder: FrameEncoder | None = None
        self._router: Router | None = None  # None: every event takes the plain settings (fast path)
        self._node = b""
        self._frame_max = 131072
        self._pending: deque[tuple[Event, Any, int, float]] = deque()
        self._first_tag = 1  # delivery tag of _pending[0]
        self._early: dict[int, bool] = {}  # tag -> nacked, for single acks that overtook older tags
        self._returned_ids: set[bytes] = set()
        self._out: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._rlog = RateLimitedLog(log)
        #: checked before each write to the broker: a fleet's forwarder that lost its lease
        #: writes nothing more (``proxy/events/fleet.py``)
        self.may_publish: Callable[[], bool] = lambda: True
        self.fenced_writes = 0  # writes not made because the lease was not surely ours
        self.written = 0  # messages written to the broker's socket (publishes that left)
        live.subscribe(self._config_changed)

    # ---- state and capacity ---------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def room(self) -> int:
        """How many more events :meth:`publish` takes now (0 unless connected and not congested)."""
        link = self._link
        if self.state is not BrokerState.READY or link is None or link.buffered > WRITE_BUFFER_LIMIT:
            return 0
        return max(0, self.live.current.publish_window - len(self._pending))

    def _config_changed(self, config: Config) -> None:
        """Exchange, routing key and delivery mode apply to the next publish; the rest at reconnect."""
        if self._encoder is not None:
            self._encoder = self._make_encoder()

    def _make_encoder(self) -> FrameEncoder:
        c = self.live.current
        self._node = c.upstream.name.encode()  # a JSON body's node outside cluster mode
        router = Router(c.exchange, c.routing_key, c.routes, c.event_format, c.prefix_separator)
        self._router = None if router.plain else router
        # A template's text is no routing key: the plain encoder gets a placeholder it never uses.
        return FrameEncoder(CHANNEL, c.exchange, c.routing_key if router.plain else "", c.delivery_mode,
                            self._frame_max)

    def ensure_connected(self) -> None:
        """Lazy connect: start connecting if idle (not after ``disconnect``)."""
        if self.state is BrokerState.IDLE:
            self._start(connected=False)

    # ---- publishing -----------------------------------------------------------------------

    def publish(self, event: Event, batch: Any = None, index: int = 0) -> None:
        """Queue one event for the socket (written at the end of this loop iteration).

        The caller checked :meth:`room`. The outcome comes later through ``sink.on_settled``.
        """
        encoder = self._encoder
        assert encoder is not None and self.state is BrokerState.READY
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        if self._router is None and event.route is None:
            self._out.append(encoder.encode(event))
        else:
            self._out.append(self._encode_routed(encoder, event))
        self._pending.append((event, batch, index, self._now()))
        self.metrics.events_published += 1

    def _encode_routed(self, encoder: FrameEncoder, event: Event) -> bytes:
        """The frames of an event with a route of its own: the one it was first sent with (kept
        in the fallback list), else the one the settings in force give it, kept on the event."""
        route = event.route
        if route is None:
            router = self._router
            assert router is not None
            key = event.body.split(b"\n", 2)[2]
            exchange, routing_key, cut = router.route(event.db, event.name, key, event.gap is not None)
            if cut:
                self.metrics.routing_keys_truncated += 1
            route = event.route = (exchange, routing_key, b"json" if router.json else b"module")
        self.metrics.events_routed += 1
        body = None
        if route[2] == b"json":
            self.metrics.events_json += 1
            node = (dict(event.headers).get(b"node") if event.headers else None) or self._node
            body = json_body(event.message_id, event.timestamp_ms, event.db, event.name,
                             event.body.split(b"\n", 2)[2], event.gap, node)
        return encoder.encode_routed(event, route[0], route[1], body)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self._link is not None:
            if not self.may_publish():
                # Not sent; the connection goes (the broker's delivery tags would no longer match
                # ours) and what is in flight fails to the sink, whose list writes are fenced too.
                self.fenced_writes += 1
                self._drop("the fleet lease is not surely ours: nothing more is published")
                return
            self._link.write(b"".join(out))
            self.written += len(out)

    def first_direct_seq(self) -> int:
        """The pipeline number of the oldest unconfirmed event published directly (0: none)."""
        for event, batch, _, _ in self._pending:
            if batch is None:
                return event.seq
        return 0

    def abandon(self) -> None:
        """Forget every message in flight without telling the sink (the fleet's forwarder lost
        its lease: someone else publishes them); the connection is dropped and reopened."""
        self._pending.clear()
        self._out.clear()
        if self._link is not None:
            self._drop("no longer the forwarder")

    def _on_confirm(self, tag: int, multiple: bool, nack: bool) -> None:
        if tag < self._first_tag or not self._pending:
            return  # belongs to a connection we already gave up
        tag = min(tag, self._first_tag + len(self._pending) - 1)  # never past what we sent
        if not multiple and tag != self._first_tag:
            self._early[tag] = nack
            return
        confirmed: list[InFlight] = []
        failed: list[InFlight] = []
        pending = self._pending
        returned = self._returned_ids
        early = self._early
        metrics = self.metrics
        while pending and (self._first_tag <= tag or self._first_tag in early):
            was_nacked = early.pop(self._first_tag, nack) if self._first_tag <= tag else early.pop(self._first_tag)
            event, batch, index, _ = pending.popleft()
            self._first_tag += 1
            if was_nacked:
                metrics.events_nacked += 1
                failed.append((event, batch, index))
            elif returned and event.message_id in returned:
                returned.discard(event.message_id)
                metrics.events_returned += 1
                failed.append((event, batch, index))
            else:
                confirmed.append((event, batch, index))
        if confirmed:
            metrics.events_confirmed += len(confirmed)
            metrics.publish_latency.observe_confirmed(int(time.time() * 1000), confirmed)
            self.last_error_current = False
        if failed:
            self._record_error("broker refused message(s): nack or unroutable")
            self._rlog.warn("refused", "amqp: broker refused %d message(s) (nack or unroutable); "
                            "they go to the fallback list", len(failed))
        self.sink.on_settled(confirmed, failed)

    def _on_return(self, message_id: bytes, code: int, text: str) -> None:
        # basic.return comes before the basic.ack of the same message: remember, fail at the ack.
        self._returned_ids.add(message_id)
        c = self.live.current
        self._record_error(f"nothing is bound to exchange {c.exchange!r} with routing key "
                           f"{c.routing_key!r} ({code} {text}): events wait in the fallback list "
                           f"until a queue is bound")
        self._rlog.warn("returned", "amqp: %s", self.last_error)

    # ---- connection life-cycle ----------------------------------------------------------

    def _start(self, connected: bool) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.state = BrokerState.READY if connected else BrokerState.CONNECTING
        self._task = asyncio.get_running_loop().create_task(self._run(connected), name="amqp-publisher")

    async def _run(self, connected: bool) -> None:
        delay = RECONNECT_MIN
        while True:
            check_cancelled()
            if not connected:
                self.state = BrokerState.CONNECTING
                try:
                    await self._open(self.live.current)
                except BrokerError as exc:
                    self._note_error(f"cannot connect to RabbitMQ: {exc.reason}")
                    self.state = BrokerState.BACKOFF
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # asked to stop as the connect ended
                    self._drop("connection attempt cancelled", abort=False)
                    raise asyncio.CancelledError
            connected = False
            self.state = BrokerState.READY
            self.last_error_current = False
            assert self._lost is not None
            up_since = self._now()
            self.sink.on_ready()
            await self._lost
            self.state = BrokerState.BACKOFF
            # A connection that dies at once (a channel closed for a missing exchange, a broker
            # that accepts and drops) must not turn into a tight reconnect loop.
            delay = RECONNECT_MIN if self._now() - up_since > STABLE_AFTER else min(delay * 2, RECONNECT_MAX)
            await asyncio.sleep(delay)

    async def _open(self, config: Config) -> None:
        """Connect to a node, open the confirm channel, check the exchange, start the watchdog.

        Nodes are tried in a random order, the one lost last at the end. Raises BrokerError when
        none worked: the most telling code (4, then 5, then 3) and every node's reason.
        """
        failures: list[BrokerError] = []
        listener = LinkListener(self._on_confirm, self._on_return, self._on_closed)
        timeout = config.amqp_connect_timeout or config.connect_timeout
        for node in self._node_order(config.amqp_nodes):
            try:
                link = await open_link(amqp_url(config, node), listener, timeout, vhost=config.amqp_vhost,
                                       exchange=config.exchange, tls=self._tls_context(config),
                                       server_name=config.amqp_tls_server_name or None)
            except BrokerError as exc:
                failures.append(exc)
                continue
            self._attach(link, node, config)
            return
        if len(failures) == 1:
            raise failures[0]
        code = max((f.code for f in failures), key=lambda c: _CODE_WEIGHT.get(c, 0))
        raise BrokerError(code, "; ".join(f.reason for f in failures))

    def _node_order(self, nodes: tuple[tuple[str, int], ...]) -> list[tuple[str, int]]:
        order = list(nodes)
        random.shuffle(order)
        if self._last_node in order and len(order) > 1:
            order.remove(self._last_node)
            order.append(self._last_node)  # it just failed: the others first
        return order

    def _tls_context(self, config: Config) -> ssl.SSLContext | None:
        """The TLS context for ``config``, built again only when its TLS settings change."""
        key = (config.amqp_tls, config.amqp_tls_ca, config.amqp_tls_cert, config.amqp_tls_key,
               config.amqp_tls_verify)
        if self._tls is None or self._tls[0] != key:
            try:
                self._tls = (key, client_context(config))
            except ValueError as exc:  # a file changed since the start
                raise BrokerError(BrokerError.REFUSED, str(exc)) from None
        return self._tls[1]

    def _attach(self, link: ConfirmLink, node: tuple[str, int], config: Config) -> None:
        self._link = link
        self._frame_max = min(link.frame_max, config.amqp_frame_max or link.frame_max)
        self._encoder = self._make_encoder()
        self._first_tag = 1
        self._early.clear()
        self._returned_ids.clear()
        self._lost = asyncio.get_running_loop().create_future()
        self.metrics.amqp_connections += 1
        self._last_node = node
        self.node, self.cluster_name = _node_name(node), link.cluster_name
        self._watchdog = asyncio.get_running_loop().create_task(self._watch(link))
        cluster = f", cluster {link.cluster_name}" if link.cluster_name else ""
        log.info("amqp: connected to %s (%s%s; vhost %r, exchange %r checked; heartbeat %ss%s)",
                 self.node, link.server, cluster, config.amqp_vhost, config.exchange or "(default)",
                 config.heartbeat, ", TLS" if config.amqp_tls else "")

    def _on_closed(self, reason: str) -> None:
        self._drop(f"connection or channel closed: {reason}")

    async def _watch(self, link: ConfirmLink) -> None:
        """Give up on a broker that stops answering: heartbeat silence or a confirm overdue."""
        config = self.live.current
        heartbeat = config.heartbeat
        timeout = config.publish_timeout
        step = min(0.5, heartbeat / 4) if heartbeat > 0 else 0.5
        while link is self._link:
            await asyncio.sleep(step)
            now = self._now()
            silence = now - link.last_rx
            if heartbeat > 0 and silence > HEARTBEAT_SILENCE * heartbeat:
                self._drop(f"no frame from the broker for {silence:.1f}s "
                           f"(heartbeat {heartbeat}s): connection dead")
            elif self._pending and now - self._pending[0][3] > timeout:
                self.metrics.publish_timeouts += 1
                self._drop(f"no confirm within {timeout}s (broker blocked or unreachable)")

    def _drop(self, reason: str, abort: bool = True) -> None:
        """Forget the current connection: everything in flight fails; the socket is aborted
        unless ``abort`` is False (a close on purpose: the caller closes the link itself)."""
        link = self._link
        if link is None:
            return
        if abort:
            self._note_error(reason)
        else:
            log.info("amqp: %s (%d message(s) unconfirmed go to the fallback list)", reason, len(self._pending))
        self._link = self._encoder = None
        self.node = ""
        self._out.clear()
        if abort:
            link.abort()
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
        failed = [(event, batch, index) for event, batch, index, _ in self._pending]
        self._pending.clear()
        self._early.clear()
        self._returned_ids.clear()
        if self.state is BrokerState.READY:
            self.state = BrokerState.BACKOFF
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        self.sink.on_settled([], failed)

    async def connect_now(self) -> None:
        """``key_evt_amqp.connect``: connect now with the configuration in force. Raises BrokerError.

        The caller checks "already connected" first. On failure the previous mode is kept: an
        enabled publisher keeps retrying in the background, a disabled one stays disabled.
        """
        previous = self.state
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_TIMEOUT)  # bounded, whatever it does
        self.state = BrokerState.CONNECTING
        try:
            await self._open(self.live.current)
        except BrokerError as exc:
            self._note_error(f"cannot connect to RabbitMQ: {exc.reason}")
            self.state = previous if previous in (BrokerState.DISABLED, BrokerState.IDLE) else BrokerState.BACKOFF
            if self.state is BrokerState.BACKOFF:
                self._start(connected=False)
            raise
        self._start(connected=True)

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` for every in-flight message to be confirmed or failed."""
        self._flush()
        deadline = self._now() + timeout
        while self._pending and self._link is not None and self._now() < deadline:
            await asyncio.sleep(0.02)

    async def disconnect(self, final: bool = False) -> bool:
        """Stop publishing (``key_evt_amqp.disconnect``, or for good at shutdown when ``final``).

        Waits briefly for confirms, then closes; unconfirmed messages fail to the sink. Returns
        whether a connection was open.
        """
        was_connected = self._link is not None
        self.state = BrokerState.STOPPED if final else BrokerState.DISABLED
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_TIMEOUT)  # bounded, whatever it does
        if was_connected and not final:
            await self.settle(DISCONNECT_GRACE)
        link = self._link
        if link is not None:
            self._drop("disconnected on request" if not final else "shutting down", abort=False)
            await link.close(CLOSE_TIMEOUT)
        self.state = BrokerState.STOPPED if final else BrokerState.DISABLED
        return was_connected

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("amqp: %s", message)
        self._record_error(message)

    def _record_error(self, message: str) -> None:
        self.last_error, self.last_error_ms, self.last_error_current = message, int(time.time() * 1000), True
