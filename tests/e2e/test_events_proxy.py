"""The event pipeline inside the real proxy process: kills, SIGTERM and the admin commands.

``python -m proxy serve`` in front of a private Redis; RabbitMQ through a :class:`FaultRelay`.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from faults import FaultRelay
from harness import ProxyProcess, RawClient, RedisServer, unreachable_amqp_url, wait_for
from proxy.config import DEFAULT_FALLBACK_KEY
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


def proxy_args(queue: RabbitQueue, amqp_port: int, *extra: str) -> list[str]:
    return ["--amqp", f"amqp://guest:guest@127.0.0.1:{amqp_port}/", "--routing-key", queue.routing_key,
            "--events", "$", "--keymask", "ALL", "--heartbeat", "2", *extra]


def write_sets(port: int, start: int, stop: int) -> None:
    data = b"".join(b"*3\r\n$3\r\nSET\r\n$%d\r\nk%d\r\n$1\r\nv\r\n" % (len(b"k%d" % i), i)
                    for i in range(start, stop))
    subprocess.run(["redis-cli", "-p", str(port), "--pipe"], input=data, check=True, capture_output=True)


def restart_gap(messages: list[Message]) -> list[Message]:
    """The events of a stream read by two instances one after the other: the one that started
    later cannot prove that nothing happened between the other's last checkpoint (or stop) and
    its own subscription, and says so with one gap marker (``reason=takeover``) behind everything
    the first one had stored. Returns the events without it."""
    gaps = [m for m in messages if m.type == "key_evt_amqp.gap"]
    assert len(gaps) == 1 and gaps[0].headers["reason"] == "takeover", [m.headers for m in gaps]
    assert messages[-1].type == "key_evt_amqp.gap"
    return [m for m in messages if m.type != "key_evt_amqp.gap"]


def first_arrivals(messages: list[Message]) -> list[bytes]:
    seen: dict[bytes, None] = {}
    for m in messages:
        seen.setdefault(m.body.split(b"\n", 2)[2], None)
    return list(seen)


def info_field(client: redis.Redis, name: str) -> str:
    """One field of ``key_evt_amqp.info`` (INFO-style ``name:value`` lines)."""
    text = client.execute_command("key_evt_amqp.info").decode()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return fields[name]


def test_sigkill_during_replay_loses_nothing(queue: RabbitQueue, relay: FaultRelay) -> None:
    total = 30_000
    with RedisServer() as rs:
        client = rs.client()
        relay.cut()  # the broker is unreachable: everything goes to the fallback list
        with ProxyProcess(rs.url, proxy_args(queue, relay.port)) as proxy:
            wait_for(lambda: "$" in client.config_get("notify-keyspace-events")["notify-keyspace-events"])
            write_sets(rs.port, 0, total)
            wait_for(lambda: client.llen(DEFAULT_FALLBACK_KEY) == total, 30)
            relay.restore()
            wait_for(lambda: client.llen(DEFAULT_FALLBACK_KEY) < total - 3000, 30)
            proxy.kill()  # SIGKILL in the middle of the replay
        left = client.llen(DEFAULT_FALLBACK_KEY)
        assert 0 < left < total, "the kill did not land in the middle of the replay"
        with ProxyProcess(rs.url, proxy_args(queue, AMQP_PORT)):
            wait_for(lambda: client.llen(DEFAULT_FALLBACK_KEY) == 0, 60)
            messages = queue.drain(expected=total + 1, idle=2, timeout=60)
    events = restart_gap(messages)
    assert first_arrivals(events) == [b"k%d" % i for i in range(total)]
    print(f"\nSIGKILL with {left} events left in the list: {len(events) - total} duplicates")


def test_sigterm_stores_unconfirmed_events(queue: RabbitQueue, relay: FaultRelay) -> None:
    with RedisServer() as rs:
        client = rs.client()
        args = proxy_args(queue, relay.port, "--publish-timeout", "60", "--heartbeat", "60")
        with ProxyProcess(rs.url, args) as proxy:
            wait_for(lambda: "$" in client.config_get("notify-keyspace-events")["notify-keyspace-events"])
            write_sets(rs.port, 0, 100)
            wait_for(lambda: queue.count() == 100, 20)
            relay.blackhole()  # confirms stop coming: what is published now stays unconfirmed
            write_sets(rs.port, 100, 300)
            wait_for(lambda: info_field(proxy.client(), "events_accepted") == "300")
            assert proxy.stop() == 0, proxy.log_text()[-4000:]
        assert client.llen(DEFAULT_FALLBACK_KEY) == 200
        relay.restore()
        with ProxyProcess(rs.url, proxy_args(queue, AMQP_PORT)):
            wait_for(lambda: client.llen(DEFAULT_FALLBACK_KEY) == 0, 30)
            messages = queue.drain(expected=301, idle=1)
    assert first_arrivals(restart_gap(messages)) == [b"k%d" % i for i in range(300)]


def test_admin_connect_disconnect_replies(queue: RabbitQueue) -> None:
    # lazy, as the module: not connected until the first event or `connect`
    with RedisServer() as rs, ProxyProcess(rs.url, proxy_args(queue, AMQP_PORT, "--amqp-connect", "lazy")) as proxy:
        with RawClient(proxy.port) as raw:
            raw.send(b"key_evt_amqp.connect\r\n")
            assert raw.sock.recv(100) == b"+AMQP CONNECT OK\r\n"
            raw.send(b"key_evt_amqp.connect\r\n")
            assert raw.sock.recv(100) == b"-AMQP CONNECT ERROR: 6\r\n"
            raw.send(b"key_evt_amqp.disconnect\r\n")
            assert raw.sock.recv(100) == b"+AMQP DISCONNECT OK\r\n"
            raw.send(b"key_evt_amqp.disconnect\r\n")
            assert raw.sock.recv(100) == b"-AMQP DISCONNECT ERROR: 1\r\n"
            rs.client().set("stored", "v")
            wait_for(lambda: rs.client().llen(DEFAULT_FALLBACK_KEY) == 1)
            raw.send(b"key_evt_amqp.connect\r\n")
            assert raw.sock.recv(100) == b"+AMQP CONNECT OK\r\n"
            wait_for(lambda: queue.count() == 1)


def list_lengths(rs: RedisServer) -> dict[tuple[int, bytes], int]:
    """Every list key in dbs 0 and 1 with its length."""
    out = {}
    for db in (0, 1):
        with rs.client(db=db) as c:
            for key in c.scan_iter(_type="list"):
                out[(db, key)] = c.llen(key)
    return out


def test_two_proxies_never_forward_each_others_fallback_writes() -> None:
    """Issue #8 item 9: two proxies on one Redis, broker unreachable, different fallback keys and
    dbs, list events selected. Each must store each SET once, not each other's RPUSH events."""
    with RedisServer() as rs:
        client = rs.client()
        amqp = ["--amqp", unreachable_amqp_url(), "--events", "A", "--keymask", "ALL"]
        with ProxyProcess(rs.url, amqp), \
                ProxyProcess(rs.url + "1", [*amqp, "--fallback-key", "other-proxy-backlog"]):
            wait_for(lambda: "A" in client.config_get("notify-keyspace-events")["notify-keyspace-events"])
            time.sleep(0.5)  # both subscribed
            for i in range(3):
                client.set(f"db0-{i}", "v")
            with rs.client(db=1) as db1:
                db1.set("db1-0", "v")
                db1.set("db1-1", "v")
            time.sleep(5)
            first = list_lengths(rs)
            time.sleep(1)
            second = list_lengths(rs)
    assert first == second, f"the fallback lists keep growing: {first} -> {second}"
    assert first == {(0, DEFAULT_FALLBACK_KEY): 5, (1, b"other-proxy-backlog:key_evt_amqp"): 5}
