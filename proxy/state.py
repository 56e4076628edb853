"""What every client connection shares (uvicorn's ``ServerState``, for the relays).

The :class:`~proxy.server.Server` builds one :class:`ServerState` and hands it to each client
connection, with the :class:`~proxy.runtime.Runtime` for our own commands. A connection asks it to
be admitted (:meth:`ServerState.admit`), forgotten, and to keep a task alive; it reads where the
upstream is and the limits from it. It points at nothing above it: the server drives the shutdown
through :attr:`ServerState.clients`, and the runtime reads the counters for ``key_evt_amqp.info``.

Everything here is fixed at start except the clients, the counters and the tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

from proxy.config import Config
from proxy.metrics import Metrics

__all__ = ["Client", "ServerState"]


class Client(Protocol):
    """A client connection, as the server sees it at shutdown."""

    transport: asyncio.Transport | None

    def shut_down(self) -> None:
        """Read no more; close once every reply owed is written (the server bounds the wait)."""


class ServerState:
    """The clients, their counters, the tasks kept alive, and the settings every connection reads."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.upstream = config.upstream  # the Redis (or the cluster's seed) behind the proxy
        self.connect_timeout = config.connect_timeout
        #: bytes buffered per direction before the peer is paused (a security limit, per client)
        self.buffer_limit = config.client_buffer_limit
        self.max_clients = config.max_clients
        self.clients: set[Client] = set()
        #: the proxy's counters (clients accepted and rejected here; bytes and commands by the relays)
        self.metrics = metrics if metrics is not None else Metrics()
        self.tasks: set[asyncio.Task[Any]] = set()

    def admit(self, client: Client) -> bool:
        """Count a new connection; False when ``max_clients`` are connected (refuse it)."""
        self.metrics.clients_accepted += 1
        if len(self.clients) >= self.max_clients:
            self.metrics.clients_rejected += 1
            return False
        self.clients.add(client)
        return True

    def forget(self, client: Client) -> None:
        self.clients.discard(client)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a task that is kept (so it is neither lost nor leaked) and cancelled at shutdown."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
