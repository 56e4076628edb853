"""Volume and faults: 100,000 SETs in order; a cut link; a black hole. Nothing may be lost.

The broker is reached through a :class:`faults.FaultRelay`, so a test can cut or black-hole the
link without touching the shared RabbitMQ. Redis's order is the order of one ``redis-cli --pipe``
stream, ``k0 .. kN-1``.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Iterator

import pytest

from events_runner import ServiceThread
from faults import FaultRelay
from harness import RedisServer, wait_for
from proxy.config import Config, RedisAddress
from rabbit import Message, RabbitQueue

AMQP_PORT = 5672


@pytest.fixture
def queue() -> Iterator[RabbitQueue]:
    with RabbitQueue() as q:
        yield q


@pytest.fixture
def relay() -> Iterator[FaultRelay]:
    with FaultRelay(AMQP_PORT) as r:
        yield r


def make_config(server: RedisServer, queue: RabbitQueue, **changes: object) -> Config:
    base = Config(upstream=RedisAddress(port=server.port), routing_key=queue.routing_key,
                  events="$", keymasks=(b"ALL",))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def write_sets(port: int, start: int, stop: int) -> None:
    """SET k<start> .. k<stop-1>, in this order, as one pipelined stream."""
    data = b"".join(b"*3\r\n$3\r\nSET\r\n$%d\r\nk%d\r\n$1\r\nv\r\n" % (len(b"k%d" % i), i)
                    for i in range(start, stop))
    subprocess.run(["redis-cli", "-p", str(port), "--pipe"], input=data, check=True, capture_output=True)


def check_delivery(messages: list[Message], total: int, max_duplicates: int) -> int:
    """Every key arrived, first arrivals in order, duplicates few and recognisable. Returns #dups."""
    first: dict[bytes, str | None] = {}
    order: list[bytes] = []
    duplicates = 0
    for m in messages:
        if m.type == "key_evt_amqp.gap" and m.headers.get("reason") in ("takeover", b"takeover"):
            continue  # an earlier test's service stopped on this Redis: events since may be lost
        key = m.body.split(b"\n", 2)[2]
        if key in first:
            duplicates += 1
            assert first[key] == m.message_id, f"duplicate of {key!r} with another message_id"
        else:
            first[key] = m.message_id
            order.append(key)
    expected = [b"k%d" % i for i in range(total)]
    missing = set(expected) - set(first)
    assert not missing, f"{len(missing)} events lost, e.g. {sorted(missing)[:5]}"
    assert order == expected, "first arrivals out of Redis's order"
    assert duplicates <= max_duplicates
    return duplicates


def test_100k_sets_in_order_none_twice(redis_server: RedisServer, queue: RabbitQueue) -> None:
    total = 100_000
    with ServiceThread(make_config(redis_server, queue)) as svc:
        wait_for(lambda: "$" in svc.info()["notify_keyspace_events"])
        started = time.monotonic()
        write_sets(redis_server.port, 0, total)
        wait_for(lambda: svc.info()["events_confirmed"] >= total, 120, message="for 100k confirms")
        elapsed = time.monotonic() - started
        info = svc.info()
    print(f"\n100k SETs: {total / elapsed:,.0f} events/s end to end ({elapsed:.1f}s); "
          f"{info['events_to_fallback']} went through the fallback list")
    messages = queue.drain(expected=total, idle=2, timeout=120)
    assert len(messages) == total
    check_delivery(messages, total, max_duplicates=0)


def test_cut_in_the_middle_loses_nothing(redis_server: RedisServer, queue: RabbitQueue, relay: FaultRelay) -> None:
    total, chunk = 40_000, 4_000
    config = make_config(redis_server, queue, amqp_port=relay.port)
    with ServiceThread(config) as svc:
        wait_for(lambda: "$" in svc.info()["notify_keyspace_events"])
        for n, start in enumerate(range(0, total, chunk)):
            if n == 4:
                relay.cut()
            if n == 7:
                relay.restore()
            write_sets(redis_server.port, start, start + chunk)
            time.sleep(0.15)
        wait_for(lambda: svc.info()["events_confirmed"] >= total and svc.info()["fallback_length"] == 0
                 and svc.info()["pipeline_mode"] == "direct", 90)
        info = svc.info()
    assert info["amqp_connections"] >= 2
    messages = queue.drain(expected=total, idle=2, timeout=90)
    duplicates = check_delivery(messages, total, max_duplicates=config.publish_window)
    print(f"\ncut: {len(messages)} messages for {total} events, {duplicates} duplicates")


def test_black_hole_is_detected_by_heartbeat(redis_server: RedisServer, queue: RabbitQueue,
                                             relay: FaultRelay) -> None:
    heartbeat = 2
    total = 6_000
    config = make_config(redis_server, queue, amqp_port=relay.port, heartbeat=heartbeat, publish_timeout=60.0)
    with ServiceThread(config) as svc:
        wait_for(lambda: "$" in svc.info()["notify_keyspace_events"])
        write_sets(redis_server.port, 0, 2_000)
        wait_for(lambda: svc.info()["events_confirmed"] >= 2_000, 30)
        relay.blackhole()
        holed = time.monotonic()
        write_sets(redis_server.port, 2_000, 4_000)
        wait_for(lambda: svc.info()["amqp_state"] != "ready", 4 * heartbeat)
        detected = time.monotonic() - holed
        relay.restore()
        write_sets(redis_server.port, 4_000, total)
        wait_for(lambda: svc.info()["events_confirmed"] >= total and svc.info()["fallback_length"] == 0, 60)
    print(f"\nblack hole detected after {detected:.1f}s (heartbeat {heartbeat}s)")
    assert detected <= 2 * heartbeat + 0.5
    messages = queue.drain(expected=total, idle=2)
    check_delivery(messages, total, max_duplicates=config.publish_window)


def test_blocked_broker_does_not_stall_the_pipeline(redis_server: RedisServer, queue: RabbitQueue,
                                                    relay: FaultRelay) -> None:
    """A broker that stops reading (as under a memory alarm) but still sends heartbeats."""
    total = 3_000
    config = make_config(redis_server, queue, amqp_port=relay.port, heartbeat=2, publish_timeout=2.0,
                         connect_timeout=2.0)
    with ServiceThread(config) as svc:
        wait_for(lambda: "$" in svc.info()["notify_keyspace_events"])
        write_sets(redis_server.port, 0, 1_000)
        wait_for(lambda: svc.info()["events_confirmed"] >= 1_000, 30)
        relay.stall()
        write_sets(redis_server.port, 1_000, 2_000)
        # the reader keeps going and the unconfirmed events reach the fallback list
        # (what was on the wire before the stall may still be confirmed)
        wait_for(lambda: svc.info()["publish_timeouts"] >= 1 and svc.info()["fallback_length"] > 0
                 and svc.info()["events_confirmed"] + svc.info()["fallback_length"]
                 == 2_000 + svc.info()["gaps"], 15)  # (the restart gap of an earlier test's service)
        assert svc.info()["events_seen"] >= 2_000
        relay.restore()
        write_sets(redis_server.port, 2_000, total)
        wait_for(lambda: svc.info()["events_confirmed"] >= total and svc.info()["fallback_length"] == 0, 60)
    messages = queue.drain(expected=total, idle=2)
    check_delivery(messages, total, max_duplicates=config.publish_window)
