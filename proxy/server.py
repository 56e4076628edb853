"""The I/O shell: listen, keep the connections, run the event service, shut down gracefully."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import sys
import time
from collections.abc import Callable
from functools import partial

import uvloop

from proxy.cluster.relay import ClusterClientConnection
from proxy.cluster.topology import Topology, is_cluster
from proxy.config import Config
from proxy.events.service import EventService
from proxy import logs
from proxy.live import LiveConfig
from proxy.metrics import Metrics
from proxy.monitor import Monitor
from proxy.relay import ClientConnection
from proxy.runtime import Runtime
from proxy.state import ServerState

log = logging.getLogger("key_evt_amqp")


class Server:
    """Listens; each client gets a connection of its own (single-node or cluster relay), bound to
    the shared :class:`~proxy.state.ServerState` and the :class:`~proxy.runtime.Runtime`."""

    def __init__(self, state: ServerState, runtime: Runtime, topology: Topology | None) -> None:
        self.state = state
        self.runtime = runtime
        self.topology = topology  # None: a single Redis behind the proxy
        self._listener: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host``:``port``; raises OSError when that is not possible."""
        factory: Callable[[], asyncio.Protocol]
        if self.topology is None:
            factory = partial(ClientConnection, self.state, self.runtime)
        else:
            factory = partial(ClusterClientConnection, self.state, self.runtime, self.topology)
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(factory, host, port, reuse_address=True, backlog=1024)

    @property
    def addresses(self) -> list[str]:
        assert self._listener is not None
        out = []
        for sock in self._listener.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

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


async def _cluster_topology(config: Config) -> Topology | None:
    """The cluster's slot map, kept current, when the upstream is a cluster; None for one Redis."""
    if not await is_cluster(config):
        return None
    topology = Topology(config.upstream)
    await topology.start()
    return topology


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> int:
    """Run the proxy until SIGTERM or SIGINT; returns the process exit code.

    Everything is built in the order it depends on: the live configuration, the cluster map (in
    cluster mode), the event service, what the connections share, what our commands act on, and
    the listener.
    """
    live = LiveConfig(config)
    metrics = Metrics()
    topology = await _cluster_topology(config)
    events = EventService(live, topology, metrics)
    state = ServerState(config, metrics)
    runtime = Runtime(live, events, state)
    server = Server(state, runtime, topology)
    monitor = Monitor(metrics, runtime.info, runtime.health)
    where = f"{config.listen_host}:{config.listen_port}"
    try:
        await server.start(config.listen_host, config.listen_port)
        if config.metrics_port:
            where = f"{config.metrics_host}:{config.metrics_port} (--metrics-listen)"
            await monitor.start(config.metrics_host, config.metrics_port)
    except OSError as exc:
        await server.shutdown(0)  # closes the listener (if open) and the topology
        print(f"key-evt-amqp: cannot listen on {where}: {exc.strerror}", file=sys.stderr)
        return 1
    await events.start()
    log.info(
        "key-evt-amqp listening on %s, relaying to %s; events %r with keymasks %s to "
        "amqp://%s:***@%s:%d%s exchange %r routing key %r",
        ", ".join(server.addresses), config.upstream.masked_url(), config.events,
        [m.decode("utf-8", "replace") for m in config.keymasks] or "(none: nothing forwarded)",
        config.amqp_user, config.amqp_host, config.amqp_port, config.amqp_vhost,
        config.exchange, config.routing_key,
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
    await monitor.close()
    await events.stop()
    log.info("stopped")
    return 0


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


def run(config: Config) -> int:
    """Run the proxy until SIGTERM or SIGINT; returns the process exit code."""
    _return_freed_memory()
    logs.setup(config.log_level, config.log_format)
    return uvloop.run(serve(config))
