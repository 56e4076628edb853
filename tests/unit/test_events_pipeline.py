"""The ordering rules of :class:`proxy.events.pipeline.Pipeline`, with a fake broker and list.

The fakes record what was "published" and hold the "list" in memory; the tests settle publishes by
hand, so every interleaving is explicit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from proxy.config import Config
from proxy.events.message import Event, dump_entry, load_entry
from proxy.events.pipeline import Mode, Pipeline
from proxy.events.publisher import BrokerState
from proxy.live import LiveConfig


class FakePublisher:
    def __init__(self, window: int = 10) -> None:
        self.state = BrokerState.IDLE
        self.window = window
        self.in_flight: list[tuple[Event, Any, int]] = []
        self.wire: list[bytes] = []  # keys in publish order
        self.sink: Pipeline | None = None

    def room(self) -> int:
        return self.window - len(self.in_flight) if self.state is BrokerState.READY else 0

    def publish(self, event: Event, batch: Any = None, index: int = 0) -> None:
        assert self.state is BrokerState.READY
        self.in_flight.append((event, batch, index))
        self.wire.append(event.body.split(b"\n", 2)[2])

    def ensure_connected(self) -> None:
        if self.state is BrokerState.IDLE:
            self.state = BrokerState.CONNECTING

    def come_up(self) -> None:
        self.state = BrokerState.READY
        assert self.sink is not None
        self.sink.on_ready()

    def settle(self, ok: bool = True, count: int | None = None) -> None:
        count = len(self.in_flight) if count is None else count
        done, self.in_flight = self.in_flight[:count], self.in_flight[count:]
        assert self.sink is not None
        self.sink.on_settled(done if ok else [], [] if ok else done)

    def lose(self) -> None:
        self.state = BrokerState.BACKOFF
        self.settle(ok=False)


class FakeList:
    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.length = 0
        self.epoch = 0
        self.last_op = float("inf")  # never checked by the pump on its own
        self.on_reset: Any = None

    async def push(self, events: Sequence[Event], cap: int, *, front: bool = False) -> int:
        entries = [dump_entry(e) for e in events]
        self.items = list(entries) + self.items if front else self.items + list(entries)
        dropped = max(0, len(self.items) - cap) if cap > 0 else 0
        del self.items[:dropped]
        self.length = len(self.items)
        return dropped

    async def read(self, offset: int, count: int, now_ms: int) -> list[Event | None]:
        return [load_entry(e, now_ms) for e in self.items[offset:offset + count]]

    async def remove(self, count: int) -> None:
        del self.items[:max(0, count)]
        self.length = len(self.items)

    async def refresh_length(self) -> int:
        self.length = len(self.items)
        return self.length

    def keys(self) -> list[bytes]:
        return [load_entry(e, 0).body.split(b"\n", 2)[2] for e in self.items]  # type: ignore[union-attr]


def event(n: int) -> Event:
    return Event.keyspace(b"id-%d" % n, 0, 0, b"set", b"k%d" % n)


def keys(*numbers: int) -> list[bytes]:
    return [b"k%d" % n for n in numbers]


def make(window: int = 10, fallback_size: int = 0, stored: Sequence[int] = ()) -> tuple[Pipeline, FakePublisher, FakeList]:
    publisher, store = FakePublisher(window), FakeList()
    store.items = [dump_entry(event(n)) for n in stored]
    pipeline = Pipeline(LiveConfig(Config(publish_window=window, fallback_size=fallback_size)), publisher, store)  # type: ignore[arg-type]
    publisher.sink = pipeline
    return pipeline, publisher, store


async def turn() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def run(coro: Any) -> None:
    asyncio.run(coro)


def test_lazy_connect_holds_events_then_publishes_them_in_order() -> None:
    async def go() -> None:
        pipeline, broker, store = make()
        await pipeline.start()
        await turn()
        assert pipeline.mode is Mode.HOLDING and broker.state is BrokerState.IDLE
        for n in range(3):
            pipeline.accept(event(n))
        assert broker.state is BrokerState.CONNECTING and broker.wire == []
        broker.come_up()
        pipeline.accept(event(3))
        assert broker.wire == keys(0, 1, 2, 3) and pipeline.mode is Mode.DIRECT
        assert store.items == []
        await pipeline.stop(1)
    run(go())


def test_failed_in_flight_events_go_before_newer_ones() -> None:
    async def go() -> None:
        pipeline, broker, store = make()
        await pipeline.start()
        await turn()
        broker.come_up()
        for n in range(4):
            pipeline.accept(event(n))
        broker.settle(ok=True, count=1)          # k0 confirmed
        broker.lose()                            # k1..k3 fail
        for n in range(4, 6):
            pipeline.accept(event(n))            # newer: behind them
        await turn()
        assert store.keys() == keys(1, 2, 3, 4, 5)
        broker.come_up()
        await turn()
        assert broker.wire[4:] == keys(1, 2, 3, 4, 5)
        broker.settle()
        await turn()
        assert store.items == [] and pipeline.mode is Mode.DIRECT
        pipeline.accept(event(6))
        assert broker.wire[-1] == b"k6"
        await pipeline.stop(1)
    run(go())


def test_backlog_is_replayed_before_new_events() -> None:
    async def go() -> None:
        pipeline, broker, store = make(window=4, stored=range(6))
        await pipeline.start()
        await turn()
        assert broker.state is BrokerState.CONNECTING  # a backlog connects without waiting for an event
        pipeline.accept(event(6))
        broker.come_up()
        await turn()
        while broker.in_flight or store.items:
            broker.settle()
            await turn()
        pipeline.accept(event(7))
        assert broker.wire == keys(0, 1, 2, 3, 4, 5, 6, 7)
        await pipeline.stop(1)
    run(go())


def test_a_failed_replay_batch_stays_in_the_list() -> None:
    async def go() -> None:
        pipeline, broker, store = make(window=4, stored=range(4))
        await pipeline.start()
        await turn()
        broker.come_up()
        await turn()
        assert broker.wire == keys(0, 1, 2, 3)
        broker.settle(ok=True, count=1)
        broker.settle(ok=False)                  # e.g. returned: k1..k3 must stay
        await turn()
        assert store.keys() == keys(1, 2, 3)
        await pipeline.stop(1)
    run(go())


def test_cap_trim_during_replay_removes_nothing_new() -> None:
    async def go() -> None:
        pipeline, broker, store = make(window=4, fallback_size=6, stored=range(6))
        await pipeline.start()
        await turn()
        broker.come_up()
        await turn()
        assert broker.wire == keys(0, 1, 2, 3)  # two batches of 2 in flight
        for n in range(6, 10):
            pipeline.accept(event(n))            # the cap drops k0..k3 (being replayed)
        await turn()
        assert store.keys() == keys(4, 5, 6, 7, 8, 9)
        assert pipeline.metrics.dropped_fallback_full == 4
        broker.settle()                          # k0..k3 confirmed: nothing more to remove
        await turn()
        assert store.keys()[:2] == keys(4, 5) or broker.wire[4:6] == keys(4, 5)
        while broker.in_flight or store.items:
            broker.settle()
            await turn()
        assert broker.wire == keys(0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
        await pipeline.stop(1)
    run(go())


def test_stop_stores_held_and_unconfirmed_events() -> None:
    async def go() -> None:
        pipeline, broker, store = make()
        await pipeline.start()
        await turn()
        broker.come_up()
        for n in range(3):
            pipeline.accept(event(n))
        pipeline.hold_for_shutdown()
        pipeline.accept(event(3))
        broker.lose()                            # what a final disconnect does
        await pipeline.stop(1)
        assert store.keys() == keys(0, 1, 2, 3)
    run(go())
