"""What the pipeline sends: events, their AMQP frames, and their fallback-list entries.

No I/O here. Three pure pieces:

- :class:`Event`: one keyspace event (or gap marker) with the identity it keeps for life: its
  ``message_id`` and ``timestamp_ms`` are chosen once, when the proxy reads the event, and travel
  with it into the fallback list and back, so a replay carries the same id as the first attempt.
- :class:`FrameEncoder`: the three AMQP frames of a ``basic.publish`` (method, content header,
  body), built with ``struct`` instead of pamqp objects: this runs once per event at tens of
  thousands per second. ``tests/unit/test_events_message.py`` checks them against pamqp.
- :func:`dump_entry` / :func:`load_entry`: the fallback list format (``docs/events.md``)::

      KEA1 <message_id> <timestamp_ms>\\n<db>\\n<event>\\n<key>
      KEA1 <message_id> <timestamp_ms> gap <start_ms> <end_ms>\\n-1\\nkey_evt_amqp.gap\\n<source>

  With routing by event or the JSON format in use, a published event's entry ends its first line
  with `` !route=<exchange hex>,<routing key hex>,<module|json>``: a replay goes where the first
  attempt went, in the same format (the JSON body is recomputed from the stored fields: the same).

  An entry without the ``KEA1 `` prefix is a bare module body (``<db>\\n<event>\\n<key>``, the C
  module's format, e.g. a backlog left by it): it is published with a new id derived from its bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct

from protocol.events import encode_body

__all__ = [
    "APP_ID",
    "GAP_TYPE",
    "Event",
    "FrameEncoder",
    "IdSource",
    "dump_entry",
    "encode_headers",
    "gap_event",
    "load_entry",
]

APP_ID = b"key-evt-amqp"
GAP_TYPE = b"key_evt_amqp.gap"
ENTRY_MAGIC = b"KEA1 "

_CONTENT_TYPE = b"\x0atext/plain"
_CONTENT_JSON = b"\x10application/json"
ROUTE_FIELD = b"!route="
_APP_ID = bytes((len(APP_ID),)) + APP_ID
# Basic properties present, by bit: content-type 15, headers 13, delivery-mode 12, message-id 7,
# timestamp 6, type 5, app-id 3 (AMQP 0-9-1, "basic" class).
_FLAGS = 0x8000 | 0x2000 | 0x1000 | 0x0080 | 0x0040 | 0x0020 | 0x0008
_FRAME_END = b"\xce"
METHOD_CACHE = 4096  # routed basic.publish method frames kept per encoder; full: cleared
_BODY_FORM = re.compile(rb"\A-?[0-9]+\n[^\n]*\n", re.DOTALL)

_pack_frame_head = struct.Struct(">BHI").pack
_pack_header_head = struct.Struct(">HHQH").pack
_pack_u32 = struct.Struct(">I").pack
_pack_i32 = struct.Struct(">i").pack
_pack_i64 = struct.Struct(">q").pack
_pack_u64 = struct.Struct(">Q").pack


class Event:
    """One message to deliver: a keyspace event, or a gap marker when ``gap`` is set.

    ``gap`` is ``(start_ms, end_ms)``: the time span during which the proxy was not subscribed.
    ``headers`` are extra string headers (``(name, value)`` pairs: ``node``, ``shard`` in cluster
    mode), ``extra`` the same pairs already encoded as AMQP table entries (:func:`encode_headers`).
    """

    __slots__ = ("message_id", "timestamp_ms", "db", "name", "body", "gap", "headers", "extra", "seq",
                 "route")

    def __init__(self, message_id: bytes, timestamp_ms: int, db: int, name: bytes, body: bytes,
                 gap: tuple[int, int] | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = (), extra: bytes | None = None) -> None:
        self.message_id = message_id
        self.timestamp_ms = timestamp_ms
        self.db = db
        self.name = name
        self.body = body
        self.gap = gap
        self.headers = headers
        self.extra = encode_headers(headers) if extra is None else extra
        self.seq = 0  # the pipeline's count when it accepted the event (0: never accepted)
        # (exchange, routing key, format b"module"|b"json") chosen at the first routed publish
        # (protocol/routing.py) and kept in the fallback list; None: the plain settings
        self.route: tuple[bytes, bytes, bytes] | None = None

    @classmethod
    def keyspace(cls, message_id: bytes, timestamp_ms: int, db: int, name: bytes, key: bytes,
                 headers: tuple[tuple[bytes, bytes], ...] = (), extra: bytes = b"") -> Event:
        return cls(message_id, timestamp_ms, db, name, encode_body(db, name, key), None, headers, extra)

    def __repr__(self) -> str:
        return f"Event({self.message_id!r}, {self.body[:60]!r}{', gap=%r' % (self.gap,) if self.gap else ''})"


def gap_event(message_id: bytes, now_ms: int, start_ms: int, end_ms: int, source: bytes,
              headers: tuple[tuple[bytes, bytes], ...] = ()) -> Event:
    """The marker published after the subscription to Redis was down from ``start_ms`` to ``end_ms``."""
    return Event(message_id, now_ms, -1, GAP_TYPE, b"-1\n" + GAP_TYPE + b"\n" + source, (start_ms, end_ms),
                 headers)


def encode_headers(headers: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """``((b"node", b"10.0.0.1:7000"),)`` as AMQP field-table entries (long strings)."""
    return b"".join(bytes((len(name),)) + name + b"S" + _pack_u32(len(value)) + value
                    for name, value in headers)


class IdSource:
    """Message ids unique across processes: a random 64-bit prefix per process and a counter."""

    __slots__ = ("_prefix", "_count")

    def __init__(self, prefix: bytes | None = None) -> None:
        self._prefix = prefix if prefix is not None else os.urandom(8).hex().encode()
        self._count = 0

    def next(self) -> bytes:
        self._count += 1
        return b"%b-%x" % (self._prefix, self._count)


class FrameEncoder:
    """Pre-encoded ``basic.publish`` frames for one channel, exchange and routing key.

    Build a new encoder when the exchange, routing key, delivery mode or frame size changes.
    ``mandatory`` is always set: an unroutable message comes back as ``basic.return``.
    """

    __slots__ = ("_method", "_channel", "_max_body", "_delivery_mode", "_methods")

    def __init__(self, channel: int, exchange: str, routing_key: str, delivery_mode: int,
                 frame_max: int = 131072) -> None:
        exchange_b = exchange.encode()
        routing_b = routing_key.encode()
        if len(exchange_b) > 255 or len(routing_b) > 255:
            raise ValueError("exchange and routing key are limited to 255 bytes")
        method = (struct.pack(">HHH", 60, 40, 0) + bytes((len(exchange_b),)) + exchange_b
                  + bytes((len(routing_b),)) + routing_b + b"\x01")  # bits: mandatory=1, immediate=0
        self._method = _pack_frame_head(1, channel, len(method)) + method + _FRAME_END
        self._channel = channel
        self._max_body = frame_max - 8 if frame_max else 1 << 30  # frame header 7 + end 1
        self._delivery_mode = bytes((delivery_mode,))
        self._methods: dict[tuple[bytes, bytes], bytes] = {}  # routed method frames, at most METHOD_CACHE

    def encode(self, event: Event) -> bytes:
        """The frames of one publish, ready to write to the socket."""
        return self._frames(self._method, event, _CONTENT_TYPE, event.body)

    def encode_routed(self, event: Event, exchange: bytes, routing_key: bytes, body: bytes | None) -> bytes:
        """The frames of one publish to ``exchange`` with ``routing_key``; ``body`` is the JSON
        body (``application/json``), None for the module's body."""
        method = self._methods.get((exchange, routing_key))
        if method is None:
            if len(self._methods) >= METHOD_CACHE:
                self._methods.clear()
            payload = (b"\x00\x3c\x00\x28\x00\x00" + bytes((len(exchange),)) + exchange
                       + bytes((len(routing_key),)) + routing_key + b"\x01")
            method = _pack_frame_head(1, self._channel, len(payload)) + payload + _FRAME_END
            self._methods[(exchange, routing_key)] = method
        if body is None:
            return self._frames(method, event, _CONTENT_TYPE, event.body)
        return self._frames(method, event, _CONTENT_JSON, body)

    def _frames(self, method: bytes, event: Event, content_type: bytes, body: bytes) -> bytes:
        if event.gap is None:
            table = (b"\x02dbI" + _pack_i32(event.db) + b"\x05eventS" + _pack_u32(len(event.name))
                     + event.name)
        else:
            start, end = event.gap
            table = b"\x0cgap_start_msl" + _pack_i64(start) + b"\x0agap_end_msl" + _pack_i64(end)
        if event.extra:
            table += event.extra
        mid = event.message_id
        name = event.name[:255]
        props = b"".join((
            content_type, _pack_u32(len(table)), table, self._delivery_mode,
            bytes((len(mid),)), mid, _pack_u64(event.timestamp_ms // 1000),
            bytes((len(name),)), name, _APP_ID,
        ))
        header = _pack_header_head(60, 0, len(body), _FLAGS) + props
        channel = self._channel
        parts = [method, _pack_frame_head(2, channel, len(header)), header, _FRAME_END]
        step = self._max_body
        for start in range(0, len(body), step):
            chunk = body[start:start + step]
            parts += (_pack_frame_head(3, channel, len(chunk)), chunk, _FRAME_END)
        return b"".join(parts)


def dump_entry(event: Event) -> bytes:
    """The fallback list element for ``event`` (see the module docstring)."""
    head = b"KEA1 %b %d" % (event.message_id, event.timestamp_ms)
    if event.gap is not None:
        head += b" gap %d %d" % event.gap
    for name, value in event.headers:
        head += b" %b=%b" % (name, value)
    if event.route is not None:
        head += b" " + ROUTE_FIELD + b"%b,%b,%b" % (event.route[0].hex().encode(), event.route[1].hex().encode(),
                                            event.route[2])
    return head + b"\n" + event.body


def load_entry(entry: bytes, now_ms: int) -> Event | None:
    """The event stored in a fallback list element, or None if the element is not one of ours.

    A bare module body gets the id ``legacy-<sha1 of the element>`` (stable across replays) and the
    timestamp ``now_ms``. Anything else (a user's RPUSH of arbitrary bytes) is None: skip it.
    """
    if entry.startswith(ENTRY_MAGIC):
        newline = entry.find(b"\n")
        if newline < 0:
            return None
        fields = entry[len(ENTRY_MAGIC):newline].split(b" ")
        body = entry[newline + 1:]
        # header fields (``name=value``, cluster mode) follow the fixed ones
        headers: list[tuple[bytes, bytes]] = []
        while len(fields) > 2 and b"=" in fields[-1]:
            name, _, value = fields.pop().partition(b"=")
            if not name or len(name) > 255:
                return None
            headers.insert(0, (name, value))
        try:
            message_id, timestamp_ms = fields[0], int(fields[1])
            gap = (int(fields[3]), int(fields[4])) if len(fields) == 5 and fields[2] == b"gap" else None
        except (IndexError, ValueError):
            return None
        if len(fields) not in (2, 5) or not message_id or len(message_id) > 255:
            return None
        route = None
        if headers and headers[-1][0] == ROUTE_FIELD[:-1]:
            route = _load_route(headers.pop()[1])
            if route is None:
                return None
        if headers or route is not None:
            if not _BODY_FORM.match(body):
                return None
            event = Event(message_id, timestamp_ms, *_split_body(body), gap, tuple(headers))
            event.route = route
            return event
    else:
        body = entry
        message_id = b"legacy-" + hashlib.sha1(entry).hexdigest()[:24].encode()
        timestamp_ms = now_ms
        gap = None
    if not _BODY_FORM.match(body):
        return None
    return Event(message_id, timestamp_ms, *_split_body(body), gap)


def _load_route(text: bytes) -> tuple[bytes, bytes, bytes] | None:
    parts = text.split(b",")
    if len(parts) != 3 or parts[2] not in (b"module", b"json"):
        return None
    try:
        exchange, routing_key = bytes.fromhex(parts[0].decode()), bytes.fromhex(parts[1].decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if len(exchange) > 255 or len(routing_key) > 255:
        return None
    return exchange, routing_key, parts[2]


def _split_body(body: bytes) -> tuple[int, bytes, bytes]:
    db_text, name, _ = body.split(b"\n", 2)
    return int(db_text), name, body
