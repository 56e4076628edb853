"""Cluster-mode event parts without a server: node/shard headers on the wire and in the fallback
list, shard labels, the fallback key's hash tag."""

from __future__ import annotations

import pamqp.frame
from pamqp.header import ContentHeader

from protocol.slots import SLOTS, key_slot
from proxy.cluster.topology import SlotMap
from proxy.events.cluster_source import shard_label
from proxy.events.message import Event, FrameEncoder, dump_entry, encode_headers, gap_event, load_entry
from proxy.events.service import CLUSTER_FALLBACK_KEY, cluster_fallback_key, fallback_key_for

HEADERS = ((b"node", b"10.0.0.1:7000"), (b"shard", b"0-5460,6000-6001"))


def header_of(event: Event) -> ContentHeader:
    data = FrameEncoder(1, "amq.direct", "rk", 1).encode(event)
    consumed, _, _method = pamqp.frame.unmarshal(data)
    _, _, header = pamqp.frame.unmarshal(data[consumed:])
    assert isinstance(header, ContentHeader)
    return header


def test_node_headers_on_the_wire_and_through_the_list() -> None:
    event = Event.keyspace(b"id-1", 1_700_000_000_000, 0, b"set", b"k y", HEADERS, encode_headers(HEADERS))
    headers = header_of(event).properties.headers
    assert headers == {"db": 0, "event": "set", "node": b"10.0.0.1:7000", "shard": b"0-5460,6000-6001"} \
        or headers == {"db": 0, "event": "set", "node": "10.0.0.1:7000", "shard": "0-5460,6000-6001"}
    entry = dump_entry(event)
    assert entry == b"KEA1 id-1 1700000000000 node=10.0.0.1:7000 shard=0-5460,6000-6001\n0\nset\nk y"
    back = load_entry(entry, 0)
    assert back is not None and back.headers == HEADERS and back.extra == event.extra
    assert (back.message_id, back.body, back.gap) == (b"id-1", b"0\nset\nk y", None)


def test_gap_marker_with_shard_headers_through_the_list() -> None:
    headers = (*HEADERS, (b"node_id", b"abc"), (b"new_node", b"10.0.0.2:7001"))
    gap = gap_event(b"g-1", 5, 1, 4, b"10.0.0.1:7000", headers)
    back = load_entry(dump_entry(gap), 0)
    assert back is not None and back.gap == (1, 4) and back.headers == headers
    sent = header_of(back).properties.headers
    assert sent["gap_start_ms"] == 1 and sent["gap_end_ms"] == 4
    assert {k: (v.decode() if isinstance(v, bytes) else v) for k, v in sent.items()}["new_node"] == "10.0.0.2:7001"


def test_single_node_entries_unchanged() -> None:
    event = Event.keyspace(b"id-2", 7, 3, b"del", b"x")
    assert dump_entry(event) == b"KEA1 id-2 7\n3\ndel\nx"
    assert load_entry(b"KEA1 id-2 7\n3\ndel\nx", 0).headers == ()  # type: ignore[union-attr]
    assert load_entry(b"KEA1 id-2 7 =x\n3\ndel\nx", 0) is None


def test_shard_label() -> None:
    a, b = ("h", 1), ("h", 2)
    owners = tuple(a if s < 100 or 200 <= s < 300 else b for s in range(SLOTS))
    slot_map = SlotMap(owners, (a, b), ())
    assert shard_label(slot_map, a) == "0-99,200-299"
    assert shard_label(slot_map, b) == f"100-199,300-{SLOTS - 1}"


def test_fallback_key_in_cluster_mode() -> None:
    assert cluster_fallback_key(b"REDIS_MODULE-key_evt_amqp-fallback_storage") == CLUSTER_FALLBACK_KEY
    assert cluster_fallback_key(b"{}plain") == CLUSTER_FALLBACK_KEY  # an empty tag is no tag
    assert cluster_fallback_key(b"app:{events}:fallback") == b"app:{events}:fallback:key_evt_amqp"
    assert cluster_fallback_key(b"{key_evt_amqp}:mine") == b"{key_evt_amqp}:mine"


def test_fallback_keys_are_in_the_reserved_namespace() -> None:
    assert fallback_key_for(b"REDIS_MODULE-key_evt_amqp-fallback_storage") == \
        b"REDIS_MODULE-key_evt_amqp-fallback_storage"  # the module's default, unchanged
    assert fallback_key_for(b"backlog") == b"backlog:key_evt_amqp"
    assert key_slot(CLUSTER_FALLBACK_KEY) == key_slot(b"key_evt_amqp")
