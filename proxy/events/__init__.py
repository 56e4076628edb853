"""Keyspace events from Redis to RabbitMQ: see :mod:`proxy.events.service` and ``docs/events.md``."""

from proxy.events.errors import AmqpCommandError, EventsError
from proxy.events.service import EventService

__all__ = ["AmqpCommandError", "EventService", "EventsError"]
