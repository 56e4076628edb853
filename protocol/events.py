"""Keyspace event classes, Redis's ``notify-keyspace-events`` letters, and the message body.

An event is selected by its class letter (the ``--events`` setting, the module's load flags):
``g`` generic (del, expire, rename_from…), ``$`` string, ``l`` list, ``s`` set, ``h`` hash
(hexpired included), ``z`` sorted set, ``x`` expired, ``e`` evicted, ``t`` stream, ``m`` key miss,
``n`` new key, ``d`` module types (any name Redis itself does not emit), and ``A`` for
``g$lshztxed`` (Redis's meaning; the module's README predates ``t`` and ``d``).

Redis emits each event name under exactly one class; :func:`event_class` gives it. The proxy
needs Redis to publish ``__keyevent@<db>__:<event>`` messages (letter ``E``) for the classes it
selects: :func:`notify_flags_update` computes the ``CONFIG SET`` value without dropping what
another user of the same Redis already enabled.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ALL_ALIAS",
    "CLASS_LETTERS",
    "encode_body",
    "event_class",
    "format_classes",
    "notify_flags_update",
    "parse_classes",
]

#: Every class letter the proxy can select, in Redis's canonical order.
CLASS_LETTERS = "g$lshzxetmnd"

#: What ``A`` stands for (Redis's NOTIFY_ALL: not m, n, or the 8.2 letters o, c).
ALL_ALIAS = frozenset("g$lshztxed")

_LETTER_SET = frozenset(CLASS_LETTERS)

# Event name -> class letter (peers-and-facts 2.3). None marks names Redis emits under a class the
# proxy cannot select (8.2's ``o`` and ``c``): they are never forwarded, even with ``d``.
_CLASS_OF: dict[bytes, str | None] = {}
for _letter, _names in (
    ("g", "del rename_from rename_to move_from move_to copy_to restore expire persist"),
    ("$", "set setrange incrby incrbyfloat append setbit pfadd"),
    ("l", "lpush rpush lpop rpop linsert lset ltrim lrem sortstore"),
    ("s", "sadd srem spop sinterstore sunionstore sdiffstore"),
    ("h", "hset hdel hincrby hincrbyfloat hexpire hexpired hpersist"),
    (
        "z",
        # zrembyrank / zrembyscore: the names the docs give (the source emits zremrangeby*).
        "zadd zincr zrem zremrangebyrank zremrangebyscore zremrangebylex zrembyrank zrembyscore"
        " zpopmin zpopmax zunionstore zinterstore zdiffstore zrangestore georadiusstore"
        " geosearchstore",
    ),
    (
        "t",
        "xadd xtrim xdel xsetid xgroup-create xgroup-setid xgroup-destroy xgroup-delconsumer"
        " xgroup-createconsumer",
    ),
    ("x", "expired"),
    ("e", "evicted"),
    ("m", "keymiss"),
    ("n", "new"),
):
    for _name in _names.split():
        _CLASS_OF[_name.encode()] = _letter
for _name in ("overwritten", "type_changed"):
    _CLASS_OF[_name.encode()] = None
del _letter, _names, _name


def parse_classes(spec: str) -> frozenset[str]:
    """The class letters selected by ``spec`` (``A`` expanded). ``""`` selects nothing.

    Raises ``ValueError`` naming the first unknown letter (``K`` and ``E`` included: they are
    channel families, which the proxy manages itself).
    """
    classes: set[str] = set()
    for letter in spec:
        if letter == "A":
            classes |= ALL_ALIAS
        elif letter in _LETTER_SET:
            classes.add(letter)
        else:
            raise ValueError(
                f"unknown event class {letter!r}: expected letters from {CLASS_LETTERS}A"
            )
    return frozenset(classes)


def format_classes(classes: Iterable[str]) -> str:
    """Letters in Redis's canonical order, e.g. ``{"e", "x"}`` -> ``"xe"`` (``A`` is not folded)."""
    chosen = set(classes)
    return "".join(letter for letter in CLASS_LETTERS if letter in chosen)


def event_class(event: bytes) -> str | None:
    """The class letter of an event name; unknown names are module events (``d``).

    None means the event belongs to a class the proxy never selects: drop it.
    """
    return _CLASS_OF.get(event, "d")


# Canonical CONFIG GET order (notify.c keyspaceEventsFlagsToString), then anything newer.
_NOTIFY_ORDER = "g$lshzxetdnKEm"


def notify_flags_update(current: str, wanted: Iterable[str]) -> str | None:
    """The ``notify-keyspace-events`` value to ``CONFIG SET``, or None if ``current`` suffices.

    ``current`` is what ``CONFIG GET notify-keyspace-events`` returned (canonical, e.g. ``AKE``).
    The result keeps every letter of ``current`` (``K``, and letters this code does not know, such
    as ``o``) and adds ``E`` and the ``wanted`` classes that are missing. Redis leaves ``n`` out of
    the canonical string when ``A`` is set, so asking for ``n`` then always yields an update; it is
    harmless to apply again.
    """
    have = set(current)
    if "A" in have:
        have |= ALL_ALIAS
    needed = {"E"}
    for letter in wanted:
        needed |= ALL_ALIAS if letter == "A" else {letter}
    missing = needed - have
    if not missing:
        return None
    order = _NOTIFY_ORDER + "".join(sorted(missing - set(_NOTIFY_ORDER)))
    return current + "".join(letter for letter in order if letter in missing)


def encode_body(db: int, event: bytes, key: bytes) -> bytes:
    """The AMQP message body, as the module sends it: ``b"<db>\\n<event>\\n<key>"``.

    There is no trailing newline, and the key is passed whole (NUL and newlines included), so a
    consumer splits on the first two newlines only.
    """
    return b"%d\n%b\n%b" % (db, event, key)
