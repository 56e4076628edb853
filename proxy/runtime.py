"""What our own ``key_evt_amqp.*`` commands act on: :class:`Runtime`.

Built by :func:`proxy.server.serve` once everything it reports on exists, and handed to every client
connection, which passes it to :mod:`proxy.admin` for each of our commands. Through it a command
reads or replaces the configuration in force (:class:`~proxy.live.LiveConfig`: the event service,
the publisher and the pipeline hear of the change from there), connects or disconnects the broker,
and reads the counters of the clients and of the event pipeline.
"""

from __future__ import annotations

import time
from typing import Protocol

from protocol import replies
from proxy.config import Config
from proxy.errors import CommandError
from proxy.live import LiveConfig
from proxy.metrics import Metrics
from proxy.state import ServerState

__all__ = ["Events", "Runtime"]


class Events(Protocol):
    """What our commands do with the event pipeline (:class:`proxy.events.service.EventService`)."""

    async def connect(self) -> str:
        """Connect to the broker now, with the configuration in force; the reply's text. Raises
        :class:`~proxy.errors.CommandError` with the error's text."""

    async def disconnect(self) -> str:
        """Stop publishing until :meth:`connect`; the reply's text. Raises CommandError."""

    def info(self) -> dict[str, object]:
        """The pipeline's fields of ``key_evt_amqp.info``, in order."""

    def health(self) -> dict[str, object]:
        """``redis``, ``broker``, ``fallback``: whether each works now (and their states)."""


class Runtime:
    """The live configuration, the event service and the client counters, as commands see them."""

    def __init__(self, live: LiveConfig, events: Events, server_state: ServerState) -> None:
        self.live = live
        self.events = events
        self.server_state = server_state
        self.started = time.time()

    @property
    def metrics(self) -> Metrics:
        """The proxy's counters (:mod:`proxy.metrics`)."""
        return self.server_state.metrics

    @property
    def config(self) -> Config:
        """The configuration in force."""
        return self.live.current

    def update(self, config: Config) -> None:
        """Put ``config`` in force; everyone who subscribed to the live configuration is told."""
        self.live.update(config)

    async def connect(self, config: Config) -> bytes:
        """``key_evt_amqp.connect`` with ``config`` (the handler has put it in force already)."""
        if config != self.live.current:
            self.update(config)
        try:
            return replies.simple(await self.events.connect())
        except CommandError as exc:
            return replies.error(str(exc))

    async def disconnect(self) -> bytes:
        try:
            return replies.simple(await self.events.disconnect())
        except CommandError as exc:
            return replies.error(str(exc))

    def info(self) -> dict[str, object]:
        clients = self.server_state
        values: dict[str, object] = {
            "uptime_in_seconds": int(time.time() - self.started),
            "connected_clients": len(clients.clients),
            "total_connections_received": clients.metrics.clients_accepted,
            "rejected_connections": clients.metrics.clients_rejected,
        }
        values.update(self.events.info())
        return values

    def health(self) -> dict[str, object]:
        """``/readyz``: ready when Redis is reachable and events can go to the broker or the
        fallback list; the body says which part is not."""
        parts = self.events.health()
        return {"ready": bool(parts["redis"] and (parts["broker"] or parts["fallback"])), **parts}
