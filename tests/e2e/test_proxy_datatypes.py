"""Data through the proxy, with real clients: every data type, odd values, three client libraries.

Each test writes through the proxy and, where it matters, checks Redis directly (``fresh_redis``) so a
proxy that answered by itself could not pass.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from harness import ProxyProcess, user_dbsize

ALL_BYTES = bytes(range(256))
TWENTY_MB = 20 * 1024 * 1024


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def proxy_client(request: pytest.FixtureRequest, proxy: ProxyProcess) -> Iterator[redis.Redis]:
    """Each test twice: redis-py 8 speaks RESP3 by default, older clients RESP2."""
    with proxy.client(protocol=request.param) as client:
        yield client


def test_strings(proxy_client: redis.Redis, fresh_redis: redis.Redis) -> None:
    assert proxy_client.set(b"s:1", b"hello") is True
    assert proxy_client.get(b"s:1") == b"hello"
    assert proxy_client.append(b"s:1", b" world") == 11
    assert proxy_client.getrange(b"s:1", 0, 4) == b"hello"
    assert proxy_client.incr(b"s:n") == 1
    assert proxy_client.incrby(b"s:n", 41) == 42
    assert proxy_client.incrbyfloat(b"s:f", 1.5) == 1.5
    assert proxy_client.mset({b"s:a": b"1", b"s:b": b"2"}) is True
    assert proxy_client.mget([b"s:a", b"s:b", b"s:none"]) == [b"1", b"2", None]
    assert proxy_client.set(b"s:x", b"v", nx=True, px=60_000) is True
    assert proxy_client.set(b"s:x", b"w", nx=True) is None
    assert 0 < proxy_client.pttl(b"s:x") <= 60_000
    assert proxy_client.get(b"s:none") is None
    assert fresh_redis.get(b"s:1") == b"hello world"


def test_hashes(proxy_client: redis.Redis, fresh_redis: redis.Redis) -> None:
    assert proxy_client.hset(b"h", mapping={b"a": b"1", b"b": b"2"}) == 2
    assert proxy_client.hget(b"h", b"a") == b"1"
    assert proxy_client.hgetall(b"h") == {b"a": b"1", b"b": b"2"}
    assert proxy_client.hincrby(b"h", b"a", 10) == 11
    assert proxy_client.hdel(b"h", b"b") == 1
    assert proxy_client.hlen(b"h") == 1
    assert fresh_redis.hgetall(b"h") == {b"a": b"11"}


def test_lists(proxy_client: redis.Redis, fresh_redis: redis.Redis) -> None:
    assert proxy_client.rpush(b"l", b"a", b"b", b"c") == 3
    assert proxy_client.lpush(b"l", b"z") == 4
    assert proxy_client.lrange(b"l", 0, -1) == [b"z", b"a", b"b", b"c"]
    assert proxy_client.lpop(b"l") == b"z"
    assert proxy_client.rpop(b"l", 2) == [b"c", b"b"]
    assert proxy_client.lmove(b"l", b"l2", "LEFT", "RIGHT") == b"a"
    assert proxy_client.llen(b"l") == 0
    assert fresh_redis.lrange(b"l2", 0, -1) == [b"a"]


def test_sets(proxy_client: redis.Redis, fresh_redis: redis.Redis) -> None:
    assert proxy_client.sadd(b"set1", b"a", b"b", b"c") == 3
    assert proxy_client.sadd(b"set2", b"b", b"c", b"d") == 3
    assert proxy_client.sinter(b"set1", b"set2") == {b"b", b"c"}
    assert proxy_client.sunion(b"set1", b"set2") == {b"a", b"b", b"c", b"d"}
    assert proxy_client.sismember(b"set1", b"a")
    assert proxy_client.srem(b"set1", b"a") == 1
    assert fresh_redis.smembers(b"set1") == {b"b", b"c"}


def test_sorted_sets(proxy_client: redis.Redis, fresh_redis: redis.Redis) -> None:
    assert proxy_client.zadd(b"z", {b"a": 1, b"b": 2.5, b"c": -3}) == 3
    # RESP3 gives [member, score] pairs as lists, RESP2 as tuples (redis-py's choice, not ours).
    pairs = [tuple(pair) for pair in proxy_client.zrange(b"z", 0, -1, withscores=True)]
    assert pairs == [(b"c", -3.0), (b"a", 1.0), (b"b", 2.5)]
    assert proxy_client.zincrby(b"z", 10, b"a") == 11.0
    assert proxy_client.zrangebyscore(b"z", 0, 5) == [b"b"]
    assert proxy_client.zrank(b"z", b"a") == 2
    popped = proxy_client.zpopmin(b"z")  # RESP3: [member, score]; RESP2: [(member, score)]
    assert (tuple(popped) if isinstance(popped[0], bytes) else popped[0]) == (b"c", -3.0)
    assert fresh_redis.zcard(b"z") == 2


def test_streams(proxy_client: redis.Redis, fresh_redis: redis.Redis) -> None:
    first = proxy_client.xadd(b"st", {b"f": b"1"})
    second = proxy_client.xadd(b"st", {b"f": b"2", b"g": ALL_BYTES})
    assert proxy_client.xlen(b"st") == 2
    entries = proxy_client.xrange(b"st")
    assert entries == [(first, {b"f": b"1"}), (second, {b"f": b"2", b"g": ALL_BYTES})]
    proxy_client.xgroup_create(b"st", b"grp", id="0")
    read = proxy_client.xreadgroup(b"grp", b"consumer", {b"st": ">"}, count=10)
    # RESP3: {stream: [entries]}; RESP2: [[stream, [entries]]].
    entries = read[b"st"][0] if isinstance(read, dict) else read[0][1]
    assert [entry_id for entry_id, _ in entries] == [first, second]
    assert proxy_client.xack(b"st", b"grp", first, second) == 2
    assert fresh_redis.xlen(b"st") == 2


def test_empty_value(proxy_client: redis.Redis, fresh_redis: redis.Redis) -> None:
    assert proxy_client.set(b"empty", b"")
    assert proxy_client.get(b"empty") == b""
    assert proxy_client.strlen(b"empty") == 0
    assert fresh_redis.get(b"empty") == b""
    # An empty key name, too.
    assert proxy_client.set(b"", b"empty-key")
    assert proxy_client.get(b"") == b"empty-key"


def test_binary_keys_and_values(proxy_client: redis.Redis, fresh_redis: redis.Redis) -> None:
    key = b"bin:" + ALL_BYTES
    assert proxy_client.set(key, ALL_BYTES * 4)
    assert proxy_client.get(key) == ALL_BYTES * 4
    assert fresh_redis.get(key) == ALL_BYTES * 4
    # Bytes that look like RESP framing inside a value must not confuse a parser on the way.
    tricky = b"\r\n*3\r\n$3\r\nSET\r\n-ERR\r\n+OK\r\n"
    proxy_client.hset(b"bin:h", tricky, tricky)
    assert proxy_client.hgetall(b"bin:h") == {tricky: tricky}


def test_twenty_megabyte_value(proxy_client: redis.Redis, fresh_redis: redis.Redis) -> None:
    value = os.urandom(1024) * (TWENTY_MB // 1024)
    assert proxy_client.set(b"big", value)
    assert fresh_redis.strlen(b"big") == TWENTY_MB
    assert proxy_client.get(b"big") == value
    # And one coming from Redis that the proxy did not write.
    fresh_redis.set(b"big2", value[::-1])
    assert proxy_client.get(b"big2") == value[::-1]


def test_asyncio_client(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    async def scenario() -> None:
        client = redis.asyncio.Redis(host=proxy.host, port=proxy.port, socket_timeout=10,
                                      max_connections=500)
        try:
            assert await client.set(b"aio", ALL_BYTES)
            assert await client.get(b"aio") == ALL_BYTES
            results = await asyncio.gather(*(client.incr(b"aio:n") for _ in range(200)))
            assert sorted(results) == list(range(1, 201))
            async with client.pipeline(transaction=False) as pipe:
                for i in range(100):
                    pipe.set(f"aio:{i}", i)
                    pipe.get(f"aio:{i}")
                replies = await pipe.execute()
            assert replies[1::2] == [str(i).encode() for i in range(100)]
            assert await client.hset(b"aio:h", mapping={b"k": b"v"}) == 1
            assert await client.hgetall(b"aio:h") == {b"k": b"v"}
        finally:
            await client.aclose()

    asyncio.run(scenario())
    assert fresh_redis.get(b"aio:n") == b"200"


def _cli(proxy: ProxyProcess, *args: str, stdin: bytes | None = None) -> bytes:
    result = subprocess.run(["redis-cli", "-h", proxy.host, "-p", str(proxy.port), *args],
                            input=stdin, capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result
    return result.stdout


def test_redis_cli(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    assert _cli(proxy, "PING") == b"PONG\n"
    assert _cli(proxy, "SET", "cli:k", "a b c") == b"OK\n"
    assert _cli(proxy, "--raw", "GET", "cli:k") == b"a b c\n"
    # --no-raw: the formatted output a person sees on a terminal.
    assert _cli(proxy, "--no-raw", "RPUSH", "cli:l", "x", "y") == b"(integer) 2\n"
    assert _cli(proxy, "--no-raw", "LRANGE", "cli:l", "0", "-1") == b'1) "x"\n2) "y"\n'
    assert _cli(proxy, "--no-raw", "GET", "cli:none") == b"(nil)\n"
    assert _cli(proxy, "--no-raw", "HSET", "cli:l", "f", "v").startswith(b"(error) WRONGTYPE")
    # -x takes the last argument from stdin, byte for byte.
    assert _cli(proxy, "-x", "SET", "cli:bin", stdin=ALL_BYTES) == b"OK\n"
    assert fresh_redis.get(b"cli:bin") == ALL_BYTES
    # Commands piped on stdin, one per line, as a script would.
    out = _cli(proxy, stdin=b"SET cli:p 1\nINCR cli:p\nGET cli:p\n")
    assert out == b"OK\n2\n2\n"


def test_redis_cli_pipe_mode(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    """``redis-cli --pipe`` (mass insertion) ends with an ECHO of its own and checks every reply."""
    payload = b"".join(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\nv\r\n" % (len(k), k)
                       for k in (f"pipe:{i}".encode() for i in range(5000)))
    out = _cli(proxy, "--pipe", stdin=payload)
    assert b"errors: 0, replies: 5000" in out, out
    assert user_dbsize(fresh_redis) == 5000
