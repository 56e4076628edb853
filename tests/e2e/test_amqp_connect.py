"""Connecting to RabbitMQ, end to end: the proxy process against the real broker.

The URL forms and secrets (a password file, ``_FILE`` in the environment; ``***`` wherever the
configuration is shown), the connection at start (``connected to ...`` or one WARNING naming the
cause) and what each refusal means for ``key_evt_amqp.connect``: login and vhost 4, missing exchange
5, unreachable 3; an unbound routing key shows at the first event (docs: README "Connecting").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from faults import FaultRelay
from harness import ErrorReply, ProxyProcess, RawClient, RedisServer, free_port, wait_for
from proxy.config import DEFAULT_FALLBACK_KEY
from rabbit import RabbitQueue

SECRET = "guest"  # the shared broker's password, kept in a file by these tests
BROKER = "127.0.0.1:5672"


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


def proxy_for(server: RedisServer, amqp: str, *extra: str, env: dict[str, str] | None = None) -> ProxyProcess:
    """The proxy (start it with ``with``) forwarding SETs of every key to ``amqp``."""
    return ProxyProcess(server.url, ["--amqp", amqp, "--events", "$", "--keymask", "ALL", *extra], env=env)


def log_line(proxy: ProxyProcess, pattern: str, timeout: float = 10.0) -> str:
    """The first line of the proxy's log matching ``pattern`` (a regex), once it is there."""
    def found() -> str | None:
        return next((line for line in proxy.log_text().splitlines() if re.search(pattern, line)), None)
    return str(wait_for(found, timeout, message=f"for a log line matching {pattern!r}"))


def command(port: int, *args: str) -> object:
    with RawClient(port) as client:
        return client.command(*args)


def info(port: int) -> dict[str, str]:
    text = str(command(port, "key_evt_amqp.info"), "utf-8")
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def no_repr(text: str) -> bool:
    return "object at 0x" not in text and "Error:" not in text and "<" not in text


def test_password_file_vhost_and_parameters(tmp_path: Path, redis_server: RedisServer, rds: redis.Redis,
                                            queue: RabbitQueue) -> None:
    secret = tmp_path / "amqp-password"
    secret.write_text(SECRET + "\n")
    url = f"amqp://guest@{BROKER}/%2F?heartbeat=4&connection_timeout=3000&channel_max=8&frame_max=8192"
    with proxy_for(redis_server, url, "--routing-key", queue.routing_key,
                   env={"KEY_EVT_AMQP_AMQP_PASSWORD_FILE": str(secret)}) as proxy:
        shown = f"amqp://guest:***@{BROKER}/%2F?connection_timeout=3000&frame_max=8192"
        assert shown in log_line(proxy, "listening on")
        connected = log_line(proxy, "amqp: connected to")
        assert f"connected to {BROKER} (RabbitMQ " in connected
        assert "vhost '/', exchange 'amq.direct' checked; heartbeat 4s" in connected
        config = dict(zip(*[iter(command(proxy.port, "key_evt_amqp.config_get"))] * 2))
        assert config[b"amqp_password"] == b"***" and config[b"heartbeat"] == b"4"
        assert config[b"amqp_frame_max"] == b"8192"
        fields = info(proxy.port)
        assert (fields["amqp_state"], fields["amqp_node"]) == ("ready", BROKER)
        assert fields["amqp_cluster_name"]
        rds.set("via-file", "v")
        messages = queue.drain(expected=1)
        assert [m.body for m in messages] == [b"0\nset\nvia-file"]
        assert SECRET + "\n" not in proxy.log_text().replace("guest:***", "")


def test_module_connect_forms_still_work(redis_server: RedisServer, rds: redis.Redis, queue: RabbitQueue) -> None:
    """``connect`` with no arguments, with the module's whole list, and after ``disconnect``."""
    with proxy_for(redis_server, f"amqp://guest:guest@{BROKER}/", "--routing-key", queue.routing_key) as proxy:
        log_line(proxy, "amqp: connected to")
        with RawClient(proxy.port) as client:
            assert client.command("key_evt_amqp.connect") == ErrorReply(b"AMQP CONNECT ERROR: 6")
            assert client.command("key_evt_amqp.disconnect") == b"AMQP DISCONNECT OK"
            args = ["127.0.0.1", "5672", "guest", "guest", "7", "amq.direct", queue.routing_key, "2", "1000", "ALL"]
            assert client.command("key_evt_amqp.connect", *args) == b"AMQP CONNECT OK"
            assert info(proxy.port)["amqp_state"] == "ready"
            rds.set("after-connect", "v")
            messages = queue.drain(expected=1)
            assert [(m.body, m.delivery_mode) for m in messages] == [(b"0\nset\nafter-connect", 2)]
            assert client.command("key_evt_amqp.disconnect") == b"AMQP DISCONNECT OK"
            assert client.command("key_evt_amqp.connect") == b"AMQP CONNECT OK"


@pytest.mark.parametrize(
    ("name", "url", "extra", "warning", "code"),
    [
        ("wrong password", f"amqp://guest:wrong-pw@{BROKER}/", (),
         rf"amqp: cannot connect to RabbitMQ: login refused by {BROKER}: ACCESS_REFUSED - Login was refused", 4),
        ("wrong vhost", f"amqp://guest:guest@{BROKER}/kea-no-such-vhost", (),
         rf"amqp: cannot connect to RabbitMQ: vhost 'kea-no-such-vhost' refused by {BROKER}: NOT_ALLOWED - "
         r"vhost kea-no-such-vhost not found", 4),
        ("missing exchange", f"amqp://guest:guest@{BROKER}/", ("--exchange", "kea-no-such-exchange"),
         rf"amqp: cannot connect to RabbitMQ: exchange 'kea-no-such-exchange' does not exist in vhost '/' "
         rf"on {BROKER}$", 5),
        ("broker unreachable", "amqp://guest:guest@127.0.0.1:{port}/", (),
         r"amqp: cannot connect to RabbitMQ: cannot reach 127.0.0.1:\d+: Connection refused$", 3),
    ],
)
def test_refusals_at_start_and_on_connect(redis_server: RedisServer, rds: redis.Redis, name: str, url: str,
                                          extra: tuple[str, ...], warning: str, code: int) -> None:
    with proxy_for(redis_server, url.replace("{port}", str(free_port())), *extra) as proxy:
        line = log_line(proxy, warning)
        assert " WARNING " in line and no_repr(line.split("RabbitMQ: ", 1)[1]), line
        assert command(proxy.port, "key_evt_amqp.connect") == ErrorReply(b"AMQP CONNECT ERROR: %d" % code)
        fields = info(proxy.port)
        assert fields["amqp_state"] in ("backoff", "connecting") and fields["amqp_node"] == ""
        assert re.search(warning.split("RabbitMQ: ", 1)[1].rstrip("$"), fields["last_error"]), fields["last_error"]
        assert no_repr(fields["last_error"].split(": ", 1)[1])
        # one WARNING per cause, however many retries and connects
        assert sum(1 for line in proxy.log_text().splitlines() if re.search(warning, line)) == 1
        # the events wait in the fallback list meanwhile
        rds.set(f"kept-{code}", "v")
        wait_for(lambda: rds.llen(DEFAULT_FALLBACK_KEY) == 1, 10)


def test_a_silent_broker_is_given_up_on_after_the_connect_timeout(redis_server: RedisServer) -> None:
    with FaultRelay(5672) as relay:
        relay.blackhole()  # TCP connects, nothing ever answers
        with proxy_for(redis_server, f"amqp://guest:guest@127.0.0.1:{relay.port}/",
                       "--connect-timeout", "1") as proxy:
            line = log_line(proxy, "amqp: cannot connect to RabbitMQ")
            assert line.endswith(f"no AMQP handshake from 127.0.0.1:{relay.port} within 1.0s"), line
            assert command(proxy.port, "key_evt_amqp.connect") == ErrorReply(b"AMQP CONNECT ERROR: 3")


def test_unbound_routing_key_is_named_at_the_first_event(redis_server: RedisServer, rds: redis.Redis) -> None:
    """Connected and checked at start; nothing bound shows when an event comes back (every event
    is published ``mandatory``); the event waits in the fallback list; ``connect`` works (OK)."""
    key = "kea-nobody-binds-this"
    with proxy_for(redis_server, f"amqp://guest:guest@{BROKER}/", "--routing-key", key) as proxy:
        log_line(proxy, rf"amqp: connected to {BROKER} ")
        rds.set("unroutable", "v")
        line = log_line(proxy, "nothing is bound")
        assert f"amqp: nothing is bound to exchange 'amq.direct' with routing key '{key}' (312 NO_ROUTE)" in line
        assert " WARNING " in line
        wait_for(lambda: rds.llen(DEFAULT_FALLBACK_KEY) == 1, 10)
        with RawClient(proxy.port) as client:
            assert client.command("key_evt_amqp.disconnect") == b"AMQP DISCONNECT OK"
            assert client.command("key_evt_amqp.connect") == b"AMQP CONNECT OK"


def test_lazy_connects_at_the_first_event(redis_server: RedisServer, rds: redis.Redis, queue: RabbitQueue) -> None:
    with proxy_for(redis_server, f"amqp://guest:guest@{BROKER}/", "--amqp-connect", "lazy",
                   "--routing-key", queue.routing_key) as proxy:
        wait_for(lambda: "$" in rds.config_get("notify-keyspace-events")["notify-keyspace-events"])
        assert info(proxy.port)["amqp_state"] == "idle"
        assert "connected to" not in proxy.log_text()
        rds.set("first", "v")
        log_line(proxy, "amqp: connected to")
        assert [m.body for m in queue.drain(expected=1)] == [b"0\nset\nfirst"]
