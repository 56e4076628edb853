"""Event classes, notify-keyspace-events updates and the message body."""

from __future__ import annotations

import pytest

from protocol.events import (
    ALL_ALIAS,
    CLASS_LETTERS,
    encode_body,
    event_class,
    format_classes,
    notify_flags_update,
    parse_classes,
)

# peers-and-facts.md 2.3, row by row.
TABLE = {
    "g": "del rename_from rename_to move_from move_to copy_to restore expire persist",
    "$": "set setrange incrby incrbyfloat append setbit pfadd",
    "l": "lpush rpush lpop rpop linsert lset ltrim lrem sortstore",
    "s": "sadd srem spop sinterstore sunionstore sdiffstore",
    "h": "hset hdel hincrby hincrbyfloat hexpire hexpired hpersist",
    "z": "zadd zincr zrem zremrangebyrank zremrangebyscore zremrangebylex zpopmin zpopmax"
    " zunionstore zinterstore zdiffstore zrangestore georadiusstore geosearchstore",
    "t": "xadd xtrim xdel xsetid xgroup-create xgroup-setid xgroup-destroy xgroup-delconsumer"
    " xgroup-createconsumer",
    "x": "expired",
    "e": "evicted",
    "m": "keymiss",
    "n": "new",
}
ROWS = [(name.encode(), letter) for letter, names in TABLE.items() for name in names.split()]


@pytest.mark.parametrize(("event", "letter"), ROWS, ids=[e.decode() for e, _ in ROWS])
def test_event_class_table(event: bytes, letter: str) -> None:
    assert event_class(event) == letter


def test_traps_in_the_table() -> None:
    assert event_class(b"hexpired") == "h"  # not x
    assert event_class(b"sortstore") == "l"  # not g
    assert event_class(b"expire") == "g" and event_class(b"expired") == "x"


@pytest.mark.parametrize("event", [b"json.set", b"ts.add", b"", b"SET", b"set\x00"])
def test_unknown_names_are_module_events(event: bytes) -> None:
    assert event_class(event) == "d"


@pytest.mark.parametrize("event", [b"overwritten", b"type_changed"])
def test_unselectable_classes_give_none(event: bytes) -> None:
    assert event_class(event) is None


def test_parse_classes() -> None:
    assert parse_classes("xe") == {"x", "e"}
    assert parse_classes("") == frozenset()
    assert parse_classes("A") == set("g$lshztxed") == ALL_ALIAS
    assert parse_classes("Amn") == set("g$lshztxedmn")
    assert parse_classes("xxe") == {"x", "e"}
    assert parse_classes(CLASS_LETTERS) == set(CLASS_LETTERS)
    assert "m" not in parse_classes("A") and "n" not in parse_classes("A")


@pytest.mark.parametrize("bad", ["K", "E", "q", "xeK", "o", "c", " ", "a"])
def test_parse_classes_rejects_other_letters(bad: str) -> None:
    letter = next(c for c in bad if c not in CLASS_LETTERS + "A")
    with pytest.raises(ValueError, match=repr(letter)):
        parse_classes(bad)


def test_format_classes() -> None:
    assert format_classes({"e", "x"}) == "xe"
    assert format_classes(parse_classes("A")) == "g$lshzxetd"
    assert format_classes(()) == ""


@pytest.mark.parametrize(
    ("current", "wanted", "expected"),
    [
        ("AKE", "xe", None),
        ("AKE", "A", None),
        ("AKE", "", None),
        ("xE", "xe", "xEe"),
        ("", "xe", "xeE"),
        ("", "", "E"),
        ("Kx", "xe", "KxeE"),
        ("Ex", "xe", "Exe"),
        ("xeE", "xe", None),
        ("gKE", "A", "gKE$lshzxetd"),
        ("AKE", "m", "AKEm"),
        ("AK", "x", "AKE"),
        ("xEo", "x", None),  # letters this code does not know stay as they are
    ],
)
def test_notify_flags_update(current: str, wanted: str, expected: str | None) -> None:
    result = notify_flags_update(current, parse_classes(wanted))
    assert result == expected
    if result is not None:
        assert set(current) <= set(result)
        assert notify_flags_update(result, parse_classes(wanted)) is None


def test_notify_flags_update_accepts_a_in_wanted() -> None:
    assert notify_flags_update("E", "A") == "Eg$lshzxetd"


@pytest.mark.parametrize(
    ("db", "event", "key", "body"),
    [
        (0, b"set", b"foo", b"0\nset\nfoo"),
        (0, b"expire", b"foo", b"0\nexpire\nfoo"),
        (3, b"lpush", b"mylist", b"3\nlpush\nmylist"),
        (0, b"set", b"a\nb", b"0\nset\na\nb"),
        (0, b"set", b"nul\x00tail", b"0\nset\nnul\x00tail"),
        (0, b"set", b"\xff\xfe", b"0\nset\n\xff\xfe"),
        (0, b"set", b"", b"0\nset\n"),
        (15, b"expired", b"k", b"15\nexpired\nk"),
    ],
)
def test_encode_body(db: int, event: bytes, key: bytes, body: bytes) -> None:
    assert encode_body(db, event, key) == body


def test_encode_body_large_key() -> None:
    key = b"k" * (9 * 1024 * 1024)  # the size that crashed the module
    assert encode_body(0, b"set", key) == b"0\nset\n" + key
