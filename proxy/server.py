"""The I/O shell: listen, keep the connections, run the event service, shut down gracefully."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import signal
import ssl
import sys
import time
from collections.abc import Callable
from functools import partial

import uvloop

from proxy.cluster.relay import ClusterClientConnection
from proxy.cluster.topology import Topology, is_cluster
from proxy.config import Config
from proxy.errors import SentinelError
from proxy.connect import open_redis_streams, server_tls_context, tls_reason
from proxy.events.service import EventService
from proxy.fleet.shared_config import SharedConfig, locator
from proxy.listen import Listener, open_listener
from proxy import logs
from proxy.live import LiveConfig
from proxy.metrics import Metrics
from proxy.monitor import Monitor
from proxy.relay import ClientConnection
from proxy.runtime import Runtime
from proxy.sentinel import SentinelWatch
from proxy.state import ServerState
from proxy.workers import Worker

log = logging.getLogger("key_evt_amqp")


class Server:
    """Listens; each client gets a connection of its own (single-node or cluster relay), bound to
    the shared :class:`~proxy.state.ServerState` and the :class:`~proxy.runtime.Runtime`."""

    def __init__(self, state: ServerState, runtime: Runtime, topology: Topology | None) -> None:
        self.state = state
        self.runtime = runtime
        self.topology = topology  # None: a single Redis behind the proxy
        self._listener: Listener | None = None

    async def start(self, config: Config, *, reuse_port: bool = False) -> None:
        """Listen where ``config`` says (TCP or a unix socket, plain or TLS); raises OSError when
        that is not possible. ``reuse_port``: beside the other workers' sockets on the same port
        (``SO_REUSEPORT``, proxy/workers.py)."""
        factory: Callable[[], asyncio.Protocol]
        if self.topology is None:
            factory = partial(ClientConnection, self.state, self.runtime)
        else:
            factory = partial(ClusterClientConnection, self.state, self.runtime, self.topology)
        tls = None
        if config.tls_cert is not None and config.tls_key is not None:
            tls = server_tls_context(config.tls_cert, config.tls_key, config.tls_ca)
        self._listener = await open_listener(factory, config, tls, reuse_port=reuse_port)

    @property
    def addresses(self) -> list[str]:
        assert self._listener is not None
        return self._listener.addresses

    def close_clients(self) -> None:
        """Close every client connection as Redis closes them (no reply, a plain close): Sentinel
        moved the master and has the old one close its clients too. They connect again, to the
        new master."""
        for client in list(self.state.clients):
            if client.transport is not None:
                client.transport.close()

    async def shutdown(self, timeout: float) -> None:
        """Stop listening, stop reading clients, let replies owed finish, then close."""
        if self._listener is not None:
            self._listener.close()
        if self.topology is not None:
            self.topology.close()
        clients = self.state.clients
        for client in list(clients):
            client.shut_down()
        deadline = time.monotonic() + timeout
        while clients and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for client in list(clients):
            if client.transport is not None:
                client.transport.close()
        for task in list(self.state.tasks):
            task.cancel()
        if self._listener is not None:
            await self._listener.wait_closed()


async def _check_upstream(config: Config) -> str | None:
    """One round trip to the upstream at start. A failed TLS handshake (wrong CA, name, client
    certificate) is a configuration error: its reason is returned and the start fails. Redis not
    answering is not (it may come later: clients are closed until then): a WARNING, None."""
    upstream = config.upstream
    if upstream.tls is not None and not upstream.tls.verify:
        log.warning("TLS to Redis WITHOUT certificate verification (--upstream-tls-insecure): "
                    "anyone on the path can read and change what the proxy says to Redis")
    try:
        reader, writer = await open_redis_streams(upstream, timeout=config.connect_timeout)
        try:
            writer.write(b"PING\r\n")
            reply = await asyncio.wait_for(reader.read(256), config.connect_timeout)
        finally:
            writer.close()
        if not reply:
            raise ConnectionResetError(errno.ECONNRESET, "closed the connection at once")
    except ssl.SSLError as exc:
        return f"TLS: {tls_reason(exc)}"
    except (OSError, asyncio.TimeoutError) as exc:
        if upstream.tls is not None and isinstance(exc, ConnectionResetError):
            # TLS 1.3: a server that refuses our certificate says so after the handshake
            return f"TLS: the server closed the connection after the handshake ({tls_reason(exc)}): " \
                   "does it require a client certificate (--upstream-tls-cert)?"
        reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else tls_reason(exc)
        if upstream.tls is not None and isinstance(exc, asyncio.TimeoutError):
            reason += ", TLS handshake unanswered: is it a TLS port?"
        log.warning("Redis at %s does not answer now (%s): clients are closed until it does",
                    upstream.masked_url(), reason)
    return None


async def _cluster_topology(config: Config) -> Topology | None:
    """The cluster's slot map, kept current, when the upstream is a cluster; None for one Redis."""
    if config.upstream.sentinel is not None or config.upstream.unix_path is not None:
        return None  # a cluster is reached at a seed's TCP address
    if not await is_cluster(config):
        return None
    topology = Topology(config.upstream)
    await topology.start()
    return topology


async def serve(config: Config, *, ready: asyncio.Event | None = None,
                worker: Worker | None = None) -> int:
    """Run the proxy until SIGTERM or SIGINT, alone or as ``worker``; returns the exit code.

    Everything is built in the order it depends on: the live configuration, the cluster map (in
    cluster mode), the fleet's shared settings (read from Redis), the event service, what the connections share, what our commands act on, and
    the listener.
    """
    watch: SentinelWatch | None = None
    if config.upstream.sentinel is not None:
        watch = SentinelWatch(config.upstream, config.connect_timeout)
        try:
            await watch.start()
        except SentinelError as exc:
            print(f"key-evt-amqp: cannot find the master via Sentinel: {exc}", file=sys.stderr)
            return 1
    problem = await _check_upstream(config)
    if problem is not None:
        print(f"key-evt-amqp: cannot connect to Redis at {config.upstream.masked_url()}: {problem}",
              file=sys.stderr)
        if watch is not None:
            await watch.stop()
        return 1
    live = LiveConfig(config)
    metrics = Metrics()
    topology = await _cluster_topology(config)
    shared = SharedConfig(live, *locator(config.upstream, topology))
    await shared.load()  # the fleet's settings, before anything reads the live configuration
    config = live.current
    events = EventService(live, topology, watch, metrics)
    state = ServerState(config, metrics)
    runtime = Runtime(live, events, state, shared, worker)
    server = Server(state, runtime, topology)
    monitor = Monitor(metrics, runtime.info, runtime.health)
    if watch is not None:  # after the event service's own listener: the subscription moves first
        watch.listeners.append(lambda old, new, since_ms: server.close_clients())
    where = f"unix:{config.listen_unix}" if config.listen_unix else f"{config.listen_host}:{config.listen_port}"
    # With --workers, worker k serves its own metrics on the port + k - 1 (each its own counters).
    metrics_port = config.metrics_port + (worker.index - 1 if worker is not None and config.metrics_port else 0)
    try:
        await server.start(config, reuse_port=worker is not None)
        if metrics_port:
            where = f"{config.metrics_host}:{metrics_port} (--metrics-listen)"
            await monitor.start(config.metrics_host, metrics_port)
    except OSError as exc:
        await shared.stop()
        await server.shutdown(0)  # closes the listener (if open) and the topology
        print(f"key-evt-amqp: cannot listen on {where}: {exc.strerror}", file=sys.stderr)
        return 1
    await shared.start(events.set_enabled)
    await events.start()
    log.info(
        "key-evt-amqp listening on %s%s, relaying to %s; events %r with keymasks %s to "
        "%s exchange %r routing key %r",
        ", ".join(server.addresses), _tls_note(config), config.upstream.masked_url(), config.events,
        [m.decode("utf-8", "replace") for m in config.keymasks] or "(none: nothing forwarded)",
        config.amqp_masked_url(), config.exchange, config.routing_key,
    )
    if monitor.address:
        log.info("metrics on http://%s/metrics (and /healthz, /readyz)", monitor.address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # No reload: most settings are fixed at start, the others are changed by our commands, and a
    # file read again would silently undo those. SIGHUP must not stop the proxy either.
    loop.add_signal_handler(signal.SIGHUP, log.warning, "SIGHUP: the configuration is not reloaded "
                            "(restart the proxy, or change it with the key_evt_amqp.* commands)")
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down: no new clients, finishing replies owed (at most %.1fs)",
             config.shutdown_timeout)
    await server.shutdown(config.shutdown_timeout)
    await shared.stop()
    await monitor.close()
    await events.stop()
    if watch is not None:
        await watch.stop()
    log.info("stopped")
    return 0


def _tls_note(config: Config) -> str:
    if config.tls_cert is None:
        return ""
    return " (TLS, client certificates required)" if config.tls_ca else " (TLS)"


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which freed read
    buffers (uvloop reads 256 KiB at a time) stay in the heap: RSS would not come back after a
    burst. A fixed threshold keeps large blocks in their own mappings, returned when freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (also turns the dynamic threshold off)
        libc.mallopt(-1, 1024 * 1024)  # M_TRIM_THRESHOLD: give back heap tops over 1 MiB
    except (OSError, AttributeError):  # not glibc: its own allocator decides
        pass


def run(config: Config, worker: Worker | None = None) -> int:
    """Run the proxy until SIGTERM or SIGINT, alone or as ``worker`` of a
    :class:`~proxy.workers.Supervisor`; returns the process exit code."""
    _return_freed_memory()
    logs.setup(config.log_level, config.log_format, tag=f"worker {worker.index}" if worker is not None else "")
    return uvloop.run(serve(config, worker=worker))
