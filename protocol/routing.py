"""Routing by event and the JSON format: where each message goes and what its body says. No I/O.

Routing keys
    ``--routing-key`` may be a template: ``{db}``, ``{event}``, ``{class}`` (the class letter's
    name: ``generic``, ``string``, ``list``, ``set``, ``hash``, ``zset``, ``expired``, ``evicted``,
    ``stream``, ``keymiss``, ``new``, ``module``), ``{key}`` and ``{prefix}`` (the key up to the
    first separator, ``:`` by default; the whole key when it has none). Any other ``{name}`` is
    refused; text outside placeholders is kept as given.

    Escaping: each substituted value keeps the bytes ``A-Z a-z 0-9 - _ : / + = @ ! ~ , ;``; every
    other byte (``.``, ``*``, ``#``, ``%``, space, control and non-ASCII bytes) becomes ``%XX``
    (upper-case hex), so a value is always one word of a topic pattern (``redis.*.expired``
    matches whatever the key) and the result is printable ASCII.

    Truncation: a routing key is an AMQP short string (at most 255 bytes). A longer result is cut
    to 246 bytes (never inside a ``%XX``) and ends with ``~`` + the first 8 hex digits of the SHA-1
    of the whole key: 255 bytes at most, and two long keys that differ after the cut stay apart.

Routes
    ``(mask, template, exchange)``: a key mask (the module's matcher, :mod:`protocol.keymask`) with
    its own routing key template and, optionally, exchange (None: ``--exchange``). An event goes
    to the **first** route whose mask matches its key, in the order the routes were added, else to
    the default (``--exchange``, ``--routing-key``): one event is one message with one id, always.
    Gap markers take the default route, with ``{db}`` = ``-1``, ``{event}`` = ``{class}`` = ``gap``,
    ``{key}`` = ``{prefix}`` = the source (the Redis node), escaped.

JSON (``--format json``, content type ``application/json``)
    ``{"db":0,"event":"set","key":"k","ts":1700000000000,"id":"...","node":"127.0.0.1:6379"}``;
    ``key_b64`` (standard base64) instead of ``key`` when the key is not valid UTF-8; a gap marker
    is ``{"gap":{"start_ms":..,"end_ms":..,"node":".."},"ts":..,"id":".."}``. ``node`` is the Redis
    node that emitted the event (cluster mode) or the upstream Redis. Every value is a function of
    what the fallback list keeps, so a replay has the same body. Schema: ``docs/event.schema.json``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Sequence

from protocol.events import event_class
from protocol.keymask import compile_mask

__all__ = [
    "CLASS_NAMES",
    "FORMATS",
    "MAX_ROUTING_KEY",
    "PLACEHOLDER",
    "Route",
    "Router",
    "Template",
    "escape_value",
    "json_body",
    "truncate_key",
]

MAX_ROUTING_KEY = 255
FORMATS = ("module", "json")
CLASS_NAMES = {"g": b"generic", "$": b"string", "l": b"list", "s": b"set", "h": b"hash", "z": b"zset",
               "x": b"expired", "e": b"evicted", "t": b"stream", "m": b"keymiss", "n": b"new", "d": b"module"}
PLACEHOLDERS = ("db", "event", "class", "key", "prefix")
GAP_NAME = b"key_evt_amqp.gap"

Route = tuple[bytes, str, str | None]  # (key mask, routing key template, exchange or None)

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_:/+=@!~,;")
_ESCAPE = [bytes((b,)) if b in _SAFE else b"%%%02X" % b for b in range(256)]
_UNSAFE = re.compile(rb"[^A-Za-z0-9\-_:/+=@!~,;]")
PLACEHOLDER = re.compile(r"\{(db|event|class|key|prefix)\}")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]*)\}")
_JSON_SPECIAL = re.compile(rb'[^\x20-\x21\x23-\x5b\x5d-\x7e]')  # what JSON must escape, and non-ASCII
_KEEP = 246  # bytes kept when a key is too long: 246 + "~" + 8 hex = 255


def escape_value(value: bytes) -> bytes:
    """``value`` with every byte outside the safe set as ``%XX`` (see the module docstring)."""
    if not _UNSAFE.search(value):
        return value
    return b"".join([_ESCAPE[b] for b in value])


def truncate_key(key: bytes) -> bytes:
    """``key`` if it fits in 255 bytes, else its first bytes (never half an escape) + ``~`` + hash."""
    if len(key) <= MAX_ROUTING_KEY:
        return key
    cut = _KEEP
    percent = key.rfind(b"%", cut - 2, cut)
    if percent >= 0:
        cut = percent  # the escape would be split: cut before it
    return key[:cut] + b"~" + hashlib.sha1(key).hexdigest()[:8].encode()


class Template:
    """A compiled routing key template. Raises ValueError for an unknown placeholder."""

    __slots__ = ("text", "_parts", "fixed")

    def __init__(self, text: str) -> None:
        self.text = text
        parts: list[bytes | str] = []
        at = 0
        for match in _PLACEHOLDER.finditer(text):
            name = match.group(1)
            if name not in PLACEHOLDERS:
                raise ValueError(f"unknown placeholder {{{name}}} in routing key (known: "
                                 + ", ".join("{%s}" % p for p in PLACEHOLDERS) + ")")
            parts += (text[at:match.start()].encode(), name)
            at = match.end()
        parts.append(text[at:].encode())
        self._parts = tuple(p for p in parts if p != b"")
        self.fixed = all(isinstance(p, bytes) for p in self._parts)
        if self.fixed and len(text.encode()) > MAX_ROUTING_KEY:
            raise ValueError("longer than 255 bytes")

    def render(self, db: int, event: bytes, klass: bytes, key: bytes, separator: bytes) -> bytes:
        out = []
        for part in self._parts:
            if isinstance(part, bytes):
                out.append(part)
            elif part == "db":
                out.append(b"%d" % db)
            elif part == "event":
                out.append(escape_value(event))
            elif part == "class":
                out.append(klass)
            elif part == "key":
                out.append(escape_value(key))
            else:
                out.append(escape_value(key.split(separator, 1)[0] if separator else key))
        return b"".join(out)  # the caller cuts it to 255 bytes (truncate_key)


def check_template(text: str) -> str:
    """``text`` if it is a valid routing key or template (for the settings' parsers)."""
    Template(text)
    return text


class Router:
    """Picks ``(exchange, routing key)`` for each event from the settings in force."""

    __slots__ = ("exchange", "default", "routes", "separator", "json")

    def __init__(self, exchange: str, routing_key: str, routes: Sequence[Route], fmt: str,
                 separator: bytes = b":") -> None:
        self.exchange = exchange.encode()
        self.default = Template(routing_key)
        self.routes = tuple((compile_mask(mask), Template(rk), (exchange if ex is None else ex).encode())
                            for mask, rk, ex in routes)
        self.separator = separator
        self.json = fmt == "json"

    @property
    def plain(self) -> bool:
        """True when every event takes the same route in the module format (the fast path)."""
        return self.default.fixed and not self.routes and not self.json

    def route(self, db: int, name: bytes, key: bytes, gap: bool) -> tuple[bytes, bytes, bool]:
        """``(exchange, routing key, whether the key was cut to 255 bytes)`` for one event."""
        if gap:
            return self._cut(self.exchange, self.default.render(-1, b"gap", b"gap", key, self.separator))
        template, exchange = self.default, self.exchange
        for mask, rk, ex in self.routes:
            if mask.search(key):
                template, exchange = rk, ex
                break
        letter = event_class(name)
        klass = CLASS_NAMES.get(letter, b"module") if letter else b"module"
        return self._cut(exchange, template.render(db, name, klass, key, self.separator))

    @staticmethod
    def _cut(exchange: bytes, routing_key: bytes) -> tuple[bytes, bytes, bool]:
        if len(routing_key) <= MAX_ROUTING_KEY:
            return exchange, routing_key, False
        return exchange, truncate_key(routing_key), True


def json_body(message_id: bytes, timestamp_ms: int, db: int, name: bytes, key: bytes,
              gap: tuple[int, int] | None, node: bytes, value: bytes | None = None) -> bytes:
    """The JSON body of one event (see the module docstring). ``value``: the ``--with-value``
    hook (``value``/``value_b64``, the same rule as the key); not used yet."""
    node_text = _text(node)
    if gap is not None:
        return (b'{"gap":{"start_ms":%d,"end_ms":%d,"node":%b},"ts":%d,"id":%b}'
                % (gap[0], gap[1], node_text, timestamp_ms, _text(message_id)))
    out = b'{"db":%d,"event":%b,%b,"ts":%d,"id":%b,"node":%b' % (
        db, _text(name), _field(b"key", key), timestamp_ms, _text(message_id), node_text)
    if value is not None:
        out += b"," + _field(b"value", value)
    return out + b"}"


def _field(name: bytes, data: bytes) -> bytes:
    if not _JSON_SPECIAL.search(data):  # printable ASCII without " or \\: as is (the usual key)
        return b'"%b":"%b"' % (name, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return b'"%b_b64":"%b"' % (name, base64.b64encode(data))
    return b'"%b":%b' % (name, json.dumps(text, ensure_ascii=False).encode("utf-8"))


def _text(data: bytes) -> bytes:
    if not _JSON_SPECIAL.search(data):
        return b'"%b"' % data
    return json.dumps(data.decode("utf-8", "replace"), ensure_ascii=False).encode("utf-8")
