"""TLS to Redis (issue 12): every connection the proxy opens to a ``rediss://`` upstream speaks TLS.

The Redis here listens with TLS only (``--port 0 --tls-port``), with certificates the test makes,
and requires a client certificate (mutual TLS) unless said otherwise. Commands (client relays),
events (the subscription), the fallback list and cluster nodes all reach it through TLS: a plain
connection would not get a single byte through. A bad TLS setting stops the start with one line.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harness import (HOST, REPO_ROOT, ProxyProcess, RedisServer, encode_command, exchange, free_port,
                     unreachable_amqp_url, wait_for)
from rabbit import RabbitQueue
from tls import Certificates, TlsRedisServer


def info(client: redis.Redis) -> dict[str, str]:
    text = client.execute_command("key_evt_amqp.info").decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_redis(certs: Certificates) -> Iterator[TlsRedisServer]:
    with TlsRedisServer(certs) as server:
        yield server


def failed_start(args: list[str]) -> tuple[int, str]:
    """Run ``serve`` with ``args`` until it exits (it must, at start): exit code and stderr."""
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--listen", f"{HOST}:{free_port()}",
                             "--amqp", unreachable_amqp_url(), *args],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    return result.returncode, result.stderr


def test_commands_events_and_fallback_through_mutual_tls(certs: Certificates, tls_redis: TlsRedisServer) -> None:
    with RabbitQueue() as queue, ProxyProcess(tls_redis.url, [
            *certs.proxy_args(), "--amqp", "amqp://guest:guest@127.0.0.1:5672/",
            "--routing-key", queue.routing_key, "--events", "$", "--keymask", "^tls:"]) as proxy, \
            proxy.client() as client:
        wait_for(lambda: info(client)["source_state"] == "subscribed", 15)
        # commands: small, pipelined, and large enough to pause and resume both sides
        assert client.set("tls:a", "1") and client.get("tls:a") == b"1"
        pipe = client.pipeline(transaction=False)
        for i in range(2000):
            pipe.incr("counter")
        assert pipe.execute()[-1] == 2000
        big = b"x" * (8 * 1024 * 1024)
        client.set("big", big)
        assert client.get("big") == big
        # events: the subscription is a TLS connection too
        client.set("tls:event", "v")
        messages = queue.drain(expected=2, timeout=20)  # tls:a and tls:event (the rest is outside the mask)
        assert sorted(m.body.split(b"\n", 2)[2] for m in messages) == [b"tls:a", b"tls:event"]
        # the fallback list, on its own TLS connection: events wait there while disconnected
        assert client.execute_command("key_evt_amqp.disconnect") == b"AMQP DISCONNECT OK"
        for i in range(3):
            client.set(f"tls:held{i}", "v")
        wait_for(lambda: info(client)["fallback_length"] == "3", 15)
        with tls_redis.client() as direct:
            assert direct.llen(info(client)["fallback_key"]) == 3
        assert client.execute_command("key_evt_amqp.connect") == b"AMQP CONNECT OK"
        replayed = queue.drain(expected=3, timeout=20)
        assert sorted(m.body.split(b"\n", 2)[2] for m in replayed) == [b"tls:held0", b"tls:held1", b"tls:held2"]
        with tls_redis.client() as direct:
            clients = direct.client_list()
        assert len(clients) >= 3  # our client's relay, the subscriber, the fallback link (+ this one)
        assert proxy.is_running()
    assert "certificate" not in proxy.log_text().lower()


def test_a_wrong_ca_stops_the_start(certs: Certificates, tls_redis: TlsRedisServer) -> None:
    code, err = failed_start(["--upstream", tls_redis.url, "--upstream-tls-ca", str(certs.wrong_ca),
                              "--upstream-tls-cert", str(certs.client_cert), "--upstream-tls-key", str(certs.client_key)])
    assert code == 1, err
    line = err.strip()
    assert line.startswith(f"key-evt-amqp: cannot connect to Redis at rediss://{HOST}:{tls_redis.port}/0: "
                           "TLS: certificate verify failed: ")
    assert "\n" not in line and "Traceback" not in line and "_ssl.c" not in line


def test_a_missing_client_certificate_stops_the_start(certs: Certificates, tls_redis: TlsRedisServer) -> None:
    code, err = failed_start(["--upstream", tls_redis.url, *certs.proxy_args(with_cert=False)])
    assert code == 1, err
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"key-evt-amqp: cannot connect to Redis at rediss://{HOST}:{tls_redis.port}/0: TLS: ")
    assert "certificate required" in line or "client certificate" in line, line


def test_plain_redis_url_against_tls_redis_and_tls_against_plain(certs: Certificates) -> None:
    """A plain Redis does not answer a TLS handshake (it waits for the end of an inline command),
    and a TLS Redis closes a plain connection: either way nobody answers, which is not a
    configuration error (a Redis starting up looks the same): a WARNING that says so, the proxy
    runs, its clients are closed."""
    with TlsRedisServer(certs) as tls_only:
        with ProxyProcess(f"redis://{HOST}:{tls_only.port}/", ["--amqp", unreachable_amqp_url()]) as proxy:
            wait_for(lambda: "does not answer now" in proxy.log_text(), 10)
    with RedisServer() as plain:
        args = ["--upstream-tls-ca", str(certs.ca), "--connect-timeout", "1", "--amqp", unreachable_amqp_url()]
        with ProxyProcess(f"rediss://{HOST}:{plain.port}/", args) as proxy:
            wait_for(lambda: "TLS handshake unanswered: is it a TLS port?" in proxy.log_text(), 10)
            with proxy.client() as client, pytest.raises(redis.ConnectionError):
                client.ping()


def test_server_name_and_insecure(certs: Certificates) -> None:
    with TlsRedisServer(certs, named_only=True) as named:
        code, err = failed_start(["--upstream", named.url, *certs.proxy_args()])
        assert code == 1 and "certificate verify failed: IP address mismatch" in err, err
        with ProxyProcess(named.url, [*certs.proxy_args(), "--upstream-tls-server-name", "redis.test",
                                      "--amqp", unreachable_amqp_url()]) as proxy, proxy.client() as client:
            assert client.ping() is True
        insecure = ["--upstream-tls-insecure", "--upstream-tls-cert", str(certs.client_cert),
                    "--upstream-tls-key", str(certs.client_key), "--amqp", unreachable_amqp_url()]
        with ProxyProcess(named.url, insecure) as proxy, proxy.client() as client:
            assert client.set("k", "v") and client.get("k") == b"v"
            log = proxy.log_text()
        assert "WARNING" in log and "WITHOUT certificate verification" in log


def cluster_create(certs: Certificates, nodes: list[TlsRedisServer]) -> None:
    result = subprocess.run(["redis-cli", *certs.redis_cli_args(), "--cluster", "create",
                             *[f"{HOST}:{n.port}" for n in nodes], "--cluster-replicas", "0", "--cluster-yes"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

    def ok() -> bool:
        for node in nodes:
            with node.client(socket_timeout=2) as c:
                if b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
                    return False
        return True
    wait_for(ok, 30)


def test_cluster_over_tls(certs: Certificates) -> None:
    """Three TLS-only masters (``tls-cluster yes``): the proxy's topology queries, each client's
    node links and the per-master event sources all speak TLS."""
    from cluster import cluster_port
    taken: set[int] = set()
    nodes = [TlsRedisServer(certs, ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                    "--tls-cluster", "yes", "--cluster-node-timeout", "2000"],
                            port=cluster_port(taken)) for _ in range(3)]
    try:
        for node in nodes:
            node.start()
        cluster_create(certs, nodes)
        with RabbitQueue() as queue, ProxyProcess(nodes[0].url, [
                *certs.proxy_args(), "--amqp", "amqp://guest:guest@127.0.0.1:5672/",
                "--routing-key", queue.routing_key, "--events", "$", "--keymask", "ALL"]) as proxy, \
                proxy.client() as client:
            wait_for(lambda: info(client).get("cluster_sources_subscribed") == "3", 20)
            keys = [f"k{i}" for i in range(30)]  # spread over the three masters
            for key in keys:
                assert client.set(key, key)
            assert [client.get(k) for k in keys] == [k.encode() for k in keys]
            messages = queue.drain(expected=len(keys), timeout=20)
            assert sorted(m.body.split(b"\n", 2)[2] for m in messages) == sorted(k.encode() for k in keys)
    finally:
        for node in nodes:
            node.close()



# -- TLS for clients: the proxy's listener ------------------------------------------------------------


def tls_client(proxy: ProxyProcess, certs: Certificates, with_cert: bool = False, **kw: object) -> redis.Redis:
    options: dict[str, object] = {"ssl": True, "ssl_ca_certs": str(certs.ca)}
    if with_cert:
        options.update(ssl_certfile=str(certs.client_cert), ssl_keyfile=str(certs.client_key))
    options.update(kw)
    return proxy.client(**options)


def listener_args(certs: Certificates, client_ca: Path | None = None) -> list[str]:
    args = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--amqp", unreachable_amqp_url()]
    return args + (["--tls-ca", str(client_ca)] if client_ca else [])


def test_clients_speak_tls_to_the_proxy(certs: Certificates) -> None:
    """redis-py with ``ssl=True`` and ``redis-cli --tls`` work; a plain client and a failed handshake
    close only that connection."""
    with RedisServer() as rs, ProxyProcess(rs.url, listener_args(certs)) as proxy:
        with tls_client(proxy, certs) as client:
            assert client.set("k", "v") and client.get("k") == b"v"
            big = os.urandom(4 * 1024 * 1024)
            assert client.set("big", big) and client.get("big") == big
            pipe = client.pipeline(transaction=False)
            for _ in range(3000):
                pipe.incr("n")
            assert pipe.execute()[-1] == 3000
            # a plain client on the TLS port: its bytes are no handshake, it is closed, unanswered
            data, closed = exchange(proxy.port, [b"PING\r\n"], idle=5)
            assert closed and data == b""
            # a client that does not trust the proxy's certificate gives up in the handshake
            with pytest.raises(redis.ConnectionError):
                tls_client(proxy, certs, ssl_ca_certs=str(certs.wrong_ca)).ping()
            assert client.get("k") == b"v"  # the first client is still served
        cli = subprocess.run(["redis-cli", "--tls", "--cacert", str(certs.ca), "-h", HOST, "-p", str(proxy.port),
                              "GET", "k"], capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0 and cli.stdout.strip() == "v", cli
        assert proxy.is_running()
        log = proxy.log_text()
    assert f"listening on {HOST}:{proxy.port} (TLS)" in log
    assert "Traceback" not in log and "handshake" not in log.lower()


def test_client_certificates_required(certs: Certificates) -> None:
    with RedisServer() as rs, ProxyProcess(rs.url, listener_args(certs, client_ca=certs.ca)) as proxy:
        with tls_client(proxy, certs, with_cert=True) as client:
            assert client.ping() is True
            with pytest.raises(redis.ConnectionError):
                tls_client(proxy, certs).ping()  # no certificate
            assert client.set("still", "served")
        other = Certificates(Path(proxy.log_path).parent / "other")  # a certificate of another CA
        with pytest.raises(redis.ConnectionError):
            tls_client(proxy, certs, ssl_certfile=str(other.client_cert), ssl_keyfile=str(other.client_key)).ping()
        cli = subprocess.run(["redis-cli", *certs.redis_cli_args(), "-h", HOST, "-p", str(proxy.port), "PING"],
                             capture_output=True, text=True, timeout=30)
        assert cli.stdout.strip() == "PONG", cli
        assert proxy.is_running()
        assert "listening on" in proxy.log_text() and "client certificates required" in proxy.log_text()


def test_flow_control_with_tls_on_both_sides(certs: Certificates, tls_redis: TlsRedisServer) -> None:
    """A TLS client that sends 100 GETs of a 1 MiB value and reads nothing: the proxy stops reading
    Redis (pause/resume through both TLS transports), its memory stays bounded, and every reply
    arrives whole once the client reads."""
    value = b"v" * (1024 * 1024)
    with tls_redis.client() as direct:
        direct.set("one-mib", value)
    args = [*certs.proxy_args(), *listener_args(certs)]
    with ProxyProcess(tls_redis.url, args) as proxy:
        with tls_client(proxy, certs) as client:
            assert client.ping()
        start_rss = proxy.rss_bytes()
        context = certs.client_context(with_cert=False)
        with socket.create_connection((HOST, proxy.port), timeout=30) as raw, \
                context.wrap_socket(raw, server_hostname=HOST) as sock:
            count = 100
            sock.sendall(encode_command("GET", "one-mib") * count)
            time.sleep(2)
            grown = proxy.rss_bytes() - start_rss
            expected = count * (len(value) + len(b"$1048576\r\n\r\n"))
            received = 0
            while received < expected:
                chunk = sock.recv(1 << 20)
                assert chunk, "closed early"
                received += len(chunk)
        assert received == expected
    print(f"\nRSS grew by {grown / 1e6:.1f} MB for {expected / 1e6:.0f} MB of unread replies")
    assert grown < 60 * 1024 * 1024, f"the proxy grew by {grown / 1e6:.0f} MB while the client read nothing"
