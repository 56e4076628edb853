"""Connection state through the proxy: transactions, blocking commands, pub/sub, RESP3, SELECT,
client tracking and MONITOR. All of it must work because each client has its own upstream connection.
"""

from __future__ import annotations

import asyncio
import threading
import time

import redis
import redis.asyncio

from harness import ErrorReply, ProxyProcess, PushReply, RawClient, RedisServer, encode_command, wait_for


def test_multi_exec(proxy_client: redis.Redis, fresh_redis: redis.Redis) -> None:
    pipe = proxy_client.pipeline(transaction=True)
    pipe.set("m:a", "1").incr("m:a").lpush("m:l", "x").get("m:a")
    assert pipe.execute() == [True, 2, 1, b"2"]
    assert fresh_redis.get("m:a") == b"2"


def test_multi_discard_and_queue_time_error(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    with RawClient(proxy.port) as raw:
        assert raw.command("MULTI") == b"OK"
        assert raw.command("SET", "d:k", "1") == b"QUEUED"
        assert raw.command("DISCARD") == b"OK"
        assert raw.command("MULTI") == b"OK"
        assert raw.command("SET", "d:k", "1") == b"QUEUED"
        assert raw.command("NOSUCHCOMMAND").startswith(b"ERR unknown command")
        assert raw.command("EXEC").startswith(b"EXECABORT")
    assert fresh_redis.exists("d:k") == 0


def test_watch_conflict_from_another_client(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    with proxy.client() as watcher, proxy.client() as other:
        watcher.set("w:k", "0")
        with watcher.pipeline(transaction=True) as pipe:
            pipe.watch("w:k")
            assert pipe.get("w:k") == b"0"
            other.set("w:k", "changed")  # through the proxy, on another upstream connection
            pipe.multi()
            pipe.set("w:k", "mine")
            try:
                pipe.execute()
            except redis.WatchError:
                pass
            else:
                raise AssertionError("EXEC should have failed: the watched key changed")
        assert fresh_redis.get("w:k") == b"changed"
        # Without a conflict the same sequence commits.
        with watcher.pipeline(transaction=True) as pipe:
            pipe.watch("w:k")
            pipe.multi()
            pipe.set("w:k", "mine")
            assert pipe.execute() == [True]
    assert fresh_redis.get("w:k") == b"mine"


def test_blpop_woken_by_another_client(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    result: list[object] = []
    with proxy.client(socket_timeout=20) as blocked, proxy.client() as pusher:
        thread = threading.Thread(target=lambda: result.append(blocked.blpop(["b:q"], timeout=15)))
        thread.start()
        wait_for(lambda: fresh_redis.info("clients")["blocked_clients"] >= 1, message="for BLPOP to block")
        started = time.monotonic()
        assert pusher.rpush("b:q", "wake") == 1
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert time.monotonic() - started < 5
    assert result == [(b"b:q", b"wake")]


def test_blpop_timeout_returns_nil(proxy_client: redis.Redis) -> None:
    assert proxy_client.blpop(["b:never"], timeout=0.2) is None


def test_xread_block(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    result: list[object] = []
    with proxy.client(socket_timeout=20) as reader, proxy.client() as writer:
        thread = threading.Thread(target=lambda: result.append(reader.xread({"x:s": "$"}, block=15_000)))
        thread.start()
        wait_for(lambda: fresh_redis.info("clients")["blocked_clients"] >= 1, message="for XREAD to block")
        entry_id = writer.xadd("x:s", {"f": "v"})
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert result == [[[b"x:s", [(entry_id, {b"f": b"v"})]]]]


def test_subscribe_and_psubscribe(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    with proxy.client() as client, proxy.client() as publisher:
        pubsub = client.pubsub()
        try:
            pubsub.subscribe("news")
            pubsub.psubscribe("log.*")
            for expected in (b"subscribe", b"psubscribe"):
                message = pubsub.get_message(timeout=5)
                assert message is not None and message["type"] == expected.decode(), message
            assert publisher.publish("news", b"hello") == 1
            assert publisher.publish("log.error", b"\x00bin\xff") == 1
            assert fresh_redis.publish("other", b"ignored") == 0
            got = [pubsub.get_message(timeout=5) for _ in range(2)]
            assert got[0] is not None and got[1] is not None
            assert (got[0]["type"], got[0]["channel"], got[0]["data"]) == ("message", b"news", b"hello")
            assert (got[1]["type"], got[1]["pattern"], got[1]["channel"], got[1]["data"]) == (
                "pmessage", b"log.*", b"log.error", b"\x00bin\xff")
            pubsub.unsubscribe("news")
            pubsub.punsubscribe("log.*")
            kinds = {pubsub.get_message(timeout=5)["type"] for _ in range(2)}  # type: ignore[index]
            assert kinds == {"unsubscribe", "punsubscribe"}
            assert publisher.publish("news", b"late") == 0
        finally:
            pubsub.close()


def test_pubsub_many_messages_in_order(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    with RawClient(proxy.port) as raw:
        assert raw.command("SUBSCRIBE", "bulk") == [b"subscribe", b"bulk", 1]
        pipe = fresh_redis.pipeline(transaction=False)
        for i in range(2000):
            pipe.publish("bulk", str(i))
        pipe.execute()
        for i in range(2000):
            assert raw.read_reply() == [b"message", b"bulk", str(i).encode()]
        assert raw.command("PING") == [b"pong", b""]


def test_hello_3_raw(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    fresh_redis.hset("r3:h", mapping={"a": "1"})
    with RawClient(proxy.port) as raw:
        hello = raw.command("HELLO", "3")
        assert isinstance(hello, dict) and hello[b"proto"] == 3 and hello[b"server"] == b"redis", hello
        raw.send(encode_command("HGETALL", "r3:h"))
        raw.sock.settimeout(10)
        assert raw.sock.recv(100) == b"%1\r\n$1\r\na\r\n$1\r\n1\r\n"
        assert raw.command("SISMEMBER", "r3:none", "x") == 0
        assert raw.command("GET", "r3:none") is None
        assert isinstance(raw.command("HELLO", "2"), list)  # back to RESP2: a flat array
        raw.send(encode_command("HGETALL", "r3:h"))
        assert raw.sock.recv(100) == b"*2\r\n$1\r\na\r\n$1\r\n1\r\n"


def test_resp3_with_redis_py(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    fresh_redis.hset("r3:py", mapping={"a": "1", "b": "2"})
    fresh_redis.zadd("r3:z", {"m": 1.5})
    with proxy.client(protocol=3) as client:
        assert client.hgetall("r3:py") == {b"a": b"1", b"b": b"2"}
        assert client.zscore("r3:z", "m") == 1.5
        assert client.smembers("r3:none") == set()
        assert client.execute_command("HELLO")[b"proto"] == 3


def test_resp3_asyncio(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    fresh_redis.hset("r3:aio", mapping={"x": "y"})

    async def scenario() -> dict:
        client = redis.asyncio.Redis(host=proxy.host, port=proxy.port, protocol=3, socket_timeout=10)
        try:
            return await client.hgetall("r3:aio")
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == {b"x": b"y"}


def test_select(proxy: ProxyProcess, redis_server: RedisServer, fresh_redis: redis.Redis) -> None:
    with RawClient(proxy.port) as raw:
        assert raw.command("SELECT", "5") == b"OK"
        assert raw.command("SET", "sel:k", "five") == b"OK"
        assert raw.command("SELECT", "0") == b"OK"
        assert raw.command("GET", "sel:k") is None
        assert raw.command("SELECT", "99").startswith(b"ERR")
    with redis_server.client(db=5) as db5:
        assert db5.get("sel:k") == b"five"
    with proxy.client(db=5) as client:
        assert client.get("sel:k") == b"five"
    # A new connection starts in db 0 again: state is per connection.
    with proxy.client() as client:
        assert client.get("sel:k") is None


def test_client_tracking_invalidation_push(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    fresh_redis.set("trk:k", "v1")
    with RawClient(proxy.port) as raw, proxy.client() as writer:
        assert raw.command("HELLO", "3")[b"proto"] == 3
        assert raw.command("CLIENT", "TRACKING", "ON") == b"OK"
        assert raw.command("GET", "trk:k") == b"v1"
        writer.set("trk:k", "v2")
        push = raw.read_reply()
        assert isinstance(push, PushReply) and push == [b"invalidate", [b"trk:k"]], push
        assert raw.command("GET", "trk:k") == b"v2"


def test_client_tracking_redirect_to_another_connection(proxy: ProxyProcess) -> None:
    """RESP2 tracking with REDIRECT names another connection by its Redis id, which CLIENT ID gives."""
    with RawClient(proxy.port) as sub, RawClient(proxy.port) as tracked, proxy.client() as writer:
        sub_id = sub.command("CLIENT", "ID")
        assert isinstance(sub_id, int)
        assert sub.command("SUBSCRIBE", "__redis__:invalidate") == [b"subscribe", b"__redis__:invalidate", 1]
        assert tracked.command("CLIENT", "TRACKING", "ON", "REDIRECT", str(sub_id), "BCAST",
                               "PREFIX", "rd:") == b"OK"
        writer.set("rd:k", "1")
        assert sub.read_reply() == [b"message", b"__redis__:invalidate", [b"rd:k"]]


def test_monitor_sees_commands(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as monitor, proxy.client() as client:
        assert monitor.command("MONITOR") == b"OK"
        client.set("mon:key", "mon-value")
        seen = b""
        while b"mon-value" not in seen:
            line = monitor.read_reply()
            seen += line
        assert b'"SET" "mon:key" "mon-value"' in seen
        # The admin commands never reach Redis, so MONITOR never shows them.
        client.execute_command("key_evt_amqp.config_get")
        client.set("mon:after", "1")
        seen = b""
        while b"mon:after" not in seen:
            seen += monitor.read_reply() + b"\n"
        assert b"key_evt_amqp" not in seen.lower(), seen


def test_quit_closes_the_connection(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as raw:
        assert raw.command("QUIT") == b"OK"
        assert raw.is_closed_by_peer(timeout=5)


def test_reset(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as raw:
        assert raw.command("SELECT", "3") == b"OK"
        assert raw.command("MULTI") == b"OK"
        assert raw.command("RESET") == b"RESET"
        assert raw.command("CLIENT", "INFO").split(b" db=")[1].startswith(b"0 ")
        reply = raw.command("EXEC")
        assert isinstance(reply, ErrorReply) and reply.startswith(b"ERR EXEC without MULTI")
