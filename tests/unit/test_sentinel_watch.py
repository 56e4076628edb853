"""SentinelWatch's reading of sentinel messages and its bound on when a failover began (no sockets:
the switch itself is replaced by a recorder)."""

from __future__ import annotations

import asyncio

import pytest

from proxy import sentinel as sentinel_module
from proxy.config import RedisAddress, Sentinels
from proxy.sentinel import BLIND_MEMORY, SentinelWatch

UPSTREAM = RedisAddress("10.0.0.1", 26379, sentinel=Sentinels((("10.0.0.1", 26379), ("10.0.0.2", 26379)), "mymaster"))


def watch(monkeypatch: pytest.MonkeyPatch, now: list[int]) -> tuple[SentinelWatch, list[object]]:
    w = SentinelWatch(UPSTREAM, 1.0)
    w.master = UPSTREAM.located(("10.0.0.5", 6379))
    switched: list[object] = []

    async def switch_to(node: object) -> None:
        switched.append(node)

    monkeypatch.setattr(w, "_switch_to", switch_to)
    monkeypatch.setattr(sentinel_module, "_now_ms", lambda: now[0])
    return w, switched


def test_messages_about_other_masters_and_replicas_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        now = [1000]
        w, switched = watch(monkeypatch, now)
        w._event("+sdown", "master othermaster 10.0.0.9 6379".split())
        w._event("+sdown", "slave 10.0.0.6:6379 10.0.0.6 6379 @ mymaster 10.0.0.5 6379".split())
        w._event("+switch-master", "othermaster 10.0.0.9 6379 10.0.0.8 6379".split())
        await asyncio.sleep(0)
        assert w._precursor_ms is None and switched == []
        assert w._since() == 1000
    asyncio.run(run())


def test_the_first_failover_message_bounds_the_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        now = [1000]
        w, switched = watch(monkeypatch, now)
        w._event("+try-failover", "master mymaster 10.0.0.5 6379".split())
        now[0] = 1500
        w._event("+selected-slave", "slave 10.0.0.6:6379 10.0.0.6 6379 @ mymaster 10.0.0.5 6379".split())
        now[0] = 2000
        w._event("+switch-master", "mymaster 10.0.0.5 6379 10.0.0.6 6380".split())
        await asyncio.sleep(0)
        assert switched == [("10.0.0.6", 6380)]
        assert w._since() == 1000
    asyncio.run(run())


def test_a_recovered_master_forgets_the_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        now = [1000]
        w, _ = watch(monkeypatch, now)
        w._event("+sdown", "master mymaster 10.0.0.5 6379".split())
        assert w._precursor_ms == 1000
        w._event("-sdown", "master mymaster 10.0.0.5 6379".split())
        assert w._precursor_ms is None
    asyncio.run(run())


def test_a_sentinel_outage_bounds_the_gap_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [10_000]
    w, _ = watch(monkeypatch, now)
    w._down[("10.0.0.2", 26379)] = w._blind_ms = 10_000  # as _listen records an outage
    now[0] = 20_000
    assert w._since() == 10_000  # still down: a message may have been missed
    del w._down[("10.0.0.2", 26379)]
    w._all_up_ms = 20_000
    now[0] = 20_000 + int(BLIND_MEMORY * 1000) - 1
    assert w._since() == 10_000
    now[0] = 20_000 + int(BLIND_MEMORY * 1000) + 1
    assert w._since() == now[0]
