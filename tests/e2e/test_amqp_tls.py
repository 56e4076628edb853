"""``amqps://`` end to end: the proxy process through a real TLS handshake (socat terminating TLS
in front of the shared RabbitMQ, certificates made by the test): a CA file, the server name,
mutual TLS, a wrong CA (code 3: the connection never got as far as AMQP), verification off (with
its WARNING), and the TLS parameters of RabbitMQ's URI spec."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import redis

from amqps import SERVER_NAME, Certificates, TlsTerminator
from harness import ErrorReply, ProxyProcess, RawClient, RedisServer, wait_for
from rabbit import RabbitQueue


@pytest.fixture(scope="module")
def certs() -> Iterator[Certificates]:
    made, tmp = Certificates.temporary()
    yield made
    tmp.cleanup()


@pytest.fixture(scope="module")
def tls(certs: Certificates) -> Iterator[TlsTerminator]:
    with TlsTerminator(certs) as terminator:
        yield terminator


@pytest.fixture(scope="module")
def mutual(certs: Certificates) -> Iterator[TlsTerminator]:
    with TlsTerminator(certs, client_ca=certs.ca) as terminator:
        yield terminator


@pytest.fixture
def queue() -> Iterator[RabbitQueue]:
    with RabbitQueue() as q:
        yield q


@pytest.fixture
def rds(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


def proxy_for(server: RedisServer, url: str, *extra: str) -> ProxyProcess:
    return ProxyProcess(server.url, ["--amqp", url, "--events", "$", "--keymask", "ALL", *extra])


def log_line(proxy: ProxyProcess, pattern: str, timeout: float = 10.0) -> str:
    def found() -> str | None:
        return next((line for line in proxy.log_text().splitlines() if re.search(pattern, line)), None)
    return str(wait_for(found, timeout, message=f"for a log line matching {pattern!r}"))


def connect_reply(proxy: ProxyProcess) -> object:
    with RawClient(proxy.port) as client:
        client.command("key_evt_amqp.disconnect")
        return client.command("key_evt_amqp.connect")


def test_ca_file_and_server_name(redis_server: RedisServer, rds: redis.Redis, certs: Certificates,
                                 tls: TlsTerminator, queue: RabbitQueue) -> None:
    # 127.0.0.1 is in the certificate; rabbit.test too, checked when named (the host is an address)
    for extra in ((), ("--amqp-tls-server-name", SERVER_NAME)):
        with proxy_for(redis_server, f"amqps://guest:guest@127.0.0.1:{tls.port}/", "--amqp-tls-ca", str(certs.ca),
                       "--routing-key", queue.routing_key, *extra) as proxy:
            line = log_line(proxy, "amqp: connected to")
            assert f"connected to 127.0.0.1:{tls.port} (RabbitMQ " in line and line.endswith(", TLS)")
            assert f"amqps://guest:***@127.0.0.1:{tls.port}/%2F" in log_line(proxy, "listening on")
            rds.set("over-tls" + str(len(extra)), "v")
            assert [m.body for m in queue.drain_events(1)] == [b"0\nset\nover-tls%d" % len(extra)]
            assert connect_reply(proxy) == b"AMQP CONNECT OK"


def test_mutual_tls(redis_server: RedisServer, rds: redis.Redis, certs: Certificates, mutual: TlsTerminator,
                    queue: RabbitQueue) -> None:
    url = f"amqps://guest:guest@127.0.0.1:{mutual.port}/"
    with proxy_for(redis_server, url, "--amqp-tls-ca", str(certs.ca), "--amqp-tls-cert", str(certs.client_cert),
                   "--amqp-tls-key", str(certs.client_key), "--routing-key", queue.routing_key) as proxy:
        log_line(proxy, "amqp: connected to")
        rds.set("mutual", "v")
        assert [m.body for m in queue.drain(expected=1)] == [b"0\nset\nmutual"]
    # the same terminator refuses a proxy without a client certificate
    with proxy_for(redis_server, url, "--amqp-tls-ca", str(certs.ca)) as proxy:
        line = log_line(proxy, "amqp: cannot connect to RabbitMQ")
        assert f"127.0.0.1:{mutual.port} closed the connection during the AMQP handshake (is a client " \
               "certificate required?)" in line, line
        assert "object at 0x" not in line and "Error(" not in line
        assert connect_reply(proxy) == ErrorReply(b"AMQP CONNECT ERROR: 3")


@pytest.mark.parametrize(("what", "extra", "reason"), [
    ("wrong CA", ("--amqp-tls-ca", "{other_ca}"),
     "the broker's certificate is not trusted: unable to get local issuer certificate"),
    ("wrong name", ("--amqp-tls-ca", "{ca}", "--amqp-tls-server-name", "other.test"),
     "the broker's certificate is not trusted: Hostname mismatch, certificate is not valid for 'other.test'"),
    ("no CA: the system's", (), "the broker's certificate is not trusted: unable to get local issuer certificate"),
])
def test_untrusted_broker_certificate(redis_server: RedisServer, certs: Certificates, tls: TlsTerminator,
                                      what: str, extra: tuple[str, ...], reason: str) -> None:
    """Code 3, as for an unreachable broker: the TLS handshake is part of reaching it, and no AMQP
    was spoken (4 says the broker refused the login, 5 the channel)."""
    extra = tuple(e.format(ca=certs.ca, other_ca=certs.other_ca) for e in extra)
    with proxy_for(redis_server, f"amqps://guest:guest@127.0.0.1:{tls.port}/", *extra) as proxy:
        line = log_line(proxy, "amqp: cannot connect to RabbitMQ")
        assert f"cannot reach 127.0.0.1:{tls.port}: TLS: {reason}" in line, line
        assert "check --amqp-tls-ca and --amqp-tls-server-name" in line
        assert connect_reply(proxy) == ErrorReply(b"AMQP CONNECT ERROR: 3")


def test_verify_off_connects_with_a_warning(redis_server: RedisServer, certs: Certificates,
                                            tls: TlsTerminator) -> None:
    with proxy_for(redis_server, f"amqps://guest:guest@127.0.0.1:{tls.port}/", "--amqp-tls-ca",
                   str(certs.other_ca), "--amqp-tls-verify", "off") as proxy:
        warning = log_line(proxy, "TLS certificate verification is OFF")
        assert " WARNING " in warning
        log_line(proxy, "amqp: connected to")


def test_tls_parameters_in_the_url(redis_server: RedisServer, rds: redis.Redis, certs: Certificates,
                                   mutual: TlsTerminator, queue: RabbitQueue) -> None:
    """RabbitMQ's URI parameters: cacertfile, certfile, keyfile, server_name_indication."""
    url = (f"amqps://guest:guest@127.0.0.1:{mutual.port}/%2F?cacertfile={certs.ca}&certfile={certs.client_cert}"
           f"&keyfile={certs.client_key}&server_name_indication={SERVER_NAME}&verify=verify_peer")
    with proxy_for(redis_server, url, "--routing-key", queue.routing_key) as proxy:
        log_line(proxy, "amqp: connected to")
        rds.set("url-params", "v")
        assert [m.body for m in queue.drain(expected=1)] == [b"0\nset\nurl-params"]
