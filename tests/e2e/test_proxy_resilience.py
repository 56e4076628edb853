"""The proxy under load and when things break: many clients, clients that vanish, a Redis that dies,
readers and writers too slow for the data, shutdown, and redis-benchmark.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from harness import (ErrorReply, ProxyProcess, RawClient, RedisServer, encode_command, port_accepts,
                     unreachable_amqp_url, user_dbsize, wait_for)

CONCURRENT_CLIENTS = 500
RSS_LIMIT = 150 * 1024 * 1024  # the proxy's resident memory must stay below this under back-pressure
MEGABYTE = 1024 * 1024


@pytest.fixture
def own_stack() -> Iterator[tuple[RedisServer, ProxyProcess]]:
    """A Redis and a proxy for this test alone, free to be killed."""
    with RedisServer() as server, ProxyProcess(server.url, ["--amqp", unreachable_amqp_url()]) as proxy:
        yield server, proxy


def named_clients(server_client: redis.Redis, name: str) -> int:
    """Redis connections named ``name`` (a client names its upstream with CLIENT SETNAME)."""
    return sum(1 for entry in server_client.client_list() if entry["name"] == name)


def test_500_concurrent_clients(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    async def one_client(n: int) -> None:
        client = redis.asyncio.Redis(host=proxy.host, port=proxy.port, socket_timeout=30,
                                     socket_connect_timeout=30, max_connections=1)
        try:
            for i in range(5):
                assert await client.set(f"c:{n}:{i}", f"{n}-{i}")
                assert await client.get(f"c:{n}:{i}") == f"{n}-{i}".encode()
            assert await client.incr("c:total") > 0
        finally:
            await client.aclose()

    async def everyone() -> list[BaseException | None]:
        return await asyncio.gather(*(one_client(n) for n in range(CONCURRENT_CLIENTS)),
                                    return_exceptions=True)

    failures = [r for r in asyncio.run(everyone()) if r is not None]
    assert failures == [], failures[:5]
    assert fresh_redis.get("c:total") == str(CONCURRENT_CLIENTS).encode()
    assert user_dbsize(fresh_redis) == CONCURRENT_CLIENTS * 5 + 1


def test_500_clients_connected_at_once(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    """All connections open at the same time, each with its own upstream, then all answer."""
    clients = [RawClient(proxy.port, timeout=30) for _ in range(CONCURRENT_CLIENTS)]
    try:
        for n, raw in enumerate(clients):
            raw.send(encode_command("CLIENT", "SETNAME", "at-once") + encode_command("SET", f"open:{n}", n))
        wait_for(lambda: named_clients(fresh_redis, "at-once") == CONCURRENT_CLIENTS, timeout=30,
                 message="for one upstream connection per client")
        for n, raw in enumerate(clients):
            assert raw.read_replies(2) == [b"OK", b"OK"]
            assert raw.command("GET", f"open:{n}") == str(n).encode()
    finally:
        for raw in clients:
            raw.close()
    wait_for(lambda: named_clients(fresh_redis, "at-once") == 0, timeout=30,
             message="for the upstream connections to close with their clients")


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_vanishing_mid_pipeline(how: str, proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    fresh_redis.set("v:big", b"x" * 100_000)
    with proxy.client() as bystander:
        assert bystander.ping()
        for _ in range(3):
            sock = socket.create_connection((proxy.host, proxy.port))
            sock.sendall(encode_command("CLIENT", "SETNAME", "vanishing")
                         + encode_command("GET", "v:big") * 500 + encode_command("INCR", "v:n") * 500)
            if how == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        assert bystander.set("v:after", "1")
        assert bystander.get("v:big") == b"x" * 100_000
    assert proxy.is_running()
    wait_for(lambda: named_clients(fresh_redis, "vanishing") == 0, timeout=15,
             message="for the vanished clients' upstream connections to close")


def test_client_vanishing_while_blocked(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    """A client gone during BLPOP (with one of our commands waiting behind it) frees its upstream."""
    with RawClient(proxy.port) as raw:
        raw.send(encode_command("CLIENT", "SETNAME", "vanish-blocked") + encode_command("BLPOP", "vb:q", "0")
                 + encode_command("key_evt_amqp.config_get"))
        wait_for(lambda: fresh_redis.info("clients")["blocked_clients"] >= 1, message="for BLPOP to block")
    wait_for(lambda: named_clients(fresh_redis, "vanish-blocked") == 0, timeout=10,
             message="for the blocked client's upstream to close")
    assert fresh_redis.info("clients")["blocked_clients"] == 0
    # Nobody consumes what is pushed now (an orphaned BLPOP would eat it and the reply go nowhere).
    assert fresh_redis.rpush("vb:q", "precious") == 1
    time.sleep(0.2)
    assert fresh_redis.llen("vb:q") == 1
    assert proxy.is_running()


def test_redis_killed_while_clients_are_connected(own_stack: tuple[RedisServer, ProxyProcess]) -> None:
    server, proxy = own_stack
    idle = RawClient(proxy.port)
    blocked = RawClient(proxy.port)
    busy = RawClient(proxy.port)
    sync_client = proxy.client(socket_timeout=5)
    try:
        assert idle.command("PING") == b"PONG"
        assert sync_client.set("k", "v")
        blocked.send(encode_command("BLPOP", "never", "0"))
        with server.client() as direct:
            wait_for(lambda: direct.info("clients")["blocked_clients"] == 1, message="for BLPOP to block")
        busy.send(encode_command("INCR", "n") * 10_000)

        server.kill()

        # Each connected client sees its connection closed, promptly, as straight at Redis: no
        # reply of the proxy's own (a client's retry logic depends on seeing a connection loss).
        for raw in (idle, blocked):
            data, closed = raw.read_until_closed(timeout=10)
            assert closed, f"the client was left hanging; got {data!r}"
            assert data == b"", data
        data, closed = busy.read_until_closed(timeout=10)
        assert closed
        # Whatever Redis answered before it died arrives whole, and nothing else.
        assert data == b"" or (data.endswith(b"\r\n") and b"-ERR" not in data), data[-200:]
        # redis-py sees a lost connection (and its reconnect fails), never an error reply.
        with pytest.raises(redis.ConnectionError):
            sync_client.get("k")
        assert proxy.is_running(), proxy.log_text()[-3000:]

        # While Redis is down a new client is told so (an error or a close), not left hanging.
        with RawClient(proxy.port, timeout=10) as late:
            try:
                late.send(encode_command("PING"))
                reply = late.read_reply()
                assert isinstance(reply, ErrorReply), reply
            except (ConnectionError, OSError):
                pass

        server.start()
        with proxy.client() as fresh:
            wait_for(fresh.ping, timeout=10, message="for the proxy to reach the restarted Redis")
            assert fresh.set("k2", "v2")
            assert fresh.get("k2") == b"v2"
        assert proxy.is_running()
    finally:
        for raw in (idle, blocked, busy):
            raw.close()
        sync_client.close()


def test_slow_reader_does_not_grow_the_proxy(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    value = os.urandom(MEGABYTE)
    fresh_redis.set("slow:big", value)
    count = 200
    with RawClient(proxy.port, timeout=30) as raw:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        raw.send(encode_command("GET", "slow:big") * count)
        peak = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            peak = max(peak, proxy.rss_bytes())
            time.sleep(0.1)
        assert peak < RSS_LIMIT, f"proxy RSS reached {peak / MEGABYTE:.0f} MB with a reader not reading"
        for _ in range(count):
            assert raw.read_reply() == value
        assert raw.command("PING") == b"PONG"


def test_slow_redis_does_not_grow_the_proxy(own_stack: tuple[RedisServer, ProxyProcess]) -> None:
    """The reverse direction: Redis stops reading (SIGSTOP) while a client keeps writing."""
    server, proxy = own_stack
    value = b"w" * MEGABYTE
    count = 200
    with RawClient(proxy.port, timeout=60) as raw:
        assert raw.command("PING") == b"PONG"
        os.kill(server.pid, signal.SIGSTOP)
        try:
            writer = threading.Thread(target=lambda: raw.send(encode_command("SET", "w", value) * count))
            writer.start()
            peak = 0
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                peak = max(peak, proxy.rss_bytes())
                time.sleep(0.1)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert peak < RSS_LIMIT, f"proxy RSS reached {peak / MEGABYTE:.0f} MB with Redis not reading"
        writer.join(timeout=60)
        assert not writer.is_alive()
        assert raw.read_replies(count) == [b"OK"] * count


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_proxy_with_exit_0(sig: int) -> None:
    with RedisServer() as server, ProxyProcess(server.url, ["--amqp", unreachable_amqp_url()]) as proxy:
        idle = RawClient(proxy.port)
        try:
            assert idle.command("PING") == b"PONG"
            started = time.monotonic()
            proxy.proc.send_signal(sig)  # type: ignore[union-attr]
            code = proxy.proc.wait(timeout=15)  # type: ignore[union-attr]
            elapsed = time.monotonic() - started
        finally:
            idle.close()
        assert code == 0, proxy.log_text()[-3000:]
        assert elapsed < 8, f"shutdown took {elapsed:.1f}s"
        assert not port_accepts(proxy.port)


def read_rest(raw: RawClient, replies: list[object]) -> None:
    try:
        replies.extend(raw.read_replies(19))
    except (ConnectionError, OSError) as exc:
        replies.append(exc)


def test_sigterm_lets_in_flight_replies_finish() -> None:
    with RedisServer() as server, ProxyProcess(server.url, ["--amqp", unreachable_amqp_url()]) as proxy:
        with server.client() as direct:
            direct.set("big", b"z" * MEGABYTE)
        replies: list[object] = []
        with RawClient(proxy.port, timeout=15) as raw:
            raw.send(encode_command("GET", "big") * 20)
            replies.append(raw.read_reply())  # the batch is in flight
            reader = threading.Thread(target=read_rest, args=(raw, replies))
            reader.start()
            assert proxy.stop(timeout=15) == 0
            reader.join(timeout=15)
        # The replies Redis had already been asked for all arrived before the close.
        assert replies == [b"z" * MEGABYTE] * 20


def test_redis_benchmark(proxy: ProxyProcess) -> None:
    result = subprocess.run(
        ["redis-benchmark", "-h", proxy.host, "-p", str(proxy.port), "-t", "set,get,lpush,lpop,incr",
         "-q", "-n", "20000"],
        capture_output=True, timeout=180, check=False)
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    assert "error" not in output.lower(), output
    for test in ("SET", "GET", "LPUSH", "LPOP", "INCR"):
        assert f"{test}: " in output, output
