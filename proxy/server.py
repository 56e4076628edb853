"""The I/O shell: listen, keep the connections, run the event service, shut down gracefully."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any

import uvloop

from protocol import replies
from proxy.cluster.relay import ClusterClientConnection
from proxy.cluster.topology import Topology, is_cluster
from proxy.config import Config
from proxy.events.errors import AmqpCommandError
from proxy.events.service import EventService
from proxy.relay import ClientConnection

log = logging.getLogger("key_evt_amqp")


class Runtime:
    """The live configuration and the event service; admin commands go through here.

    The configuration is never mutated: :meth:`update` swaps in a new one and tells the
    event service.
    """

    def __init__(self, config: Config, events: EventService) -> None:
        self.config = config
        self.events = events
        self.started = time.time()
        self.server: Server | None = None

    def update(self, config: Config) -> None:
        self.config = config
        self.events.apply_config(config)

    async def connect(self, config: Config) -> bytes:
        try:
            return replies.simple(await self.events.connect(config))
        except AmqpCommandError as exc:
            return replies.error(str(exc))

    async def disconnect(self) -> bytes:
        try:
            return replies.simple(await self.events.disconnect())
        except AmqpCommandError as exc:
            return replies.error(str(exc))

    def info(self) -> dict[str, object]:
        values: dict[str, object] = {
            "uptime_in_seconds": int(time.time() - self.started),
            "connected_clients": len(self.server.clients) if self.server else 0,
            "total_connections_received": self.server.accepted if self.server else 0,
            "rejected_connections": self.server.rejected if self.server else 0,
        }
        values.update(self.events.info())
        return values


class Server:
    """Accepts clients; each :class:`ClientConnection` opens its own upstream connection."""

    def __init__(self, runtime: Runtime) -> None:
        config = runtime.config
        self.runtime = runtime
        self.upstream_address = config.upstream
        self.connect_timeout = config.connect_timeout
        self.buffer_limit = config.client_buffer_limit
        self.max_clients = config.max_clients
        self.clients: set[ClientConnection] = set()
        self.accepted = 0
        self.rejected = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.base_events.Server | None = None
        self.topology: Topology | None = None  # set at start when the upstream is a cluster

    def admit(self, client: ClientConnection) -> bool:
        self.accepted += 1
        if len(self.clients) >= self.max_clients:
            self.rejected += 1
            return False
        self.clients.add(client)
        return True

    def forget(self, client: ClientConnection) -> None:
        self.clients.discard(client)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a task the server keeps a reference to (so it is neither lost nor leaked)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        factory: Any = ClientConnection
        if await is_cluster(self.runtime.config):
            self.topology = Topology(self.runtime.config)
            await self.topology.start()
            factory = ClusterClientConnection
        self._listener = await loop.create_server(
            lambda: factory(self), host, port, reuse_address=True, backlog=1024
        )

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
        for client in list(self.clients):
            client.shut_down()
        deadline = time.monotonic() + timeout
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.close()
        for task in list(self._tasks):
            task.cancel()
        if self._listener is not None:
            await self._listener.wait_closed()


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> int:
    events = EventService(config)
    runtime = Runtime(config, events)
    server = Server(runtime)
    runtime.server = server
    try:
        await server.start(config.listen_host, config.listen_port)
    except OSError as exc:
        print(f"key-evt-amqp: cannot listen on {config.listen_host}:{config.listen_port}: "
              f"{exc.strerror}", file=sys.stderr)
        return 1
    if server.topology is not None:
        events.use_cluster(server.topology)
    await events.start()
    log.info(
        "key-evt-amqp listening on %s, relaying to %s; events %r with keymasks %s to "
        "amqp://%s:***@%s:%d%s exchange %r routing key %r",
        ", ".join(server.addresses), config.upstream.masked_url(), config.events,
        [m.decode("utf-8", "replace") for m in config.keymasks] or "(none: nothing forwarded)",
        config.amqp_user, config.amqp_host, config.amqp_port, config.amqp_vhost,
        config.exchange, config.routing_key,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down: no new clients, finishing replies owed (at most %.1fs)",
             config.shutdown_timeout)
    await server.shutdown(config.shutdown_timeout)
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
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return uvloop.run(serve(config))
