"""Replies of a command split across cluster nodes, merged into the one reply a single Redis gives.

Sans-IO: raw reply frames in (as :mod:`protocol.reply_scan` cuts them), raw reply bytes out. Every
merge gives the first error among the parts when there is one (Redis would have refused the whole
command), and otherwise:

- :func:`in_key_order` (MGET): the elements put back in the order the client named the keys;
- :func:`summed` (DEL, EXISTS, UNLINK, TOUCH, DBSIZE): one integer, the sum;
- :func:`first` (MSET, FLUSHALL, SCRIPT LOAD, ...): the first part's reply;
- :func:`concatenated` (KEYS): one array of every part's elements.

:func:`scan_cursor` / :func:`scan_reply` put the node index into SCAN's cursor, and
:func:`info_as_single` makes ``INFO`` read ``cluster_enabled:0`` and adds the proxy's section.
"""

from __future__ import annotations

from collections.abc import Sequence

from protocol.reply_scan import split_aggregate

#: SCAN cursors carry the node index in their low bits: at most this many masters.
SCAN_NODE_BITS = 10
_NODE_MASK = (1 << SCAN_NODE_BITS) - 1


def first_error(parts: Sequence[bytes]) -> bytes | None:
    for raw in parts:
        if raw[:1] in (b"-", b"!"):
            return raw
    return None


def first(parts: Sequence[bytes]) -> bytes:
    return first_error(parts) or parts[0]


def summed(parts: Sequence[bytes]) -> bytes:
    error = first_error(parts)
    if error is not None:
        return error
    return b":%d\r\n" % sum(int(raw[1:-2]) for raw in parts)


def in_key_order(parts: Sequence[bytes], positions: Sequence[Sequence[int]], total: int) -> bytes:
    """``positions[i]``: where in the client's key list each element of ``parts[i]`` belongs."""
    error = first_error(parts)
    if error is not None:
        return error
    out: list[bytes] = [b""] * total
    for raw, where in zip(parts, positions):
        _, elements = split_aggregate(raw)
        for index, element in zip(where, elements):
            out[index] = element
    return b"*%d\r\n" % total + b"".join(out)


def concatenated(parts: Sequence[bytes]) -> bytes:
    error = first_error(parts)
    if error is not None:
        return error
    elements: list[bytes] = []
    header = b"*"
    for raw in parts:
        head, items = split_aggregate(raw)
        header = head[:1]
        elements += items
    return header + b"%d\r\n" % len(elements) + b"".join(elements)


def scan_cursor(cursor: int) -> tuple[int, int]:
    """A client's SCAN cursor -> (node index, that node's own cursor)."""
    return cursor & _NODE_MASK, cursor >> SCAN_NODE_BITS


def scan_reply(raw: bytes, node: int, nodes: int) -> bytes:
    """One node's SCAN reply, its cursor rewritten: the next node starts where this one ends."""
    if raw[:1] in (b"-", b"!"):
        return raw
    _, (cursor_frame, keys) = split_aggregate(raw)
    own = int(cursor_frame.split(b"\r\n")[1])  # `$<n>\r\n<digits>\r\n`
    if own != 0:
        merged = own << SCAN_NODE_BITS | node
    elif node + 1 < nodes:
        merged = node + 1
    else:
        merged = 0
    text = b"%d" % merged
    return b"*2\r\n$%d\r\n%s\r\n%s" % (len(text), text, keys)


def info_as_single(raw: bytes, section: bytes) -> bytes:
    """An INFO reply (bulk or RESP3 verbatim) as a single Redis would give it, plus ``section``
    (``b""`` for none): ``cluster_enabled:1`` reads ``cluster_enabled:0``."""
    if raw[:1] not in (b"$", b"="):
        return raw
    header_end = raw.index(b"\r\n")
    body = raw[header_end + 2:-2].replace(b"cluster_enabled:1", b"cluster_enabled:0")
    if section:
        body = body.rstrip(b"\r\n") + b"\r\n\r\n" + section
    return raw[:1] + b"%d\r\n" % len(body) + body + b"\r\n"
