"""Errors of the event pipeline (``proxy.events``).

One root, so a caller can catch everything this package raises on purpose; it is itself a
:class:`proxy.errors.ProxyError` (the whole tree is drawn in :mod:`proxy.errors`)::

    EventsError
    ├── AmqpCommandError      an admin command failed (also a proxy.errors.CommandError); str(exc)
    │                         is the module's reply text, e.g. "AMQP CONNECT ERROR: 3" (send it as
    │                         ``-AMQP CONNECT ERROR: 3``)
    ├── LinkError             a Redis connection of the pipeline dropped or never came up;
    │                         the caller retries later (the source and the fallback reconnect)
    ├── BrokerError           connecting to RabbitMQ failed; ``code`` is the module's
    │                         CONNECT ERROR number (3 refused/unreachable/TLS failed, 4 login
    │                         or vhost refused, 5 channel failed or exchange missing);
    │                         ``reason`` is one readable line naming the node
    └── AiormqIncompatible    (also an ImportError) raised when ``proxy.events.amqp_wire`` is
                              imported with an aiormq that lacks a private hook it relies on;
                              install a checked aiormq version or port the adapter

Redis error replies are values (``hiredis.ReplyError`` instances returned, not raised).
"""

from __future__ import annotations

from proxy.errors import CommandError, ProxyError

__all__ = ["AiormqIncompatible", "AmqpCommandError", "BrokerError", "EventsError", "LinkError"]


class EventsError(ProxyError):
    """Root of every error raised on purpose by ``proxy.events``."""


class AmqpCommandError(EventsError, CommandError):
    """A ``key_evt_amqp.connect``/``disconnect`` failed: reply ``-`` + ``str(exc)``."""


class LinkError(EventsError, ConnectionError):
    """A pipeline connection to Redis is down; retry after a backoff."""


class BrokerError(EventsError):
    """A connection attempt to RabbitMQ failed; ``code`` is the module's CONNECT ERROR number."""

    REFUSED = 3
    LOGIN_REFUSED = 4
    CHANNEL_FAILED = 5

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{reason} (code {code})")
        self.code = code
        self.reason = reason


class AiormqIncompatible(EventsError, ImportError):
    """The installed aiormq lacks a private hook of ``proxy.events.amqp_wire``; the message
    names the aiormq version and the missing names."""
