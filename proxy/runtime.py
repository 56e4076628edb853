"""What our own ``key_evt_amqp.*`` commands act on: :class:`Runtime`.

Built by :func:`proxy.server.serve` once everything it reports on exists, and handed to every client
connection, which passes it to :mod:`proxy.admin` for each of our commands. Through it a command
reads the configuration in force (:class:`~proxy.live.LiveConfig`), changes it for every instance
of the fleet (:class:`Settings`, kept in Redis: the event service, the publisher and the pipeline
hear of the change from the live configuration), connects or disconnects the broker, and reads the
counters of the clients and of the event pipeline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from protocol import replies
from proxy.config import Config
from proxy.errors import CommandError, ConfigError
from proxy.live import LiveConfig
from proxy.metrics import Metrics
from proxy.state import ServerState
from proxy.workers import Worker

__all__ = ["Change", "Events", "Runtime", "Settings"]

OK = replies.simple("OK")


@dataclass(frozen=True, slots=True)
class Change:
    """What a command sets: the Config ``fields`` it owns, and how they are computed from the
    configuration in force (``make`` raises ConfigError for a bad argument)."""

    fields: Sequence[str]
    make: Callable[[Config], Config]


NO_CHANGE = Change((), lambda config: config)


class Events(Protocol):
    """What our commands do with the event pipeline (:class:`proxy.events.service.EventService`)."""

    async def connect(self) -> str:
        """Connect to the broker now, with the configuration in force; the reply's text. Raises
        :class:`~proxy.errors.CommandError` with the error's text."""

    async def disconnect(self) -> str:
        """Stop publishing until :meth:`connect`; the reply's text. Raises CommandError."""

    async def set_enabled(self, enabled: bool) -> None:
        """Disconnect, or connect in the background (retrying) if disconnected; no reply."""

    def info(self) -> dict[str, object]:
        """The pipeline's fields of ``key_evt_amqp.info``, in order."""

    def health(self) -> dict[str, object]:
        """``redis``, ``broker``, ``fallback``: whether each works now (and their states)."""

    async def fleet_members(self) -> list[dict[str, str]]:
        """The live instances of the fleet, from their heartbeats. Raises CommandError."""


class Settings(Protocol):
    """Where commands change the settings: for every instance of the fleet
    (:class:`proxy.fleet.shared_config.SharedConfig`)."""

    async def change(self, fields: Sequence[str], make: Callable[[Config], Config], *,
                     enabled: bool | None = None,
                     then: Callable[[], Awaitable[bytes]] | None = None) -> bytes | None:
        """Set ``fields`` to their values in ``make(config)`` (and ``amqp_enabled`` unless None)
        everywhere, then return ``then()``, run here. Raises ConfigError or CommandError, having
        changed nothing."""

    async def reset(self) -> None:
        """Every instance back to its start values. Raises CommandError, having changed nothing."""

    def origins(self) -> dict[str, str]:
        """Setting -> where its value came from (default, file, env, flag, command)."""

    def info(self) -> dict[str, object]:
        """The shared settings' fields of ``key_evt_amqp.info``."""


class Runtime:
    """The live configuration, the event service and the client counters, as commands see them."""

    def __init__(self, live: LiveConfig, events: Events, server_state: ServerState,
                 settings: Settings, worker: Worker | None = None) -> None:
        self.live = live
        self.events = events
        self.server_state = server_state
        self.settings = settings
        self.worker = worker  # None: the single process
        self.started = time.time()

    @property
    def metrics(self) -> Metrics:
        """The proxy's counters (:mod:`proxy.metrics`)."""
        return self.server_state.metrics

    @property
    def config(self) -> Config:
        """The configuration in force."""
        return self.live.current

    async def change(self, change: Change) -> bytes:
        """Apply ``change`` on every instance: ``+OK``, or the error (nothing changed)."""
        try:
            await self.settings.change(change.fields, change.make)
        except ConfigError as exc:
            return replies.error(f"ERR {exc}")
        except CommandError as exc:
            return replies.error(str(exc))
        return OK

    async def reset(self) -> bytes:
        """``key_evt_amqp.config_reset``: every instance back to its start values."""
        try:
            await self.settings.reset()
        except CommandError as exc:
            return replies.error(str(exc))
        return OK

    async def connect(self, change: Change = NO_CHANGE) -> bytes:
        """``key_evt_amqp.connect``: apply ``change`` and enable the broker on every instance,
        then connect here; the reply is this instance's connect (the module's codes)."""
        return await self._switch(change, enabled=True, here=self._connect_here)

    async def _connect_here(self) -> str:
        try:
            return await self.events.connect()
        except CommandError:
            # The fleet is enabled now: keep trying in the background, as every other instance
            # does (the reply still says this attempt failed).
            await self.events.set_enabled(True)
            raise

    async def disconnect(self) -> bytes:
        """``key_evt_amqp.disconnect``: disable the broker on every instance; the reply is this
        instance's disconnect."""
        return await self._switch(NO_CHANGE, enabled=False, here=self.events.disconnect)

    async def _switch(self, change: Change, *, enabled: bool, here: Callable[[], Awaitable[str]]) -> bytes:
        async def local() -> bytes:
            try:
                return replies.simple(await here())
            except CommandError as exc:
                return replies.error(str(exc))

        try:
            reply = await self.settings.change(change.fields, change.make, enabled=enabled, then=local)
        except ConfigError as exc:
            return replies.error(f"ERR {exc}")
        except CommandError as exc:
            return replies.error(str(exc))
        assert reply is not None  # then= gives the reply
        return reply

    def info(self) -> dict[str, object]:
        clients = self.server_state
        values: dict[str, object] = {
            "uptime_in_seconds": int(time.time() - self.started),
            "worker": self.worker.index if self.worker is not None else 0,
            "worker_pid": os.getpid(),
            "connected_clients": len(clients.clients),
            "total_connections_received": clients.metrics.clients_accepted,
            "rejected_connections": clients.metrics.clients_rejected,
        }
        values.update(self.events.info())
        values.update(self.settings.info())
        return values

    async def fleet(self, resp3: bool) -> bytes:
        """``key_evt_amqp.fleet``: one entry per live instance (a map in RESP3, field-value pairs
        in RESP2)."""
        try:
            members = await self.events.fleet_members()
        except CommandError as exc:
            return replies.error(str(exc))
        return replies.encode(members, resp3=resp3)

    def health(self) -> dict[str, object]:
        """``/readyz``: ready when Redis is reachable and events can go to the broker or the
        fallback list; the body says which part is not."""
        parts = self.events.health()
        return {"ready": bool(parts["redis"] and (parts["broker"] or parts["fallback"])), **parts}
