"""The fields of the shared settings' hash (:mod:`.shared_config`), without any I/O.

One field per setting a command set, named after the :class:`~proxy.config.Config` field (the
names in :data:`proxy.settings.COMMAND_SETTINGS`), holding a string as UTF-8, an integer in
decimal, the key masks as netstrings (``3:a b,1:c,``: any bytes, and ``a b`` + ``c`` stays apart
from ``a`` + ``b c``), the routes as three netstrings each (mask, routing key, ``=exchange`` or
empty for ``--exchange``); ``amqp_enabled`` (``1`` / ``0``) and ``version`` (a decimal count of changes).
Reading checks each field as the command that sets it checks its argument; a field that fails is
named in :attr:`SharedState.problems` (the amqp password's value never is) and left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from protocol.integers import string2ll
from protocol.keymask import normalize_masks
from proxy.settings import COMMAND_SETTINGS, parse_route, parse_setting

__all__ = ["ENABLED", "VERSION", "SharedState", "decode", "encode", "encode_enabled", "version_of"]

VERSION = b"version"
ENABLED = b"amqp_enabled"
_SHOWN_MAX = 64  # characters of a bad value quoted in a problem


@dataclass(frozen=True, slots=True)
class SharedState:
    """The hash, read: the settings it sets, ``amqp_enabled`` (None: not set), ``version`` (0:
    none or unreadable) and one line per field that was ignored."""

    values: Mapping[str, object]
    enabled: bool | None = None
    version: int = 0
    problems: tuple[str, ...] = ()


def encode(values: Mapping[str, object]) -> dict[bytes, bytes]:
    """The hash fields for ``values`` (Config field -> value, names in ``COMMAND_SETTINGS``):
    a string as UTF-8, an integer in decimal, the key masks as netstrings (``3:a b,1:c,``: any
    bytes, and ``a b`` + ``c`` stays apart from ``a`` + ``b c``)."""
    fields: dict[bytes, bytes] = {}
    for name, value in values.items():
        if name not in COMMAND_SETTINGS:
            raise ValueError(f"{name!r} is not a setting commands change")
        if name == "keymasks":
            masks = cast("tuple[bytes, ...]", value)
            fields[b"keymasks"] = b"".join(b"%d:%s," % (len(mask), mask) for mask in masks)
        elif name == "routes":
            # three netstrings per route: mask, routing key, "" (no exchange: --exchange) or "=" + exchange
            routes = cast("tuple[tuple[bytes, str, str | None], ...]", value)
            parts = [part for mask, key, exchange in routes
                     for part in (mask, key.encode(), b"" if exchange is None else b"=" + exchange.encode())]
            fields[b"routes"] = b"".join(b"%d:%s," % (len(part), part) for part in parts)
        else:
            fields[name.encode()] = str(value).encode()
    return fields


def encode_enabled(enabled: bool) -> bytes:
    return b"1" if enabled else b"0"


def decode(fields: Mapping[bytes, bytes]) -> SharedState:
    """Read the hash: every field is checked as the command that sets it checks its argument;
    a field that fails (or that this version does not know) is left out and named in
    ``problems`` (the amqp password's value never is)."""
    values: dict[str, object] = {}
    problems: list[str] = []
    enabled: bool | None = None
    version = 0
    for raw_name, raw in fields.items():
        name = raw_name.decode("utf-8", "backslashreplace")
        try:
            if raw_name == VERSION:
                number = string2ll(raw)
                if number is None or number < 0:
                    raise ValueError("expected an integer >= 0")
                version = number
            elif raw_name == ENABLED:
                if raw not in (b"0", b"1"):
                    raise ValueError("expected 0 or 1")
                enabled = raw == b"1"
            elif name == "keymasks":
                values[name] = normalize_masks(_load_masks(raw))
            elif name == "routes":
                values[name] = _load_routes(raw)
            elif name in COMMAND_SETTINGS:
                values[name] = parse_setting(name, raw.decode("utf-8"))
            else:
                problems.append(f"unknown setting {name!r} (a newer version's, or written by hand)")
        except (ValueError, UnicodeDecodeError) as exc:
            shown = "" if name == "amqp_password" else " " + _quote(raw)
            reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
            problems.append(f"invalid {name}{shown}: {reason}")
    return SharedState(values, enabled, version, tuple(problems))


def _load_masks(data: bytes) -> list[bytes]:
    masks = []
    at = 0
    while at < len(data):
        colon = data.find(b":", at)
        size = string2ll(data[at:colon]) if colon > at else None
        end = colon + 1 + size if size is not None and size >= 0 else -1
        if size is None or end < 0 or data[end:end + 1] != b",":
            raise ValueError(f"expected netstrings (LENGTH:BYTES,), broken at byte {at}")
        masks.append(data[colon + 1:end])
        at = end + 1
    return masks


def _load_routes(data: bytes) -> tuple[tuple[bytes, str, str | None], ...]:
    parts = _load_masks(data)
    if len(parts) % 3:
        raise ValueError("expected three netstrings per route")
    routes = []
    for at in range(0, len(parts), 3):
        mask, key, exchange = parts[at:at + 3]
        if exchange and not exchange.startswith(b"="):
            raise ValueError("a route's exchange starts with '='")
        routes.append(parse_route([mask, key] + ([exchange[1:]] if exchange else [])))
    return tuple(routes)


def _quote(raw: bytes) -> str:
    text = raw.decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= _SHOWN_MAX else text[:_SHOWN_MAX] + "...")


def version_of(fields: Mapping[bytes, bytes]) -> int:
    """The hash's ``version`` (0 when it has none, or one that is not a number)."""
    return decode({VERSION: fields[VERSION]}).version if VERSION in fields else 0
