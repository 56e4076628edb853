"""The fallback list deleted under the proxy (issue #8, item 13): FLUSHALL, DEL, a Redis restart.

Buffered events must not vanish silently: the proxy writes back its in-memory copy of the list's
tail, and counts (and marks with a gap marker) what was older than that copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import redis

import proxy.events.fallback
from events_runner import ServiceThread
from harness import RedisServer, wait_for
from proxy.config import DEFAULT_FALLBACK_KEY, Config, RedisAddress
from rabbit import Message, RabbitQueue


@pytest.fixture
def queue() -> Iterator[RabbitQueue]:
    with RabbitQueue() as q:
        yield q


@pytest.fixture
def rds(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


def make_config(server: RedisServer, queue: RabbitQueue, **changes: object) -> Config:
    base = Config(upstream=RedisAddress(port=server.port), routing_key=queue.routing_key,
                  events="$", keymasks=(b"ALL",), heartbeat=5)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def keys_of(messages: list[Message]) -> list[bytes]:
    return [m.body.split(b"\n", 2)[2] for m in messages]


def store_five(svc: ServiceThread, rds: redis.Redis) -> None:
    """Connect, disconnect, then 5 SETs that wait in the fallback list."""
    assert svc.connect() == "AMQP CONNECT OK"
    assert svc.disconnect() == "AMQP DISCONNECT OK"
    for i in range(5):
        rds.set(f"b{i}", "v")
    wait_for(lambda: rds.llen(DEFAULT_FALLBACK_KEY) == 5 and svc.info()["fallback_length"] == 5)


def replayed(svc: ServiceThread, queue: RabbitQueue, count: int) -> list[Message]:
    assert svc.connect() == "AMQP CONNECT OK"
    wait_for(lambda: svc.info()["fallback_length"] == 0 and svc.info()["pipeline_mode"] == "direct", 15)
    return queue.drain(expected=count, idle=1.0)


def test_flushall_does_not_lose_the_buffered_events(redis_server: RedisServer, rds: redis.Redis,
                                                    queue: RabbitQueue) -> None:
    with ServiceThread(make_config(redis_server, queue)) as svc:
        store_five(svc, rds)
        rds.flushall()
        messages = replayed(svc, queue, 5)
        info = svc.info()
    assert keys_of(messages) == [b"b0", b"b1", b"b2", b"b3", b"b4"]
    assert info["fallback_restored"] == 5 and info["events_dropped_fallback_lost"] == 0
    assert info["events_replayed"] == 5


def test_del_of_the_key_keeps_the_order_with_later_events(redis_server: RedisServer, rds: redis.Redis,
                                                          queue: RabbitQueue) -> None:
    with ServiceThread(make_config(redis_server, queue)) as svc:
        store_five(svc, rds)
        rds.delete(DEFAULT_FALLBACK_KEY)
        rds.set("c0", "v")  # stored into a new list: the five go back in front of it
        rds.set("c1", "v")
        wait_for(lambda: rds.llen(DEFAULT_FALLBACK_KEY) == 7)
        messages = replayed(svc, queue, 7)
        info = svc.info()
    assert keys_of(messages) == [b"b0", b"b1", b"b2", b"b3", b"b4", b"c0", b"c1"]
    assert info["fallback_restored"] == 5 and info["events_dropped_fallback_lost"] == 0


def test_redis_restart_without_persistence(queue: RabbitQueue) -> None:
    with RedisServer() as own, ServiceThread(make_config(own, queue)) as svc:
        store_five(svc, own.client())
        own.kill()
        own.start()
        client = own.client()
        wait_for(lambda: svc.info()["gaps"] == 1 and svc.info()["source_state"] == "subscribed", 15)
        client.set("after", "v")
        wait_for(lambda: client.llen(DEFAULT_FALLBACK_KEY) == 7)  # 5 restored, the gap, "after"
        messages = replayed(svc, queue, 7)
        info = svc.info()
    assert [m.type for m in messages] == ["set"] * 5 + ["key_evt_amqp.gap", "set"]
    assert keys_of(messages[:5]) + keys_of(messages[6:]) == [b"b0", b"b1", b"b2", b"b3", b"b4", b"after"]
    assert info["fallback_restored"] == 5 and info["events_dropped_fallback_lost"] == 0


def test_beyond_the_copy_the_loss_is_counted_and_marked(redis_server: RedisServer, rds: redis.Redis,
                                                       queue: RabbitQueue,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy.events.fallback, "MIRROR_LIMIT", 3)  # the copy keeps the newest 3
    with ServiceThread(make_config(redis_server, queue)) as svc:
        store_five(svc, rds)
        stored = [int(e.split(b"\n")[0].split(b" ")[2]) for e in rds.lrange(DEFAULT_FALLBACK_KEY, 0, -1)]
        rds.flushall()
        messages = replayed(svc, queue, 4)
        info = svc.info()
    assert [m.type for m in messages] == ["key_evt_amqp.gap", "set", "set", "set"]
    marker = messages[0]
    assert marker.headers["reason"] == "fallback_lost" and marker.headers["lost"] == "2"
    assert marker.headers["gap_start_ms"] <= stored[0] and stored[1] <= marker.headers["gap_end_ms"]
    assert marker.body == b"-1\nkey_evt_amqp.gap\n127.0.0.1:%d" % redis_server.port
    assert keys_of(messages[1:]) == [b"b2", b"b3", b"b4"]
    assert info["fallback_restored"] == 3 and info["events_dropped_fallback_lost"] == 2
    assert info["events_dropped"] == 2
