"""Bytes as people and broken clients really send them: inline commands typed in telnet, and garbage.

For garbage, the proxy must answer exactly what Redis answers (same error text, then close), so each
case is sent to Redis directly and through the proxy and the two byte streams are compared.
"""

from __future__ import annotations

import socket

import pytest
import redis

from harness import ProxyProcess, RawClient, RedisServer, encode_command, exchange

PROTOCOL_ERROR_CLOSE_TIMEOUT = 5.0


def exchange_split(port: int, data: bytes, split_at: int | None = None) -> tuple[bytes, bool]:
    """Send ``data`` raw (cut once at ``split_at``, 0.1 s apart), then read until closed or silent."""
    chunks = [data] if split_at is None else [data[:split_at], data[split_at:]]
    return exchange(port, chunks, gap=0.1, idle=PROTOCOL_ERROR_CLOSE_TIMEOUT)


def test_inline_ping(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as raw:
        raw.send(b"PING\r\n")
        assert raw.sock.recv(100) == b"+PONG\r\n"


def test_inline_commands_as_typed_in_telnet(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    with RawClient(proxy.port) as raw:
        raw.send(b'SET tel:k "a b"\r\n')
        assert raw.read_reply() == b"OK"
        raw.send(b"GET tel:k\r\n")
        assert raw.read_reply() == b"a b"
        # Bare LF, as some telnet clients send, and extra spaces.
        raw.send(b"  INCR   tel:n \n")
        assert raw.read_reply() == 1
        # An empty line is ignored by Redis (no reply); the next command still answers.
        raw.send(b"\r\nECHO 'single quoted'\r\n")
        assert raw.read_reply() == b"single quoted"
        raw.send(b'SET tel:esc "tab\\there\\x41"\r\n')
        assert raw.read_reply() == b"OK"
    assert fresh_redis.get("tel:k") == b"a b"
    assert fresh_redis.get("tel:esc") == b"tab\thereA"


def test_inline_admin_command(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as raw:
        raw.send(b"key_evt_amqp.keymask_add x\r\n")
        assert raw.read_reply() == b"OK"
        raw.send(b"key_evt_amqp.nosuch\r\n")
        assert raw.read_reply() == b"ERR unknown command 'key_evt_amqp.nosuch', with args beginning with: "


def test_inline_and_multibulk_mixed_in_one_send(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as raw:
        raw.send(b"SET mix:a 1\r\n" + encode_command("INCR", "mix:a") + b"key_evt_amqp.keymask_add x\r\n"
                 + b"GET mix:a\r\n" + encode_command("key_evt_amqp.keymask_add", "y") + b"PING\r\n")
        assert raw.read_replies(6) == [b"OK", 2, b"OK", b"2", b"OK", b"PONG"]


def test_command_split_byte_by_byte(proxy: ProxyProcess) -> None:
    data = (encode_command("SET", "split:k", "v") + encode_command("key_evt_amqp.keymask_add", "x")
            + b"GET split:k\r\n")
    with RawClient(proxy.port) as raw:
        raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            raw.send(data[i:i + 1])
        assert raw.read_replies(3) == [b"OK", b"OK", b"v"]


GARBAGE = {
    "multibulk-length": b"*abc\r\n",
    "bulk-length": b"*1\r\n$abc\r\n",
    "expected-dollar": b"*1\r\nxyz\r\n",
    "negative-bulk": b"*1\r\n$-5\r\n",
    "huge-multibulk": b"*99999999999\r\n",
    "huge-bulk": b"*1\r\n$999999999999\r\n",
    "unbalanced-quotes": b'SET k "abc\r\n',
    "too-big-inline": b"A" * (70 * 1024),
    "too-big-multibulk-line": b"*" + b"1" * (70 * 1024),
    "after-a-valid-command": b"PING\r\n" + encode_command("SET", "g:k", "1") + b"*abc\r\n",
}


@pytest.mark.parametrize("split", [False, True], ids=["one-send", "split"])
@pytest.mark.parametrize("name", list(GARBAGE))
def test_protocol_errors_match_redis(name: str, split: bool, proxy: ProxyProcess,
                                     redis_server: RedisServer) -> None:
    data = GARBAGE[name]
    # Split after the first line: the proxy has seen (and maybe relayed) the start of a command.
    split_at = data.index(b"\n") + 1 if split and b"\n" in data[:-2] else None
    from_redis = exchange_split(redis_server.port, data, split_at)
    from_proxy = exchange_split(proxy.port, data, split_at)
    assert from_redis[1], f"Redis did not close on {name}: {from_redis!r}"
    assert from_proxy == from_redis


def test_protocol_error_text_and_close(proxy: ProxyProcess) -> None:
    with proxy.client() as bystander:
        assert bystander.set("bystander", "1")
        received, closed = exchange_split(proxy.port, b"*abc\r\n")
        assert received == b"-ERR Protocol error: invalid multibulk length\r\n"
        assert closed
        # Only the offending client was closed.
        assert bystander.get("bystander") == b"1"
    assert proxy.is_running()


def test_protocol_error_after_an_admin_command(proxy: ProxyProcess) -> None:
    received, closed = exchange_split(proxy.port, encode_command("key_evt_amqp.keymask_add", "x") + b"*abc\r\n")
    assert received == b"+OK\r\n-ERR Protocol error: invalid multibulk length\r\n"
    assert closed
