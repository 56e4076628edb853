"""Keyspace events end to end, in process: real redis-server, real RabbitMQ, the EventService.

Each test gets a private Redis (module scope, flushed), a private queue bound to ``amq.direct``
under a unique routing key, and an :class:`EventService` on its own loop (``ServiceThread``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest
import redis

from events_runner import ServiceThread
from harness import RedisServer, free_port, wait_for
from protocol.events import event_class
from proxy.config import DEFAULT_FALLBACK_KEY, Config, RedisAddress
from proxy.events import AmqpCommandError
from rabbit import Message, RabbitQueue


@pytest.fixture
def queue() -> Iterator[RabbitQueue]:
    with RabbitQueue() as q:
        yield q


@pytest.fixture
def rds(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    client.config_set("notify-keyspace-events", "")
    client.config_set("maxmemory", 0)
    yield client
    client.close()


def make_config(server: RedisServer, queue: RabbitQueue, **changes: object) -> Config:
    base = Config(upstream=RedisAddress(port=server.port), routing_key=queue.routing_key,
                  events="A", keymasks=(b"ALL",), heartbeat=5)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def keys_of(messages: list[Message]) -> list[bytes]:
    return [m.body.split(b"\n", 2)[2] for m in messages]


def settle(svc: ServiceThread, count: int, timeout: float = 20.0) -> None:
    """Wait until ``count`` events were confirmed by the broker and nothing is left over."""
    wait_for(lambda: svc.info()["events_confirmed"] >= count and svc.info()["events_in_flight"] == 0,
             timeout, message=f"for {count} confirms")


EXPECTED_BY_CLASS = {
    "g": {"expire", "persist", "rename_from", "rename_to", "del"},
    "$": {"set", "incrby", "append", "setrange"},
    "l": {"lpush", "rpush", "lpop"},
    "s": {"sadd", "srem"},
    "h": {"hset", "hincrby", "hdel"},
    "z": {"zadd", "zincr", "zrem"},
    "t": {"xadd"},
    "x": {"expired"},
    "e": {"evicted"},
    "m": {"keymiss"},
    "n": {"new"},
}


def produce_every_event(rds: redis.Redis) -> None:
    """Commands that make Redis publish every event of EXPECTED_BY_CLASS (and a few more)."""
    rds.flushall()
    rds.set("s1", "1")                                 # set (+ new)
    rds.incr("n1")                                     # incrby
    rds.append("s1", "x")                              # append
    rds.setrange("s1", 0, "y")                         # setrange
    rds.expire("s1", 100)                              # expire
    rds.persist("s1")                                  # persist
    rds.rename("s1", "s2")                             # rename_from, rename_to
    rds.delete("s2")                                   # del
    rds.lpush("l1", "a", "b")                          # lpush
    rds.rpush("l1", "c")                               # rpush
    rds.lpop("l1")                                     # lpop
    rds.sadd("set1", "a", "b")                         # sadd
    rds.srem("set1", "a")                              # srem
    rds.hset("h1", "f", "1")                           # hset
    rds.hincrby("h1", "f", 2)                          # hincrby
    rds.hdel("h1", "f")                                # hdel (+ del)
    rds.zadd("z1", {"a": 1, "b": 2})                   # zadd
    rds.zincrby("z1", 2, "a")                          # zincr
    rds.zrem("z1", "a")                                # zrem
    rds.xadd("x1", {"f": "v"})                         # xadd
    rds.get("missing")                                 # keymiss
    rds.set("short", "v", px=20)                       # set, expire ... expired
    wait_for(lambda: rds.exists("short") == 0, 5)
    time.sleep(0.2)
    rds.set("victim", "v")
    rds.config_set("maxmemory-policy", "allkeys-random")
    rds.config_set("maxmemory", 1)
    with pytest.raises(redis.ResponseError):
        for i in range(20):                            # evicted, then OOM
            rds.set(f"fill{i}", "v" * 100)
    rds.config_set("maxmemory", 0)


def test_every_class_letter_and_A(redis_server: RedisServer, rds: redis.Redis, queue: RabbitQueue) -> None:
    config = make_config(redis_server, queue, events="Amn")
    with ServiceThread(config) as svc:
        wait_for(lambda: "E" in svc.info()["notify_keyspace_events"])
        produce_every_event(rds)
        time.sleep(0.5)
        messages = queue.drain()
        names = {m.type for m in messages}
        expected = set().union(*EXPECTED_BY_CLASS.values())
        assert expected <= names, expected - names
        for m in messages:
            db, name, key = m.body.split(b"\n", 2)
            assert m.content_type == "text/plain" and m.delivery_mode == 1 and m.app_id == "key-evt-amqp"
            assert m.headers == {"db": int(db), "event": name.decode()} and m.type == name.decode()
        assert len({m.message_id for m in messages}) == len(messages)
        # each letter alone, switched at runtime (key_evt_amqp.events_set)
        for letter, names_of_letter in EXPECTED_BY_CLASS.items():
            svc.apply(dataclasses.replace(config, events=letter))
            produce_every_event(rds)
            time.sleep(0.4)
            got = {m.type for m in queue.drain(idle=0.3)}
            assert names_of_letter <= got, (letter, names_of_letter - got)
            assert {event_class(n.encode()) for n in got} == {letter}, (letter, got)


def test_other_letters_survive_and_their_events_are_filtered(redis_server: RedisServer, rds: redis.Redis,
                                                             queue: RabbitQueue) -> None:
    rds.config_set("notify-keyspace-events", "Kg$")  # someone else's letters
    with ServiceThread(make_config(redis_server, queue, events="l")) as svc:
        wait_for(lambda: "l" in rds.config_get("notify-keyspace-events")["notify-keyspace-events"])
        flags = rds.config_get("notify-keyspace-events")["notify-keyspace-events"]
        assert set("Kg$lE") <= set(flags), flags
        rds.set("a", "1")          # $: Redis publishes it, we must not forward it
        rds.delete("a")            # g: same
        rds.rpush("mylist", "x")
        settle(svc, 1)
        assert svc.info()["events_filtered"] >= 2
        messages = queue.drain()
        # events_set at runtime: now strings too
        svc.apply(make_config(redis_server, queue, events="l$"))
        wait_for(lambda: "$" in rds.config_get("notify-keyspace-events")["notify-keyspace-events"])
        rds.set("b", "1")
        settle(svc, 2)
        messages += queue.drain()
    assert [m.body for m in messages] == [b"0\nrpush\nmylist", b"0\nset\nb"]


def test_key_masks_like_the_module(redis_server: RedisServer, rds: redis.Redis, queue: RabbitQueue) -> None:
    keys = [b"foo", b"xfoo", b"foox", b"fo", b"f", b"ab", b"aab", b"b", b"", b"*foo", b"a$b", b"f\no"]
    cases = {
        (b"^foo",): [b"foo", b"foox"],
        (b"foo$",): [b"foo", b"xfoo", b"*foo"],
        (b"^a*b$",): [b"ab", b"aab", b"b"],
        (b"f.o",): [b"foo", b"xfoo", b"foox", b"*foo", b"f\no"],
        (b"a$b",): [b"a$b"],
        (b"^foo$", b"^f$"): [b"foo", b"f"],
        (): [],
        (b"ALL",): keys,
    }
    with ServiceThread(make_config(redis_server, queue, events="$")) as svc:
        wait_for(lambda: "$" in svc.info()["notify_keyspace_events"])
        for masks, expected in cases.items():
            svc.apply(make_config(redis_server, queue, events="$", keymasks=masks))
            for key in keys:
                rds.set(key, "v")
            rds.set(b"end-marker", "v") if masks == (b"ALL",) else None
            time.sleep(0.3)
            got = keys_of(queue.drain(expected=len(expected), idle=0.3))
            if masks == (b"ALL",):
                got.remove(b"end-marker")
            assert got == expected, masks


def test_binary_keys_dbs_and_properties(redis_server: RedisServer, rds: redis.Redis, queue: RabbitQueue) -> None:
    # the last key is larger than RabbitMQ's frame_max (131072): the body spans several frames
    keys = [b"a\nb", b"nul\x00tail", b"\xff\xfe", b"", b"\xe2\x82\xac", b"k" * 1000, bytes(range(256)) * 1200]
    with ServiceThread(make_config(redis_server, queue, events="$", delivery_mode=2)) as svc:
        wait_for(lambda: "$" in svc.info()["notify_keyspace_events"])
        for key in keys:
            rds.set(key, "v")
        for db in (3, 15):
            other = redis_server.client(db=db)
            other.set(b"in-db", "v")
            other.close()
        settle(svc, len(keys) + 2)
        messages = queue.drain(expected=len(keys) + 2)
    assert [m.body for m in messages] == [b"0\nset\n" + k for k in keys] + [b"3\nset\nin-db", b"15\nset\nin-db"]
    assert [m.headers["db"] for m in messages[-2:]] == [3, 15]
    assert all(m.delivery_mode == 2 for m in messages)


def test_connect_disconnect_like_the_module(redis_server: RedisServer, rds: redis.Redis, queue: RabbitQueue) -> None:
    config = make_config(redis_server, queue, events="Al")  # l: our own list writes raise events too
    with ServiceThread(config) as svc:
        assert svc.connect() == "AMQP CONNECT OK"
        with pytest.raises(AmqpCommandError, match="^AMQP CONNECT ERROR: 6$"):
            svc.connect()
        rds.set("a1", "v")
        settle(svc, 1)
        assert svc.disconnect() == "AMQP DISCONNECT OK"
        with pytest.raises(AmqpCommandError, match="^AMQP DISCONNECT ERROR: 1$"):
            svc.disconnect()
        for i in range(5):
            rds.set(f"b{i}", "v")  # undeliverable now: stored, not dropped
        wait_for(lambda: rds.llen(DEFAULT_FALLBACK_KEY) == 5)
        assert queue.count() == 1
        stored = rds.lrange(DEFAULT_FALLBACK_KEY, 0, -1)
        with pytest.raises(AmqpCommandError, match="^AMQP CONNECT ERROR: 3$"):
            svc.connect(dataclasses.replace(config, amqp_port=free_port()))
        with pytest.raises(AmqpCommandError, match="^AMQP CONNECT ERROR: 4$"):
            svc.connect(dataclasses.replace(config, amqp_password="wrong"))
        assert svc.info()["amqp_state"] == "disabled"
        assert svc.connect(config) == "AMQP CONNECT OK"
        wait_for(lambda: rds.llen(DEFAULT_FALLBACK_KEY) == 0)
        rds.set("c1", "v")
        settle(svc, 7)
        messages = queue.drain(expected=7)
        info = svc.info()
    assert keys_of(messages) == [b"a1", b"b0", b"b1", b"b2", b"b3", b"b4", b"c1"]
    # the replayed events kept the identity they got when read from Redis
    assert [m.message_id.encode() for m in messages[1:6]] == [e.split(b" ")[1] for e in stored]
    assert all(DEFAULT_FALLBACK_KEY not in m.body for m in messages)  # own keys never forwarded
    assert info["events_own_keys"] > 0 and info["events_to_fallback"] == 5 and info["events_replayed"] == 5


def test_unroutable_events_are_kept_until_routable(redis_server: RedisServer, rds: redis.Redis,
                                                   queue: RabbitQueue) -> None:
    config = make_config(redis_server, queue, events="$")
    with ServiceThread(dataclasses.replace(config, routing_key="no-queue-is-bound-to-this")) as svc:
        wait_for(lambda: "$" in svc.info()["notify_keyspace_events"])
        for i in range(10):
            rds.set(f"u{i}", "v")
        wait_for(lambda: svc.info()["events_returned"] >= 1 and rds.llen(DEFAULT_FALLBACK_KEY) == 10, 10)
        svc.apply(config)  # the operator fixes the routing key
        wait_for(lambda: rds.llen(DEFAULT_FALLBACK_KEY) == 0, 15)
        messages = queue.drain(expected=10)
    assert keys_of(messages) == [f"u{i}".encode() for i in range(10)]


def test_fallback_cap_drops_the_oldest(redis_server: RedisServer, rds: redis.Redis, queue: RabbitQueue) -> None:
    config = make_config(redis_server, queue, events="$", fallback_size=10)
    with ServiceThread(config) as svc:
        assert svc.connect() == "AMQP CONNECT OK"
        assert svc.disconnect() == "AMQP DISCONNECT OK"
        for i in range(25):
            rds.set(f"c{i}", "v")
        wait_for(lambda: svc.info()["events_accepted"] == 25 and svc.info()["events_waiting_for_fallback"] == 0)
        assert rds.llen(DEFAULT_FALLBACK_KEY) == 10
        assert svc.info()["events_dropped_fallback_full"] == 15
        assert svc.connect() == "AMQP CONNECT OK"
        settle(svc, 10)
        messages = queue.drain(expected=10)
    assert keys_of(messages) == [f"c{i}".encode() for i in range(15, 25)]


def test_fallback_off_drops_and_counts(redis_server: RedisServer, rds: redis.Redis, queue: RabbitQueue) -> None:
    config = make_config(redis_server, queue, events="$", fallback_size=-1)
    with ServiceThread(config) as svc:
        assert svc.connect() == "AMQP CONNECT OK"
        assert svc.disconnect() == "AMQP DISCONNECT OK"
        for i in range(5):
            rds.set(f"d{i}", "v")
        wait_for(lambda: svc.info()["events_dropped_fallback_off"] == 5)
        assert rds.exists(DEFAULT_FALLBACK_KEY) == 0


def test_gap_marker_after_redis_restart(redis_server: RedisServer, queue: RabbitQueue) -> None:
    with RedisServer() as own, ServiceThread(make_config(own, queue, events="$")) as svc:
        client = own.client()
        wait_for(lambda: "$" in svc.info()["notify_keyspace_events"])
        client.set("before", "v")
        settle(svc, 1)
        own.kill()
        own.start()
        client = own.client()
        wait_for(lambda: svc.info()["gaps"] == 1 and "$" in svc.info()["notify_keyspace_events"]
                 and "$" in client.config_get("notify-keyspace-events")["notify-keyspace-events"], 15)
        client.set("after", "v")
        settle(svc, 3)
        messages = queue.drain(expected=3)
    assert [m.type for m in messages] == ["set", "key_evt_amqp.gap", "set"]
    gap = messages[1]
    assert gap.headers["gap_start_ms"] <= gap.headers["gap_end_ms"]
    assert gap.body == b"-1\nkey_evt_amqp.gap\n127.0.0.1:%d" % own.port
    assert keys_of([messages[0], messages[2]]) == [b"before", b"after"]


def test_missing_exchange_keeps_events_until_fixed(redis_server: RedisServer, rds: redis.Redis,
                                                   queue: RabbitQueue) -> None:
    """The module lost every event here (poison loop); we keep them and back off."""
    config = make_config(redis_server, queue, events="$")
    with ServiceThread(dataclasses.replace(config, exchange="kea-no-such-exchange")) as svc:
        wait_for(lambda: "$" in svc.info()["notify_keyspace_events"])
        for i in range(10):
            rds.set(f"x{i}", "v")
        wait_for(lambda: rds.llen(DEFAULT_FALLBACK_KEY) == 10, 10)
        time.sleep(1.5)
        assert svc.info()["amqp_connections"] <= 6  # backing off, not a tight loop
        svc.apply(config)
        wait_for(lambda: rds.llen(DEFAULT_FALLBACK_KEY) == 0, 20)
        messages = queue.drain(expected=10)
    assert keys_of(messages) == [f"x{i}".encode() for i in range(10)]


def test_config_refused_is_reported_and_events_still_flow(redis_server: RedisServer, rds: redis.Redis,
                                                          queue: RabbitQueue) -> None:
    """Managed Redis: CONFIG is not allowed, an operator enabled the letters beforehand."""
    rds.execute_command("ACL", "SETUSER", "kea-limited", "on", ">limited-pw", "~*", "&*", "+@all", "-config")
    rds.config_set("notify-keyspace-events", "E$")
    upstream = RedisAddress(port=redis_server.port, username="kea-limited", password="limited-pw")
    try:
        with ServiceThread(make_config(redis_server, queue, events="$", upstream=upstream)) as svc:
            wait_for(lambda: svc.info()["notify_config_error"] != "")
            assert "limited-pw" not in svc.info()["notify_config_error"]
            time.sleep(0.2)
            rds.set("managed", "v")
            settle(svc, 1)
            messages = queue.drain(expected=1)
    finally:
        rds.execute_command("ACL", "DELUSER", "kea-limited")
    assert keys_of(messages) == [b"managed"]


def test_backlog_left_by_the_module_is_replayed_at_start(redis_server: RedisServer, rds: redis.Redis,
                                                         queue: RabbitQueue) -> None:
    """A drop-in replacement finds the module's list (plain bodies) and delivers it first."""
    rds.rpush(DEFAULT_FALLBACK_KEY, b"0\nset\nold1", b"injected payload", b"2\nlpush\nold2")
    with ServiceThread(make_config(redis_server, queue, events="$")) as svc:
        wait_for(lambda: rds.llen(DEFAULT_FALLBACK_KEY) == 0, 10)  # no event needed: a backlog connects
        rds.set("new", "v")
        settle(svc, 3)
        messages = queue.drain(expected=3)
        assert svc.info()["fallback_skipped_entries"] == 1
    assert [m.body for m in messages] == [b"0\nset\nold1", b"2\nlpush\nold2", b"0\nset\nnew"]
    assert messages[0].message_id.startswith("legacy-") and messages[1].headers == {"db": 2, "event": "lpush"}
