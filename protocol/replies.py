"""RESP encoders for the replies the proxy makes itself.

Everything Redis says passes through untouched; only ``key_evt_amqp.*`` commands, protocol errors
and the proxy's own notices are encoded here. A client that said ``HELLO 3`` gets RESP3 (maps,
``_`` nulls); every other client gets RESP2 (flat arrays, ``$-1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["encode", "error", "simple", "bulk", "Simple"]

CRLF = b"\r\n"


class Simple(str):
    """A value to send as a RESP simple string (``+OK``) instead of a bulk string."""

    __slots__ = ()


def simple(text: str) -> bytes:
    """``+text``: the text must not contain CR or LF."""
    return b"+" + _line(text) + CRLF


def error(text: str) -> bytes:
    """``-text``: the text starts with an error code (``ERR``, ``NOPERM``, ...), one line."""
    return b"-" + _line(text) + CRLF


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def encode(value: object, *, resp3: bool = False) -> bytes:
    """Encode a Python value: None, bool, int, float, str/bytes (bulk), Simple, list, dict."""
    out: list[bytes] = []
    _encode(value, resp3, out)
    return b"".join(out)


def _encode(value: object, resp3: bool, out: list[bytes]) -> None:
    if value is None:
        out.append(b"_\r\n" if resp3 else b"$-1\r\n")
    elif isinstance(value, Simple):
        out.append(simple(value))
    elif isinstance(value, bool):
        if resp3:
            out.append(b"#t\r\n" if value else b"#f\r\n")
        else:
            out.append(b":1\r\n" if value else b":0\r\n")
    elif isinstance(value, int):
        out.append(b":%d\r\n" % value)
    elif isinstance(value, float):
        text = repr(value).encode()
        out.append(b",%s\r\n" % text if resp3 else bulk(text))
    elif isinstance(value, str):
        out.append(bulk(value.encode("utf-8", "surrogateescape")))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out.append(bulk(bytes(value)))
    elif isinstance(value, Mapping):
        out.append(b"%%%d\r\n" % len(value) if resp3 else b"*%d\r\n" % (2 * len(value)))
        for key, item in value.items():
            _encode(key, resp3, out)
            _encode(item, resp3, out)
    elif isinstance(value, Sequence):
        out.append(b"*%d\r\n" % len(value))
        for item in value:
            _encode(item, resp3, out)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as RESP")


def _line(text: str) -> bytes:
    # A CR or LF inside a simple string or error would end the frame early and desynchronise
    # the client, so they are replaced rather than trusted.
    # surrogateescape: text decoded that way (a client's raw bytes) is sent back byte for byte.
    return text.replace("\r", " ").replace("\n", " ").encode("utf-8", "surrogateescape")
