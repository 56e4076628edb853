"""The pipeline's pure parts: AMQP frames (checked against pamqp), list entries, channel names."""

from __future__ import annotations

import pamqp.frame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from proxy.events.message import (GAP_TYPE, Event, FrameEncoder, IdSource, dump_entry, gap_event,
                                  load_entry)
from proxy.events.source import parse_channel


def unmarshal_all(data: bytes) -> list[object]:
    frames = []
    while data:
        consumed, channel, frame = pamqp.frame.unmarshal(data)
        assert channel == 1
        frames.append(frame)
        data = data[consumed:]
    return frames


def test_publish_frames_decode_with_pamqp() -> None:
    event = Event.keyspace(b"abc-1", 1_700_000_123_456, 3, b"lpush", b"my\nkey\x00tail")
    frames = unmarshal_all(FrameEncoder(1, "amq.direct", "rk", 2).encode(event))
    method, header, body = frames
    assert isinstance(method, spec.Basic.Publish)
    assert (method.exchange, method.routing_key, method.mandatory, method.immediate) == ("amq.direct", "rk", True, False)
    assert isinstance(header, ContentHeader) and isinstance(body, ContentBody)
    assert header.body_size == len(body.value)
    assert body.value == b"3\nlpush\nmy\nkey\x00tail"
    p = header.properties
    assert p.content_type == "text/plain"
    assert p.delivery_mode == 2
    assert p.message_id == "abc-1"
    assert p.message_type == "lpush"
    assert p.app_id == "key-evt-amqp"
    assert p.timestamp.timestamp() == 1_700_000_123
    assert p.headers == {"db": 3, "event": "lpush"}


def test_large_body_is_split_into_frames() -> None:
    key = bytes(range(256)) * 40  # 10 kB, every byte value
    event = Event.keyspace(b"id", 0, 0, b"set", key)
    frames = unmarshal_all(FrameEncoder(1, "", "q", 1, frame_max=4096).encode(event))
    bodies = frames[2:]
    assert len(bodies) == 3
    assert all(len(b.value) <= 4096 - 8 for b in bodies)
    assert b"".join(b.value for b in bodies) == b"0\nset\n" + key
    assert frames[1].body_size == len(key) + 6


def test_gap_marker_frames() -> None:
    event = gap_event(b"g-1", 2_000, 1_000, 2_000, b"127.0.0.1:6379")
    _, header, body = unmarshal_all(FrameEncoder(1, "x", "y", 1).encode(event))
    assert header.properties.message_type == GAP_TYPE.decode()
    assert header.properties.headers == {"gap_start_ms": 1_000, "gap_end_ms": 2_000}
    assert body.value == b"-1\nkey_evt_amqp.gap\n127.0.0.1:6379"


def test_entry_round_trip_keeps_identity() -> None:
    for key in (b"plain", b"with\nnewline", b"nul\x00byte", b"", b"\xff\xfe", b"KEA1 x 1\n"):
        event = Event.keyspace(b"id-7", 123456789, 15, b"hset", key)
        loaded = load_entry(dump_entry(event), now_ms=0)
        assert loaded is not None
        assert (loaded.message_id, loaded.timestamp_ms, loaded.db, loaded.name, loaded.body) == (
            b"id-7", 123456789, 15, b"hset", event.body)
        assert loaded.gap is None
    gap = gap_event(b"g", 5, 1, 4, b"src")
    loaded = load_entry(dump_entry(gap), now_ms=0)
    assert loaded is not None and loaded.gap == (1, 4) and loaded.body == gap.body


def test_module_bodies_replay_with_a_stable_id() -> None:
    first = load_entry(b"0\nset\nfoo", now_ms=42)
    again = load_entry(b"0\nset\nfoo", now_ms=99)
    assert first is not None and again is not None
    assert first.message_id == again.message_id and first.message_id.startswith(b"legacy-")
    assert (first.db, first.name, first.body, first.timestamp_ms) == (0, b"set", b"0\nset\nfoo", 42)


def test_foreign_list_elements_are_rejected() -> None:
    for junk in (b"injected payload", b"KEA1 \n0\nset\nk", b"KEA1 id notanumber\n0\nset\nk", b"x\nset\nk", b"KEA1 id 1"):
        assert load_entry(junk, now_ms=0) is None


def test_ids_are_unique_and_prefixed() -> None:
    ids = IdSource(b"p")
    assert [ids.next() for _ in range(3)] == [b"p-1", b"p-2", b"p-3"]
    assert IdSource().next() != IdSource().next()


def test_parse_channel() -> None:
    assert parse_channel(b"__keyevent@0__:set") == (0, b"set")
    assert parse_channel(b"__keyevent@15__:xgroup-create") == (15, b"xgroup-create")
    assert parse_channel(b"__keyspace@0__:foo") is None
    assert parse_channel(b"__keyevent@x__:set") is None
