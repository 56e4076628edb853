"""RabbitMQ helpers for the tests: a private queue bound to ``amq.direct`` under a unique key.

The shared broker at 127.0.0.1:5672 (guest/guest) is never reconfigured: each queue has a unique
name and routing key, expires by itself after :data:`QUEUE_TTL_MS` without use, and is deleted by
``close()``. Nothing here imports pytest.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiormq

URL = "amqp://guest:guest@127.0.0.1:5672/"
EXCHANGE = "amq.direct"
QUEUE_TTL_MS = 10 * 60 * 1000


@dataclass
class Message:
    body: bytes
    message_id: str | None
    type: str | None
    app_id: str | None
    content_type: str | None
    delivery_mode: int | None
    timestamp: Any
    headers: dict[str, Any] = field(default_factory=dict)
    routing_key: str = ""


def is_restart_gap(m: Message) -> bool:
    return m.type == "key_evt_amqp.gap" and m.headers.get("reason") in ("takeover", b"takeover")


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


class RabbitQueue:
    """``with RabbitQueue() as q:`` -> ``q.routing_key``, ``q.count()``, ``q.drain()``.

    ``arguments`` are extra queue arguments, e.g. ``{"x-max-length": 0, "x-overflow":
    "reject-publish"}`` for a queue whose broker nacks every publish."""

    def __init__(self, url: str = URL, arguments: dict[str, Any] | None = None,
                 exchange: str = EXCHANGE, binding: str | None = None) -> None:
        """``exchange``/``binding``: bind to another exchange (``amq.topic``) with this key or
        pattern instead of ``amq.direct`` with :attr:`routing_key`."""
        token = uuid.uuid4().hex[:12]
        self.url = url
        self.arguments = {"x-expires": QUEUE_TTL_MS, **(arguments or {})}
        self.name = f"kea-test-{token}"
        self.routing_key = f"kea-rk-{token}"
        self.exchange = exchange
        self.binding = self.routing_key if binding is None else binding

    def __enter__(self) -> RabbitQueue:
        _run(self._declare())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def _declare(self) -> None:
        conn = await aiormq.connect(self.url)
        try:
            ch = await conn.channel()
            await ch.queue_declare(self.name, arguments=self.arguments)
            await ch.queue_bind(self.name, self.exchange, routing_key=self.binding)
        finally:
            await conn.close()

    def count(self) -> int:
        async def go() -> int:
            conn = await aiormq.connect(self.url)
            try:
                ch = await conn.channel()
                ok = await ch.queue_declare(self.name, passive=True)
                return ok.message_count or 0
            finally:
                await conn.close()
        return _run(go())

    def drain_events(self, expected: int, idle: float = 1.0, timeout: float = 60.0) -> list[Message]:
        """:meth:`drain` for a test that starts a proxy where another ran before on the same Redis:
        the new one's restart gap marker (``reason=takeover``: nobody read the stream in between,
        docs/events.md) is left out, and ``expected`` counts the other messages."""
        got: list[Message] = []
        deadline = time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            got += [m for m in self.drain(expected - len(got), idle, deadline - time.monotonic())
                    if not is_restart_gap(m)]
        return got

    def drain(self, expected: int | None = None, idle: float = 1.0, timeout: float = 60.0) -> list[Message]:
        """Consume (and remove) every message: until ``expected`` arrived (then ``idle`` more
        seconds to catch extras), or until nothing arrived for ``idle`` seconds, or ``timeout``."""
        return _run(self._drain(expected, idle, timeout))

    async def _drain(self, expected: int | None, idle: float, timeout: float) -> list[Message]:
        conn = await aiormq.connect(self.url)
        messages: list[Message] = []
        got = asyncio.Event()
        try:
            ch = await conn.channel()
            await ch.basic_qos(prefetch_count=5000)

            def on_message(msg: aiormq.abc.DeliveredMessage) -> None:
                p = msg.header.properties
                messages.append(Message(msg.body, p.message_id, p.message_type, p.app_id, p.content_type,
                                        p.delivery_mode, p.timestamp, dict(p.headers or {}),
                                        msg.delivery.routing_key))
                got.set()

            await ch.basic_consume(self.name, on_message, no_ack=True)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while loop.time() < deadline:
                got.clear()
                try:
                    await asyncio.wait_for(got.wait(), idle)
                except asyncio.TimeoutError:
                    if expected is None or len(messages) >= expected:
                        break
            return messages
        finally:
            await conn.close()

    def close(self) -> None:
        async def go() -> None:
            conn = await aiormq.connect(self.url)
            try:
                ch = await conn.channel()
                await ch.queue_delete(self.name)
            finally:
                await conn.close()
        try:
            _run(go())
        except Exception:  # noqa: BLE001 - the queue expires by itself anyway
            pass
