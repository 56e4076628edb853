"""Regression tests for the adversarial review of the relay (issue #8): each test is one of its
reproductions, run against the proxy and, where a byte comparison makes sense, against Redis itself.

The differential fuzzer (test_fuzz_differential.py) covers the same ground at random; these are the
exact cases the review found, so that each stays fixed by name.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import redis

from harness import ProxyProcess, RedisServer, encode_command, exchange, unreachable_amqp_url, wait_for

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[RedisServer, RedisServer, ProxyProcess]]:
    """A Redis to compare with, and the proxy in front of another one."""
    with RedisServer() as direct, RedisServer() as behind, \
            ProxyProcess(behind.url, ("--amqp", unreachable_amqp_url())) as proxy:
        yield direct, behind, proxy
        assert proxy.is_running(), proxy.log_text()[-3000:]


def same_as_redis(pair: tuple[RedisServer, RedisServer, ProxyProcess], chunks: list[bytes], **kw: object) -> bytes:
    direct, _, proxy = pair
    expected = exchange(direct.port, chunks, **kw)  # type: ignore[arg-type]
    got = exchange(proxy.port, chunks, **kw)  # type: ignore[arg-type]
    assert got == expected
    return expected[0]


# -- 1. declared counts never allocate -------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"*2147483648\r\n", b"*4294967295\r\n$3\r\nGET\r\n", b"*3000000000\r\n", b"*2147483648\r\n$3\r\nGET\r\n",
    b"*1\r\n$536870913\r\n",
])
def test_huge_declared_counts_get_redis_error_and_close(pair, data: bytes) -> None:  # type: ignore[no-untyped-def]
    reply = same_as_redis(pair, [data])
    assert reply.startswith(b"-ERR Protocol error: invalid")


def _vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def test_a_declared_count_does_not_stall_or_grow_the_proxy(pair) -> None:  # type: ignore[no-untyped-def]
    # The review: hiredis preallocated a 2**31-entry list (VmSize +16 GB) and freeing it stopped
    # the event loop for ~8 s, once the garbage collector got to it.
    _, _, proxy = pair
    before = _vm_size(proxy.pid)
    socks = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(3)]
    for sock in socks:
        sock.sendall(b"*2147483647\r\n$3\r\nGET\r\n")
    time.sleep(0.3)
    grown = _vm_size(proxy.pid) - before
    for sock in socks:
        sock.close()
    assert grown < 256 * MIB, f"VmSize grew {grown / MIB:.0f} MiB"
    for _ in range(1000):  # enough new connections for the garbage collector to run
        socket.create_connection(("127.0.0.1", proxy.port)).close()
    with proxy.client() as client:
        began = time.monotonic()
        assert client.ping()
        assert time.monotonic() - began < 0.5


# -- 2. the buffer limit holds from the first byte --------------------------------------------------


def test_a_flood_sent_with_the_connect_is_not_read_without_limit() -> None:
    limit = 1 * MIB
    with RedisServer() as server, ProxyProcess(
        server.url, ("--amqp", unreachable_amqp_url(), "--client-buffer-limit", str(limit))
    ) as proxy:
        before = proxy.rss_bytes()
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        sock.setblocking(False)
        head = encode_command("BLPOP", "never", "0") + encode_command("key_evt_amqp.info")
        flood = encode_command("SET", "k", "v") * 50_000
        sent, deadline = 0, time.monotonic() + 3
        sock.send(head)
        while time.monotonic() < deadline:
            try:
                sent += sock.send(flood)
            except BlockingIOError:
                time.sleep(0.01)
        grown = proxy.rss_bytes() - before
        sock.close()
        # What the client could push is what the kernel buffers hold plus our limit, not 392 MiB.
        assert grown < 4 * limit + 16 * MIB, f"RSS grew {grown / MIB:.0f} MiB for {sent / MIB:.0f} MiB sent"


# -- 3. a big value is streamed, and memory goes with the client ------------------------------------


def test_a_big_value_is_streamed_through_not_held(pair) -> None:  # type: ignore[no-untyped-def]
    _, behind, proxy = pair
    before = proxy.rss_bytes()
    value = b"v" * MIB
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n" % (64 * MIB))
        for _ in range(64):
            sock.sendall(value)
            assert proxy.rss_bytes() - before < 32 * MIB
        sock.sendall(b"\r\n")
        sock.settimeout(10)
        assert sock.recv(16) == b"+OK\r\n"
    assert behind.client().strlen("big") == 64 * MIB
    behind.client().delete("big")
    # A client that leaves halfway frees what it held at once (no cycle waiting for the GC).
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n" % (512 * MIB))
        for _ in range(32):
            sock.sendall(value)
    wait_for(lambda: proxy.rss_bytes() - before < 32 * MIB, timeout=5, message="for memory to come back")


# -- 4. every reply Redis sent before it closed reaches the client ----------------------------------


def test_replies_before_quit_all_arrive(pair) -> None:  # type: ignore[no-untyped-def]
    for _ in range(20):
        assert same_as_redis(pair, [b"SET qk 1\r\nQUIT\r\nPING\r\nPING\r\nPING\r\n"]) == b"+OK\r\n+OK\r\n"
    multibulk = encode_command("SET", "qk", "1") + encode_command("QUIT") + encode_command("PING") * 3
    for _ in range(20):
        assert same_as_redis(pair, [multibulk]) == b"+OK\r\n+OK\r\n"


def test_replies_before_a_protocol_error_all_arrive(pair) -> None:  # type: ignore[no-untyped-def]
    data = encode_command("INCR", "pe") * 3 + b"*2\r\n$4\r\nINCR\r\n+$6\r\nxxxxxx\r\n" + encode_command("PING")
    for _ in range(15):
        direct, behind, _ = pair
        direct.client().delete("pe")
        behind.client().delete("pe")
        reply = same_as_redis(pair, [data])
        assert reply.endswith(b"-ERR Protocol error: expected '$', got '+'\r\n")


# -- 5. protocol errors are Redis's own bytes -------------------------------------------------------


@pytest.mark.parametrize("byte", [0x80, 0xAE, 0xC3, 0xFF])
def test_protocol_error_text_is_redis_bytes(pair, byte: int) -> None:  # type: ignore[no-untyped-def]
    reply = same_as_redis(pair, [b"*1\r\n" + bytes([byte]) + b"4\r\nPING\r\n"])
    assert reply == b"-ERR Protocol error: expected '$', got '" + bytes([byte]) + b"'\r\n"


# -- 6. when Redis closes a client, the client sees that close, nothing of ours ----------------------


def _after_client_kill(server: RedisServer, client: redis.Redis) -> object:
    """What a redis-py client sees on its next command after Redis killed its connection."""
    client.set("ck", "1")
    with server.client() as admin:
        assert admin.client_kill_filter(skipme=True, _type="normal") >= 1
    time.sleep(0.2)  # the close takes one hop more through the proxy
    try:
        return client.get("ck")
    except redis.RedisError as exc:
        return type(exc)


def test_client_kill_looks_the_same_to_a_client() -> None:
    with RedisServer() as direct, RedisServer() as behind, \
            ProxyProcess(behind.url, ("--amqp", unreachable_amqp_url())) as proxy:
        expected = _after_client_kill(direct, direct.client(retry=None))
        assert _after_client_kill(behind, proxy.client()) == expected  # b"1": the pool reconnected
        # Raw: the killed connection sees only its close, exactly as straight at Redis.
        for server, port in ((direct, direct.port), (behind, proxy.port)):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(encode_command("CLIENT", "SETNAME", "victim"))
                sock.settimeout(5)
                assert sock.recv(16) == b"+OK\r\n"
                with server.client() as admin:
                    admin.client_kill_filter(skipme=True, _type="normal")
                assert sock.recv(16) == b""


def test_redis_timeout_closes_the_client_like_redis(pair) -> None:  # type: ignore[no-untyped-def]
    direct, behind, _ = pair
    for server in (direct, behind):
        server.client().config_set("timeout", "1")
    try:
        assert same_as_redis(pair, [b"PING\r\n"], idle=3) == b"+PONG\r\n"
    finally:
        for server in (direct, behind):
            server.client().config_set("timeout", "0")


def test_unauthenticated_limits_are_redis_own() -> None:
    with RedisServer(("--requirepass", "pw")) as direct, RedisServer(("--requirepass", "pw")) as behind, \
            ProxyProcess(behind.url, ("--amqp", unreachable_amqp_url())) as proxy:
        # A header alone waits for the command's name (README, limits): real clients send both.
        cases = [b"*11\r\n$3\r\nSET\r\n", b"*1\r\n$16385\r\n", b"*2\r\n$4\r\nECHO\r\n$16385\r\n",
                 encode_command(*["MSET"] + ["k", "v"] * 6)]
        for data in cases:
            assert exchange(proxy.port, [data]) == exchange(direct.port, [data])


# -- 8. inline requests ---------------------------------------------------------------------------


def test_a_long_inline_line_that_arrives_whole_is_answered(pair) -> None:  # type: ignore[no-untyped-def]
    reply = same_as_redis(pair, [b"ECHO " + b"a" * 70_000 + b"\r\n"], idle=1.0)
    assert reply == b"$70000\r\n" + b"a" * 70_000 + b"\r\n"


def test_many_inline_commands_are_answered_promptly(pair) -> None:  # type: ignore[no-untyped-def]
    _, _, proxy = pair
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        began = time.monotonic()
        sock.sendall(b"PING\r\n" * 100_000)
        sock.settimeout(10)
        first = sock.recv(7)
        took = time.monotonic() - began
        received = len(first)
        while received < 7 * 100_000:
            received += len(sock.recv(1 << 20))
    assert first == b"+PONG\r\n"
    print(f"100,000 inline PINGs: first reply after {took * 1000:.0f} ms")
    assert took < 0.5


# -- 12. a half-closed client gets its replies ------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"PING\r\n", b"SET hk 1\r\nGET hk\r\n", encode_command("SET", "hk", "2") + encode_command("GET", "hk"),
    encode_command("key_evt_amqp.config_get") + encode_command("PING"),
])
def test_half_close_still_gets_every_reply(pair, data: bytes) -> None:  # type: ignore[no-untyped-def]
    direct, _, proxy = pair
    got, closed = exchange(proxy.port, [data], half_close=True, idle=3)
    assert closed
    if b"key_evt_amqp" in data:
        assert got.endswith(b"+PONG\r\n") and got.startswith(b"*")
    else:
        assert (got, closed) == exchange(direct.port, [data], half_close=True, idle=3)


def test_half_close_behind_a_blocked_command_closes(pair) -> None:  # type: ignore[no-untyped-def]
    _, behind, proxy = pair
    data = encode_command("BLPOP", "never", "0") + encode_command("key_evt_amqp.info")
    got, closed = exchange(proxy.port, [data], half_close=True, idle=5)
    assert (got, closed) == (b"", True)
    wait_for(lambda: behind.client().info("clients")["blocked_clients"] == 0, timeout=5)


# -- 14. the markers leave no error in Redis's statistics --------------------------------------------


def _errors_made(server: RedisServer, port: int, action) -> int:  # type: ignore[no-untyped-def]
    with server.client() as admin:
        before = admin.info("stats")["total_error_replies"]
        action(port)
        return admin.info("stats")["total_error_replies"] - before


def _resp3_ping(port: int) -> None:
    with redis.Redis(port=port, protocol=3) as client:
        assert client.ping()


def _config_get(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(encode_command("key_evt_amqp.config_get") + encode_command("PING"))
        reply = b""
        while not reply.endswith(b"+PONG\r\n"):
            reply += sock.recv(65536)


def test_markers_leave_no_error_in_redis_statistics(pair) -> None:  # type: ignore[no-untyped-def]
    direct, behind, proxy = pair
    # HELLO 3 through the proxy: exactly the errors the same client makes straight at Redis (redis-py's
    # CLIENT SETINFO, which 7.0 does not know), none of the proxy's own.
    assert _errors_made(behind, proxy.port, _resp3_ping) == _errors_made(direct, direct.port, _resp3_ping)
    # Each of our commands: one, the authority probe's "Unknown option" (README, admin commands).
    assert _errors_made(behind, proxy.port, _config_get) == 1


def test_a_refused_echo_does_not_stall_the_barrier() -> None:
    with RedisServer(("--requirepass", "pw")) as server, ProxyProcess(server.url, ("--amqp", unreachable_amqp_url())) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            # Unauthenticated: HELLO 3 and ECHO are both refused; our command is refused too.
            sock.sendall(encode_command("HELLO", "3") + encode_command("key_evt_amqp.info") + encode_command("AUTH", "pw")
                         + encode_command("PING"))
            reply = b""
            while not reply.endswith(b"+PONG\r\n"):
                chunk = sock.recv(65536)
                assert chunk, reply
                reply += chunk
        assert reply.startswith(b"-NOAUTH HELLO must be called with the client already authenticated")
        assert reply.endswith(b"\r\n-NOAUTH Authentication required.\r\n+OK\r\n+PONG\r\n"), reply
        with server.client() as admin:
            admin.acl_setuser("noecho", enabled=True, passwords=["+pw2"], commands=["+@all", "-echo"], keys=["*"])
        with proxy.client(username="noecho", password="pw2") as client:
            assert client.execute_command("key_evt_amqp.config_get")
            assert client.ping()


# -- 10. one log line per interval while Redis is down ------------------------------------------------


def test_unreachable_redis_is_logged_once_per_interval() -> None:
    with RedisServer() as server, ProxyProcess(server.url, ("--amqp", unreachable_amqp_url())) as proxy:
        server.stop()
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
                    sock.sendall(b"PING\r\n")
                    sock.settimeout(2)
                    assert sock.recv(64) == b""  # closed, as a refused connection would be
            except ConnectionResetError:
                pass
        lines = [line for line in proxy.log_text().splitlines() if "cannot reach Redis" in line]
        assert 1 <= len(lines) <= 2, lines


def test_unknown_command_of_ours_echoes_raw_bytes_like_redis(pair) -> None:  # type: ignore[no-untyped-def]
    data = encode_command(b"key_evt_amqp.nosuch\xff", b"a\xfe\xc3") + encode_command("PING")
    direct, _, proxy = pair
    got, _ = exchange(proxy.port, [data])
    expected, _ = exchange(direct.port, [data])
    assert got == expected and b"\xff" in got


def test_an_inline_line_redis_accepts_whole_is_forwarded_whole(pair) -> None:  # type: ignore[no-untyped-def]
    # Fuzz seed 11 case 1570: Redis read a 147 KB line at once and answered it; the proxy's read
    # boundary cut it and its parser refused it at 64 KiB.
    line = b"ECHO " + b"a" * 150_000 + b"\r\n"
    reply = same_as_redis(pair, [line + b"PING\r\n"], idle=1.0)
    assert reply in (b"$150000\r\n" + b"a" * 150_000 + b"\r\n+PONG\r\n", b"-ERR Protocol error: too big inline request\r\n")


def test_an_inline_command_of_ours_over_the_limit_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    _, _, proxy = pair
    got = exchange(proxy.port, [b"key_evt_amqp.keymask_add " + b"m" * 70_000 + b"\r\n"], idle=1.0)
    assert got == (b"-ERR Protocol error: key_evt_amqp command too long\r\n", True)


def test_sigterm_after_a_client_half_closed_exits_cleanly() -> None:
    # A client that ended its input just before the shutdown: no drain barrier is written to a
    # Redis connection whose write side is closed (uvloop raised, and the exit code was 1).
    with RedisServer() as server, ProxyProcess(server.url, ("--amqp", unreachable_amqp_url())) as proxy:
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        sock.sendall(encode_command("BLPOP", "never", "0"))
        wait_for(lambda: server.client().info("clients")["blocked_clients"] == 1, timeout=5)
        sock.shutdown(socket.SHUT_WR)
        assert proxy.stop() == 0, proxy.log_text()[-3000:]
        sock.close()
