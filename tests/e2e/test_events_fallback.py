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
        assert ids(tail) == [b"id-2", b"id-3", b"id-4"] and store.mirror_reads == 1
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
