"""Run an :class:`EventService` in a background thread, so a test can drive Redis synchronously.

``with ServiceThread(config) as svc:`` starts the service on its own uvloop; ``svc.info()``,
``svc.call(coroutine_function, *args)`` (connect, disconnect, ...) and ``svc.apply(config)`` (puts
``config`` in force, as an admin command does) run on that loop and return the result; leaving the block runs ``stop()`` like a SIGTERM would.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from proxy.config import Config
from proxy.events import EventService
from proxy.live import LiveConfig


class ServiceThread:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.live = LiveConfig(config)
        self.loop = uvloop.new_event_loop()
        self.service: EventService | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="event-service", daemon=True)

    def __enter__(self) -> ServiceThread:
        self._thread.start()

        async def start() -> EventService:
            service = EventService(self.live)
            await service.start()
            return service

        self.service = self._run(start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        return self._run(func(*args))

    def sync(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run a plain function on the service's loop (its state is not thread-safe)."""
        async def go() -> Any:
            return func(*args)
        return self._run(go())

    def info(self) -> dict[str, Any]:
        assert self.service is not None
        return self.sync(self.service.info)

    def apply(self, config: Config) -> None:
        assert self.service is not None
        self.config = config
        self.sync(self.live.update, config)

    def connect(self, config: Config | None = None) -> str:
        assert self.service is not None
        if config is not None:
            self.apply(config)
        return self.call(self.service.connect)

    def disconnect(self) -> str:
        assert self.service is not None
        return self.call(self.service.disconnect)

    def stop(self) -> None:
        if self.service is not None:
            service, self.service = self.service, None
            self._run(service.stop())
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
