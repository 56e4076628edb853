"""Unix sockets (issue 12): ``unix:///path`` upstream, ``--listen unix:/path`` for clients.

The upstream Redis listens on a unix socket (and on TCP only for the harness's readiness check);
``CLIENT LIST`` shows that every connection of the proxy came through the socket. The proxy's own
socket gets ``--listen-perm``, replaces a stale socket file, refuses a live one, and is removed at
shutdown.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harness import REPO_ROOT, ProxyProcess, RedisServer, unreachable_amqp_url, wait_for


def info(client: redis.Redis) -> dict[str, str]:
    text = client.execute_command("key_evt_amqp.info").decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # short: a unix socket path holds at most 107 bytes (pytest's tmp_path can be longer)
    with tempfile.TemporaryDirectory(prefix="kea-unix-", dir="/tmp") as name:
        yield Path(name)


def test_unix_socket_on_both_sides(sock_dir: Path) -> None:
    redis_sock = sock_dir / "redis.sock"
    proxy_sock = sock_dir / "proxy.sock"
    with RedisServer(["--unixsocket", str(redis_sock), "--unixsocketperm", "700"]) as rs:
        args = ["--listen", f"unix:{proxy_sock}", "--listen-perm", "640", "--amqp", unreachable_amqp_url(),
                "--keymask", "ALL", "--events", "$"]
        with ProxyProcess(f"unix://{redis_sock}?db=1", args) as proxy:
            assert stat.S_IMODE(os.stat(proxy_sock).st_mode) == 0o640
            with redis.Redis(unix_socket_path=str(proxy_sock), socket_timeout=10) as client:
                assert client.set("k", "v") and client.get("k") == b"v"
                wait_for(lambda: info(client)["source_state"] == "subscribed", 15)
                client.set("event", "1")  # no broker: the events (k, event) wait in the fallback list
                wait_for(lambda: info(client)["fallback_length"] == "2", 15)
                with rs.client(db=1) as direct:  # the list is in the URL's db (a client starts in 0)
                    assert direct.llen(info(client)["fallback_key"]) == 2
                    clients = direct.client_list()
            with pytest.raises(OSError):  # a TCP client finds nobody: --listen unix: replaces TCP
                socket.create_connection((proxy.host, proxy.port), timeout=1).close()
            assert proxy.stop() == 0
            log = proxy.log_text()
        assert not proxy_sock.exists()  # removed at shutdown
    proxys = [c["addr"] for c in clients if c["cmd"] != "client|list"]  # all but the test's own
    assert len(proxys) >= 3, clients  # the relay, the subscriber, the fallback link
    assert all(a.startswith(str(redis_sock)) for a in proxys), proxys
    assert "listening on unix:" + str(proxy_sock) in log


def test_stale_and_live_socket_files(sock_dir: Path) -> None:
    path = sock_dir / "proxy.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening, then gone: what a crash leaves behind
    stale.close()
    assert path.exists()
    with RedisServer() as rs:
        args = ["--listen", f"unix:{path}", "--amqp", unreachable_amqp_url()]
        with ProxyProcess(rs.url, args) as proxy:
            with redis.Redis(unix_socket_path=str(path), socket_timeout=10) as client:
                assert client.ping() is True
            # a second proxy on the same path must not take the socket from the first
            second = subprocess.run([sys.executable, "-m", "proxy", "serve", "--upstream", rs.url, *args],
                                    cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
            assert second.returncode == 1
            assert second.stderr.strip() == (f"key-evt-amqp: cannot listen on unix:{path}: "
                                             "another process accepts connections on this socket")
            with redis.Redis(unix_socket_path=str(path), socket_timeout=10) as client:
                assert client.ping() is True
    regular = sock_dir / "file"
    regular.write_text("data")
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--listen", f"unix:{regular}",
                             "--upstream", "redis://127.0.0.1:1"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1 and "the path exists and is not a socket" in result.stderr
    assert regular.read_text() == "data"
