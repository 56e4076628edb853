"""The fallback list against a real Redis: order, cap, and the in-memory mirror of its tail."""

from __future__ import annotations

import asyncio

import redis

from harness import RedisServer
from proxy.config import RedisAddress
from proxy.events.fallback import FallbackList
from proxy.events.message import Event

KEY = b"kea-test-fallback"


def ev(n: int) -> Event:
    return Event.keyspace(b"id-%d" % n, n, 0, b"set", b"k%d" % n)


def ids(events: list[Event | None]) -> list[bytes]:
    return [e.message_id for e in events if e is not None]


def test_push_read_remove_and_cap(redis_server: RedisServer) -> None:
    client: redis.Redis = redis_server.client()
    client.delete(KEY)

    async def go() -> None:
        store = FallbackList(RedisAddress(port=redis_server.port), KEY, 2.0)
        assert await store.refresh_length() == 0
        assert await store.push([ev(n) for n in range(5)], cap=0) == 0
        assert await store.push([ev(-1)], cap=0, front=True) == 0
        first = await store.read(0, 3, now_ms=0)
        assert ids(first) == [b"id--1", b"id-0", b"id-1"]
        tail = await store.read(3, 10, now_ms=0)
        # both reads come from memory: the front push joined the copy, which covers the whole list
        assert ids(tail) == [b"id-2", b"id-3", b"id-4"] and store.mirror_reads == 2
        await store.remove(2)
        assert store.length == 4 and ids(await store.read(0, 1, 0)) == [b"id-1"]
        assert await store.push([ev(n) for n in range(5, 9)], cap=6) == 2  # the 2 oldest go
        assert ids(await store.read(0, 10, 0)) == [b"id-3", b"id-4", b"id-5", b"id-6", b"id-7", b"id-8"]
        # someone else writes into our list: the mirror is not trusted any more
        client.rpush(KEY, b"0\nset\nforeign")
        events = await store.read(6, 10, 0)
        assert [e.body for e in events if e is not None] == [b"0\nset\nforeign"]
        store.close()

    asyncio.run(go())
    assert client.llen(KEY) == 7
    client.delete(KEY)


def test_elements_taken_by_someone_else_are_counted_and_marked(redis_server: RedisServer) -> None:
    """Part of the list gone (here LPOP by another client): we cannot tell which elements, so
    the difference is counted, a marker goes to the head and the copy in memory is dropped."""
    client: redis.Redis = redis_server.client()
    client.delete(KEY)
    marks: list[tuple[int, int, int]] = []
    resets: list[int] = []

    def on_lost(count: int, start: int, end: int) -> Event:
        marks.append((count, start, end))
        return Event.keyspace(b"marker", end, -1, b"key_evt_amqp.gap", b"lost")

    async def go() -> None:
        store = FallbackList(RedisAddress(port=redis_server.port), KEY, 2.0)
        store.on_lost, store.on_reset = on_lost, lambda: resets.append(store.epoch)
        await store.push([ev(n) for n in range(5)], cap=0)
        client.lpop(KEY, 2)
        assert await store.refresh_length() == 4  # 3 left + the marker
        assert marks == [(2, 0, marks[0][2])] and resets == [1] and store.metrics.fallback_lost == 2
        assert ids(await store.read(0, 10, 0)) == [b"marker", b"id-2", b"id-3", b"id-4"]
        assert store.mirror_reads == 0  # the copy was dropped: positions were unknown
        store.close()

    asyncio.run(go())
    client.delete(KEY)
