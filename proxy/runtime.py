"""What our own ``key_evt_amqp.*`` commands act on: :class:`Runtime`.

Built by :func:`proxy.server.serve` once everything it reports on exists, and handed to every client
connection, which passes it to :mod:`proxy.admin` for each of our commands. Through it a command
reads or replaces the configuration in force (:class:`~proxy.live.LiveConfig`: the event service,
the publisher and the pipeline hear of the change from there), connects or disconnects the broker,
and reads the counters of the clients and of the event pipeline.
"""

from __future__ import annotations

import time

from protocol import replies
from proxy.config import Config
from proxy.events.errors import AmqpCommandError
from proxy.events.service import EventService
from proxy.live import LiveConfig
from proxy.state import ServerState

__all__ = ["Runtime"]


class Runtime:
    """The live configuration, the event service and the client counters, as commands see them."""

    def __init__(self, live: LiveConfig, events: EventService, server_state: ServerState) -> None:
        self.live = live
        self.events = events
        self.server_state = server_state
        self.started = time.time()

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
        except AmqpCommandError as exc:
            return replies.error(str(exc))

    async def disconnect(self) -> bytes:
        try:
            return replies.simple(await self.events.disconnect())
        except AmqpCommandError as exc:
            return replies.error(str(exc))

    def info(self) -> dict[str, object]:
        clients = self.server_state
        values: dict[str, object] = {
            "uptime_in_seconds": int(time.time() - self.started),
            "connected_clients": len(clients.clients),
            "total_connections_received": clients.accepted,
            "rejected_connections": clients.rejected,
        }
        values.update(self.events.info())
        return values
