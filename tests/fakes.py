"""In-memory stand-ins for the relay's unit tests (no sockets, no event loop needed)."""

from __future__ import annotations

from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any

from proxy.config import Config
from proxy.metrics import Metrics


class FakeTransport:
    """A stream transport in memory: what was written, whether reading is on. With
    ``started=False`` it behaves as uvloop's does before ``connection_made`` returns: reading has
    not begun, so a pause asked for then is lost (call :meth:`start` afterwards)."""

    def __init__(self, *, started: bool = True) -> None:
        self.out: list[bytes] = []
        self.closed = False
        self.started = started
        self.reading = started

    def start(self) -> None:
        self.started = self.reading = True

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def pause_reading(self) -> None:
        if self.started:
            self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int) -> None: ...

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def close(self) -> None:
        self.closed = True


class FakeServer:
    """The server state a client connection is given; its upstream connection never opens."""

    def __init__(self, buffer_limit: int = 1 << 20) -> None:
        self.buffer_limit = buffer_limit
        self.runtime = SimpleNamespace(config=Config())
        self.metrics = Metrics()

    def admit(self, client: object) -> bool:
        return True

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        coro.close()
