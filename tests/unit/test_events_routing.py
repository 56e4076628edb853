"""Routing keys from templates (escaping, truncation), routes (first match), the JSON body, and the
fallback entry that keeps a routed event's route. Pure: no servers."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.routing import MAX_ROUTING_KEY, Router, Template, escape_value, json_body, truncate_key
from proxy.events.message import Event, FrameEncoder, dump_entry, gap_event, load_entry


def route(router: Router, key: bytes, name: bytes = b"set", db: int = 0) -> tuple[bytes, bytes, bool]:
    return router.route(db, name, key, False)


def test_placeholders() -> None:
    router = Router("ex", "redis.{db}.{event}.{class}.{prefix}.{key}", (), "module")
    assert route(router, b"user:42", b"expired", 3) == (b"ex", b"redis.3.expired.expired.user.user:42", False)
    assert route(router, b"plain", b"lpush") == (b"ex", b"redis.0.lpush.list.plain.plain", False)
    assert route(router, b"k", b"hset")[1] == b"redis.0.hset.hash.k.k"
    assert route(router, b"k", b"some.module.event")[1] == b"redis.0.some%2Emodule%2Eevent.module.k.k"


def test_prefix_separator() -> None:
    assert route(Router("", "{prefix}", (), "module", b"/"), b"a/b:c")[1] == b"a"
    assert route(Router("", "{prefix}", (), "module"), b"a/b:c")[1] == b"a/b"
    assert route(Router("", "{prefix}", (), "module"), b"nosep")[1] == b"nosep"


def test_escaping_keeps_one_topic_word() -> None:
    assert escape_value(b"a.b*c#d e%f") == b"a%2Eb%2Ac%23d%20e%25f"
    assert escape_value(b"\xff\x00\n") == b"%FF%00%0A"
    assert escape_value(b"user:1/x-y_z+=@!~,;") == b"user:1/x-y_z+=@!~,;"
    assert escape_value("é".encode()) == b"%C3%A9"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_key_gives_a_short_printable_routing_key_that_stays_apart(key: bytes) -> None:
    router = Router("", "r.{key}", (), "module")
    routing_key = route(router, key)[1]
    assert len(routing_key) <= MAX_ROUTING_KEY
    assert routing_key.isascii() and b"." not in routing_key[2:] and b" " not in routing_key
    assert route(router, key + b"x")[1] != routing_key


def test_truncation() -> None:
    short = b"a" * 255
    assert truncate_key(short) == short
    long_key = b"a" * 300
    cut = truncate_key(long_key)
    assert len(cut) == 255 and cut.startswith(b"a" * 246 + b"~")
    # never half an escape: %FF straddling byte 246 is dropped whole
    escaped = b"a" * 244 + b"%FF" + b"b" * 20
    assert truncate_key(escaped)[:245] == b"a" * 244 + b"~"
    router = Router("", "{key}", (), "module")
    assert route(router, b"x" * 300)[2] is True and route(router, b"x" * 255)[2] is False


def test_templates_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown placeholder"):
        Template("redis.{dbx}")
    with pytest.raises(ValueError, match="255"):
        Template("r" * 256)
    assert Template("r" * 255).fixed and not Template("{key}").fixed
    assert Template("a{b").fixed  # a lone brace is text


def test_first_matching_route_wins() -> None:
    routes = ((b"^user:", "users.{event}", "amq.topic"), (b"^user:admin", "admins", None), (b"^x", "x", None))
    router = Router("ex", "default.{event}", routes, "module")
    assert route(router, b"user:admin") == (b"amq.topic", b"users.set", False)
    assert route(router, b"xy") == (b"ex", b"x", False)
    assert route(router, b"other") == (b"ex", b"default.set", False)
    assert router.route(-1, b"key_evt_amqp.gap", b"127.0.0.1:6379", True) == (b"ex", b"default.gap", False)
    assert not router.plain and Router("ex", "fixed", (), "module").plain
    assert not Router("ex", "fixed", (), "json").plain


def test_json_body() -> None:
    body = json.loads(json_body(b"id-1", 1700000000123, 2, b"set", "clé \"q\"".encode(), None, b"n:1"))
    assert body == {"db": 2, "event": "set", "key": "clé \"q\"", "ts": 1700000000123, "id": "id-1", "node": "n:1"}
    binary = json.loads(json_body(b"id-2", 5, 0, b"del", b"\xff\x00k", None, b"n"))
    assert "key" not in binary and base64.b64decode(binary["key_b64"]) == b"\xff\x00k"
    surrogate = json.loads(json_body(b"i", 5, 0, b"del", b"\xed\xa0\x80", None, b"n"))
    assert base64.b64decode(surrogate["key_b64"]) == b"\xed\xa0\x80"  # UTF-8 of a surrogate is not UTF-8
    gap = json.loads(json_body(b"g", 9, -1, b"key_evt_amqp.gap", b"src", (100, 200), b"10.0.0.1:7000"))
    assert gap == {"gap": {"start_ms": 100, "end_ms": 200, "node": "10.0.0.1:7000"}, "ts": 9, "id": "g"}
    with_value = json.loads(json_body(b"i", 1, 0, b"set", b"k", None, b"n", value=b"\xfe"))
    assert base64.b64decode(with_value["value_b64"]) == b"\xfe"


def test_routed_frames_match_the_plain_ones_but_for_the_route_and_content_type() -> None:
    encoder = FrameEncoder(1, "amq.direct", "rk", 1)
    event = Event.keyspace(b"id", 1000, 0, b"set", b"k")
    assert encoder.encode_routed(event, b"amq.direct", b"rk", None) == encoder.encode(event)
    routed = encoder.encode_routed(event, b"amq.topic", b"a.b", b'{"x":1}')
    assert b"\x09amq.topic\x03a.b\x01" in routed and b"\x10application/json" in routed
    assert routed.endswith(b'{"x":1}\xce')


def test_fallback_entry_keeps_the_route() -> None:
    event = Event.keyspace(b"id-7", 1234, 0, b"set", b"a b\nc", ((b"node", b"h:1"),))
    assert dump_entry(event) == b"KEA1 id-7 1234 node=h:1\n0\nset\na b\nc"  # no route: as before
    event.route = (b"amq.topic", b"r.0.set", b"json")
    entry = dump_entry(event)
    assert entry.startswith(b"KEA1 id-7 1234 node=h:1 !route=")
    back = load_entry(entry, 0)
    assert back is not None
    assert (back.message_id, back.timestamp_ms, back.body, back.headers, back.route) == \
        (b"id-7", 1234, event.body, event.headers, event.route)
    gap = gap_event(b"g-1", 50, 10, 20, b"src")
    gap.route = (b"", b"x", b"module")
    back_gap = load_entry(dump_entry(gap), 0)
    assert back_gap is not None and back_gap.gap == (10, 20) and back_gap.route == gap.route
    assert load_entry(b"KEA1 id 1 !route=zz,00,json\n0\nset\nk", 0) is None
    assert load_entry(b"KEA1 id 1 !route=00,00,xml\n0\nset\nk", 0) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=12), st.binary(max_size=20))
def test_any_key_event_and_node_make_valid_json(key: bytes, name: bytes, node: bytes) -> None:
    body = json.loads(json_body(b"id", 1, 0, name, key, None, node))
    if "key" in body:
        assert body["key"].encode("utf-8") == key
    else:
        assert base64.b64decode(body["key_b64"]) == key
    assert body["event"] == name.decode("utf-8", "replace") and body["node"] == node.decode("utf-8", "replace")


def test_bodies_follow_the_published_schema() -> None:
    import jsonschema  # test dependency (pyproject: test)

    schema = json.loads((Path(__file__).resolve().parents[2] / "docs" / "event.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for body in (json_body(b"i-1", 5, 0, b"set", b"user:1", None, b"127.0.0.1:6379"),
                 json_body(b"i-2", 5, 15, b"del", b"\xff", None, b"10.0.0.1:7000"),
                 json_body(b"g", 5, -1, b"key_evt_amqp.gap", b"n", (1, 2), b"n")):
        validator.validate(json.loads(body))
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({"db": 0, "event": "set", "ts": 1, "id": "x", "node": "n"})  # no key at all


def test_tail_binds_a_pattern_for_a_template_and_reads_json() -> None:
    from proxy.tail import Seen, binding_key

    assert binding_key("redis.{db}.{event}") == "redis.*.*"
    assert binding_key("fixed.key") == "fixed.key" and binding_key("a.{nope}") == "a.{nope}"
    seen = Seen.parse(json_body(b"i", 1, 3, b"del", b"\xff", None, b"n"), "i", "del", {}, "application/json")
    assert (seen.db, seen.event, seen.key, seen.gap) == (3, "del", b"\xff", None)
    gap = Seen.parse(json_body(b"g", 1, -1, b"key_evt_amqp.gap", b"x", (5, 6), b"h:1"), "g",
                     "key_evt_amqp.gap", {}, "application/json")
    assert (gap.gap, gap.key) == ((5, 6), b"h:1")
    assert Seen.parse(b"not json", "x", "set", {}, "application/json").event == "?"
    assert Seen.parse(b"0\nset\nk", "x", "set", {}, "text/plain").key == b"k"
