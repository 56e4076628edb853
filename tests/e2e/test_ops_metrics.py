"""``--metrics-listen``: ``/metrics`` after a known workload, and ``/readyz`` as Redis and the broker
are cut and restored (each through a :class:`faults.FaultRelay`).

The proxy runs as a process (``python -m proxy serve``), the broker is the shared RabbitMQ with a
private queue, Redis a private redis-server.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import redis

from faults import FaultRelay
from harness import ProxyProcess, RedisServer, free_port, unreachable_amqp_url, wait_for
from rabbit import RabbitQueue

AMQP_PORT = 5672


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value} (comments left out)."""
    status, body = get(port, "/metrics")
    assert status == 200
    values = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def ready(port: int) -> tuple[int, dict[str, object]]:
    status, body = get(port, "/readyz")
    return status, json.loads(body)


@pytest.fixture
def queue() -> Iterator[RabbitQueue]:
    with RabbitQueue() as q:
        yield q


def test_metrics_count_what_the_workload_did(redis_server: RedisServer, queue: RabbitQueue) -> None:
    metrics_port = free_port()
    with FaultRelay(AMQP_PORT) as broker, ProxyProcess(redis_server.url, (
            "--amqp", f"amqp://guest:guest@127.0.0.1:{broker.port}/", "--routing-key", queue.routing_key,
            "--events", "$", "--keymask", "^m:", "--publish-timeout", "1",
            "--metrics-listen", str(metrics_port))) as proxy:
        client = proxy.client()
        wait_for(lambda: ready(metrics_port)[1]["redis"], message="for the subscription")
        for i in range(50):
            client.set(f"m:{i}", "v")
        for i in range(5):
            client.set(f"other:{i}", "v")  # filtered: the mask is ^m:
        wait_for(lambda: scrape(metrics_port)["key_evt_amqp_events_confirmed_total"] == 50,
                 message="for 50 confirms")
        client.execute_command("key_evt_amqp.config_get")
        with pytest.raises(redis.ResponseError):
            client.execute_command("key_evt_amqp.events_set", "Q")
        m = scrape(metrics_port)
        assert m["key_evt_amqp_events_seen_total"] == 55
        assert m["key_evt_amqp_events_filtered_total"] == 5
        assert m["key_evt_amqp_events_accepted_total"] == 50
        assert m["key_evt_amqp_events_published_total"] == 50
        assert m["key_evt_amqp_publish_latency_seconds_count"] == 50
        assert m['key_evt_amqp_publish_latency_seconds_bucket{le="+Inf"}'] == 50
        assert 0 < m["key_evt_amqp_publish_latency_seconds_sum"] < 50 * 5
        assert m['key_evt_amqp_admin_commands_total{command="config_get",result="ok"}'] == 1
        assert m['key_evt_amqp_admin_commands_total{command="events_set",result="error"}'] == 1
        assert m["key_evt_amqp_events_to_fallback_total"] == 0
        assert m['key_evt_amqp_broker_state{state="ready"}'] == 1
        assert m["key_evt_amqp_clients_connected"] == 1
        assert m["key_evt_amqp_client_connections_total"] == 2  # the harness's readiness probe, ours
        assert m["key_evt_amqp_commands_relayed_total"] >= 57  # the SETs, ours, redis-py's handshake
        assert m["key_evt_amqp_client_read_bytes_total"] > 55 * len(b"*3\r\n$3\r\nSET\r\n")
        assert m["key_evt_amqp_client_written_bytes_total"] >= 55 * len(b"+OK\r\n")

        # The broker goes away: the next 10 events go to the fallback list, then are replayed.
        broker.cut()  # the proxy notices when the confirms do not come (--publish-timeout)
        for i in range(50, 60):
            client.set(f"m:{i}", "v")
        wait_for(lambda: scrape(metrics_port)["key_evt_amqp_fallback_length"] == 10, 20,
                 message="for 10 events in the fallback list")
        m = scrape(metrics_port)
        assert m["key_evt_amqp_events_to_fallback_total"] == 10
        assert m['key_evt_amqp_pipeline_mode{state="spilling"}'] == 1
        broker.restore()
        wait_for(lambda: scrape(metrics_port)["key_evt_amqp_events_replayed_total"] == 10, 30,
                 message="for the replay")
        m = scrape(metrics_port)
        assert m["key_evt_amqp_events_confirmed_total"] == 60
        assert m["key_evt_amqp_fallback_length"] == 0
        assert m["key_evt_amqp_amqp_connections_total"] == 2
        assert m['key_evt_amqp_events_dropped_total{reason="fallback_full"}'] == 0
        info = client.execute_command("key_evt_amqp.info").decode()
        assert "events_confirmed:60\r\n" in info and "events_replayed:10\r\n" in info
        client.close()
    assert len(queue.drain(expected=60, idle=0.5)) == 60


def test_readyz_follows_redis_and_the_broker(redis_server: RedisServer) -> None:
    metrics_port = free_port()
    with FaultRelay(redis_server.port) as to_redis, FaultRelay(AMQP_PORT) as broker, ProxyProcess(
            f"redis://127.0.0.1:{to_redis.port}/0", (
                "--amqp", f"amqp://guest:guest@127.0.0.1:{broker.port}/", "--fallback-size", "-1",
                "--publish-timeout", "1",
                "--events", "$", "--keymask", "ALL", "--metrics-listen", f"127.0.0.1:{metrics_port}")):
        # the broker connects at start (--amqp-connect start, the default)
        status, body = wait_for(lambda: (r := ready(metrics_port))[0] == 200 and r[1]["broker_state"] == "ready"
                                and r, message="ready")
        assert body == {"ready": True, "redis": True, "broker": True, "fallback": False,
                        "broker_state": "ready", "source_state": "subscribed"}

        to_redis.cut()  # Redis unreachable: not ready, and the endpoint still answers
        status, body = wait_for(lambda: (r := ready(metrics_port))[0] == 503 and r, 15, message="not ready")
        assert body["redis"] is False and body["ready"] is False
        assert get(metrics_port, "/healthz") == (200, b"ok\n")
        assert scrape(metrics_port)["key_evt_amqp_uptime_seconds"] >= 0
        to_redis.restore()
        wait_for(lambda: ready(metrics_port)[0] == 200, 15, message="ready again after Redis is back")

        # With the fallback off, events can only go to the broker: its loss means not ready.
        with redis.Redis(port=to_redis.port) as direct:
            direct.set("wake", "1")  # the broker connects on the first event
        wait_for(lambda: ready(metrics_port)[1]["broker_state"] == "ready", 15, message="the broker connected")
        broker.cut()
        with redis.Redis(port=to_redis.port) as direct:
            direct.set("wake", "2")  # the proxy notices the cut when this one is not confirmed
        status, body = wait_for(lambda: (r := ready(metrics_port))[0] == 503 and r, 15, message="not ready")
        assert body["broker"] is False and body["redis"] is True
        broker.restore()
        wait_for(lambda: ready(metrics_port)[0] == 200, 20, message="ready again after the broker is back")
        assert get(metrics_port, "/nothing")[0] == 404


def test_metrics_listen_alone_is_off_and_a_bad_value_is_refused(redis_server: RedisServer) -> None:
    with ProxyProcess(redis_server.url, ("--amqp", unreachable_amqp_url())) as proxy:
        assert "metrics on" not in proxy.log_text()
    taken = ProxyProcess(redis_server.url, ("--amqp", unreachable_amqp_url(), "--metrics-listen", "0.0.0.0"))
    with pytest.raises(RuntimeError, match="invalid --metrics-listen '0.0.0.0': expected HOST:PORT"):
        taken.start()
    taken.close()
