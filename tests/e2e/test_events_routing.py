"""Routing by event and the JSON format, end to end: a real Redis, the proxy process, RabbitMQ.

Queues are bound to ``amq.topic`` with patterns under a unique prefix per test; a catch-all
(``<prefix>.#``) is always bound too, since messages are mandatory: an event no queue takes waits
in the fallback list (README: Routing by event).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from faults import FaultRelay
from harness import ProxyProcess, RawClient, RedisServer, wait_for
from proxy.config import DEFAULT_FALLBACK_KEY
from rabbit import Message, RabbitQueue

AMQP_PORT = 5672
TOPIC = "amq.topic"


@pytest.fixture
def prefix() -> str:
    return f"kea-{uuid.uuid4().hex[:10]}"


def args(amqp_port: int, *extra: str) -> list[str]:
    return ["--amqp", f"amqp://guest:guest@127.0.0.1:{amqp_port}/", "--exchange", TOPIC,
            "--events", "$gx", "--keymask", "ALL", "--heartbeat", "2", *extra]


def queues(stack: ExitStack, *bindings: str) -> list[RabbitQueue]:
    return [stack.enter_context(RabbitQueue(exchange=TOPIC, binding=b)) for b in bindings]


def notify_ready(client: object) -> None:
    wait_for(lambda: "x" in client.config_get("notify-keyspace-events")["notify-keyspace-events"])  # type: ignore[attr-defined]


def bodies(messages: list[Message]) -> list[bytes]:
    return [m.body for m in messages]


def test_topic_exchange_with_bindings_per_event(prefix: str) -> None:
    with ExitStack() as stack:
        expired, sets, everything = queues(stack, f"{prefix}.*.expired", f"{prefix}.*.set", f"{prefix}.#")
        rs = stack.enter_context(RedisServer())
        client = rs.client()
        stack.enter_context(ProxyProcess(rs.url, args(AMQP_PORT, "--routing-key", prefix + ".{db}.{event}")))
        notify_ready(client)
        client.set("a", "1")
        client.set("b.c", "1", px=50)
        client.delete("a")
        wait_for(lambda: expired.count() == 1, 10)  # Redis's active expiry removes b.c
        got_expired = expired.drain(expected=1)
        got_sets = sets.drain(expected=2)
        got_all = everything.drain(expected=5)
    assert bodies(got_expired) == [b"0\nexpired\nb.c"]
    assert [m.routing_key for m in got_expired] == [f"{prefix}.0.expired"]
    assert bodies(got_sets) == [b"0\nset\na", b"0\nset\nb.c"]
    assert sorted(m.routing_key for m in got_all) == sorted(
        [f"{prefix}.0.set", f"{prefix}.0.set", f"{prefix}.0.expire", f"{prefix}.0.del", f"{prefix}.0.expired"])
    assert all(m.content_type == "text/plain" for m in got_all)  # the module's body, byte for byte


def test_routes_add_list_clean_first_match(prefix: str) -> None:
    with ExitStack() as stack:
        users, admins, rest = queues(stack, f"{prefix}.users.*", f"{prefix}.admins", f"{prefix}.rest.#")
        rs = stack.enter_context(RedisServer())
        client = rs.client()
        proxy = stack.enter_context(ProxyProcess(rs.url, args(
            AMQP_PORT, "--routing-key", prefix + ".rest.{class}",
            "--route", f"^user: {prefix}.users.{{key}}")))
        notify_ready(client)
        with RawClient(proxy.port) as raw:
            assert raw.command("key_evt_amqp.route_add", "^user:admin", f"{prefix}.admins") == b"OK"
            assert raw.command("key_evt_amqp.route_add", "^adm", f"{prefix}.admins", TOPIC) == b"OK"
            assert raw.command("key_evt_amqp.route_list") == [
                [b"^user:", f"{prefix}.users.{{key}}".encode(), None],
                [b"^user:admin", f"{prefix}.admins".encode(), None],
                [b"^adm", f"{prefix}.admins".encode(), TOPIC.encode()]]
            assert raw.command("key_evt_amqp.route_add", "x", "r.{nope}").startswith(b"ERR unknown placeholder")
            assert raw.command("key_evt_amqp.route_add", "x").startswith(b"ERR wrong number")
            config = raw.command("key_evt_amqp.config_get")
            assert config[config.index(b"routes") + 1][2] == [b"^adm", f"{prefix}.admins".encode(), TOPIC.encode()]
            client.set("user:admin", "1")  # matches ^user: first, then ^user:admin: the first wins
            client.set("user:a.b", "1")
            client.set("admin", "1")
            client.set("other", "1")
            got_users = users.drain(expected=2)
            got_admins = admins.drain(expected=1)
            got_rest = rest.drain(expected=1)
            assert raw.command("key_evt_amqp.route_clean") == b"OK"
            assert raw.command("key_evt_amqp.route_list") == []
            client.set("user:z", "1")
            after_clean = rest.drain(expected=1)
    assert [(m.routing_key, m.body) for m in got_users] == [
        (f"{prefix}.users.user:admin", b"0\nset\nuser:admin"), (f"{prefix}.users.user:a%2Eb", b"0\nset\nuser:a.b")]
    assert bodies(got_admins) == [b"0\nset\nadmin"]
    assert [(m.routing_key, m.body) for m in got_rest] == [(f"{prefix}.rest.string", b"0\nset\nother")]
    assert bodies(after_clean) == [b"0\nset\nuser:z"]


def test_json_bodies_binary_keys_and_format_set(prefix: str) -> None:
    with ExitStack() as stack:
        (queue,) = queues(stack, f"{prefix}.#")
        rs = stack.enter_context(RedisServer())
        client = rs.client()
        proxy = stack.enter_context(ProxyProcess(rs.url, args(
            AMQP_PORT, "--routing-key", prefix + ".{event}", "--format", "json")))
        notify_ready(client)
        client.set("clé", "1")
        client.set(b"\xff\x00bin", "1")
        got = queue.drain(expected=2)
        with RawClient(proxy.port) as raw:
            assert raw.command("key_evt_amqp.format_set", "xml") == b"ERR format must be module or json"
            assert raw.command("key_evt_amqp.format_set", "module") == b"OK"
            client.set("plain", "1")
            plain = queue.drain(expected=1)
            config = raw.command("key_evt_amqp.config_get")
            assert config[config.index(b"event_format") + 1] == b"module"
    assert [m.content_type for m in got] == ["application/json"] * 2
    first, second = (json.loads(m.body) for m in got)
    assert first == {"db": 0, "event": "set", "key": "clé", "ts": first["ts"], "id": got[0].message_id,
                     "node": f"127.0.0.1:{rs.port}"}
    assert abs(first["ts"] - time.time() * 1000) < 60_000
    assert "key" not in second and base64.b64decode(second["key_b64"]) == b"\xff\x00bin"
    assert [(m.content_type, m.body) for m in plain] == [("text/plain", b"0\nset\nplain")]


def test_gap_marker_in_json(prefix: str) -> None:
    with ExitStack() as stack:
        (queue,) = queues(stack, f"{prefix}.#")
        rs = stack.enter_context(RedisServer())
        client = rs.client()
        stack.enter_context(ProxyProcess(rs.url, args(
            AMQP_PORT, "--routing-key", prefix + ".{db}.{event}", "--format", "json")))
        notify_ready(client)
        client.client_kill_filter(_type="pubsub")  # the subscription drops: a gap, then a marker
        wait_for(lambda: queue.count() >= 1, 20)
        got = queue.drain(expected=1)
    markers = [m for m in got if m.type == "key_evt_amqp.gap"]
    assert markers, [m.body for m in got]
    marker = json.loads(markers[0].body)
    assert set(marker) == {"gap", "ts", "id"} and marker["id"] == markers[0].message_id
    assert marker["gap"]["node"] == f"127.0.0.1:{rs.port}"
    assert 0 < marker["gap"]["start_ms"] <= marker["gap"]["end_ms"]
    assert markers[0].routing_key == f"{prefix}.-1.gap"


def test_replay_from_the_fallback_list_keeps_route_body_and_id(prefix: str) -> None:
    """Published once through a relay that black-holes confirms (so the first attempt is made and
    fails), stored, then replayed after the route changed: same routing key, body and id."""
    with ExitStack() as stack:
        users, rest = queues(stack, f"{prefix}.users.#", f"{prefix}.rest.#")
        relay = stack.enter_context(FaultRelay(AMQP_PORT))
        rs = stack.enter_context(RedisServer())
        client = rs.client()
        proxy = stack.enter_context(ProxyProcess(rs.url, args(
            relay.port, "--routing-key", prefix + ".rest.{key}", "--format", "json",
            "--route", f"^u {prefix}.users.{{key}}", "--publish-timeout", "1")))
        notify_ready(client)
        client.set("u1", "x")
        first = users.drain(expected=1)
        relay.blackhole()  # published, never confirmed: the attempt times out, the event is stored
        client.set("u2", "x")
        client.set(b"v\xff", "x")
        wait_for(lambda: client.llen(DEFAULT_FALLBACK_KEY) == 2, 30)
        stored = client.lrange(DEFAULT_FALLBACK_KEY, 0, -1)
        with RawClient(proxy.port) as raw:  # now everything would go elsewhere, in the module format
            assert raw.command("key_evt_amqp.route_clean") == b"OK"
            assert raw.command("key_evt_amqp.format_set", "module") == b"OK"
        relay.restore()
        wait_for(lambda: client.llen(DEFAULT_FALLBACK_KEY) == 0, 30)
        replayed_users = users.drain(expected=1)
        replayed_rest = rest.drain(expected=1)
    assert all(b" !route=" in entry for entry in stored), stored
    assert [m.routing_key for m in first] == [f"{prefix}.users.u1"]
    (u2,) = replayed_users
    (v,) = replayed_rest
    assert u2.routing_key == f"{prefix}.users.u2" and v.routing_key == f"{prefix}.rest.v%FF"
    for message, entry in zip((u2, v), stored):
        assert message.content_type == "application/json"
        assert message.message_id == entry.split(b" ", 2)[1].decode()
        body = json.loads(message.body)
        assert body["id"] == message.message_id and body["ts"] == int(entry.split(b" ", 3)[2])
    assert json.loads(u2.body)["key"] == "u2" and base64.b64decode(json.loads(v.body)["key_b64"]) == b"v\xff"


def test_long_keys_are_cut_to_255_bytes(prefix: str) -> None:
    with ExitStack() as stack:
        (queue,) = queues(stack, f"{prefix}.#")
        rs = stack.enter_context(RedisServer())
        client = rs.client()
        stack.enter_context(ProxyProcess(rs.url, args(AMQP_PORT, "--routing-key", prefix + ".{key}")))
        notify_ready(client)
        client.set("k" * 1000, "1")
        client.set("k" * 999 + ".", "1")
        got = queue.drain(expected=2)
    keys = [m.routing_key for m in got]
    assert all(len(k) == 255 and k[246] == "~" for k in keys) and keys[0] != keys[1]


def test_routes_and_format_are_shared_by_a_fleet(prefix: str) -> None:
    with ExitStack() as stack:
        rs = stack.enter_context(RedisServer())
        one = stack.enter_context(ProxyProcess(rs.url, args(AMQP_PORT, "--routing-key", prefix + ".{event}")))
        two = stack.enter_context(ProxyProcess(rs.url, args(AMQP_PORT, "--routing-key", prefix + ".{event}")))
        with RawClient(one.port) as a, RawClient(two.port) as b:
            assert a.command("key_evt_amqp.route_add", "^user:", prefix + ".u.{key}", TOPIC) == b"OK"
            wait_for(lambda: b.command("key_evt_amqp.route_list") == [
                [b"^user:", f"{prefix}.u.{{key}}".encode(), TOPIC.encode()]], 10, message="the route on B")
            assert b.command("key_evt_amqp.format_set", "json") == b"OK"

            def format_on_a() -> bytes:
                config = a.command("key_evt_amqp.config_get")
                return config[config.index(b"event_format") + 1]  # type: ignore[no-any-return]
            wait_for(lambda: format_on_a() == b"json", 10, message="the format on A")
            assert b.command("key_evt_amqp.route_clean") == b"OK"
            wait_for(lambda: a.command("key_evt_amqp.route_list") == [], 10, message="route_clean on A")
