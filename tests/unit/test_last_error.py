"""``last_error`` in ``key_evt_amqp.info``: kept after recovery, with when and whether it holds."""

from __future__ import annotations

import time
import types
from typing import Any

from proxy.config import Config
from proxy.events.publisher import AmqpPublisher
from proxy.events.service import _last_error
from proxy.live import LiveConfig


class Sink:
    def __init__(self) -> None:
        self.settled: list[tuple[list[Any], list[Any]]] = []

    def on_settled(self, confirmed: list[Any], failed: list[Any]) -> None:
        self.settled.append((confirmed, failed))

    def on_ready(self) -> None:
        pass


def test_a_publisher_error_holds_until_a_message_is_confirmed() -> None:
    publisher = AmqpPublisher(LiveConfig(Config()), Sink())  # type: ignore[arg-type]
    assert (publisher.last_error, publisher.last_error_ms, publisher.last_error_current) == ("", 0, False)
    before = int(time.time() * 1000)
    events = [types.SimpleNamespace(message_id=b"%d" % i, timestamp_ms=before) for i in range(2)]
    publisher._pending.extend([(events[0], None, 0, 0.0), (events[1], None, 1, 0.0)])
    publisher._on_confirm(1, False, True)  # a nack
    assert publisher.last_error.startswith("broker refused") and publisher.last_error_current
    assert before <= publisher.last_error_ms <= time.time() * 1000
    publisher._on_confirm(2, False, False)  # the next message is confirmed: the broker works
    assert publisher.last_error.startswith("broker refused") and not publisher.last_error_current


def part(text: str, ms: int, current: bool) -> Any:
    return types.SimpleNamespace(last_error=text, last_error_ms=ms, last_error_current=current)


def test_info_shows_the_latest_error_that_holds_else_the_latest() -> None:
    assert _last_error([part("", 0, False), part("", 0, False)]) == {
        "last_error": "", "last_error_time_ms": 0, "last_error_current": 0}
    old_current, new_past = part("broker down", 100, True), part("subscription lost", 200, False)
    assert _last_error([new_past, old_current]) == {
        "last_error": "broker down", "last_error_time_ms": 100, "last_error_current": 1}
    assert _last_error([part("a", 100, False), part("b", 200, False), part("", 0, False)]) == {
        "last_error": "b", "last_error_time_ms": 200, "last_error_current": 0}
