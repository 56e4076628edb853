"""Key slots and key positions: Redis's own values, checked without a server."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocol.slots import UNKNOWN, crc16, key_slot, keys_of


def test_crc16_reference_value() -> None:
    # The check value of CRC16/XMODEM, and the example in the Redis Cluster specification.
    assert crc16(b"123456789") == 0x31C3


def test_slots_redis_reports() -> None:
    # Values from `CLUSTER KEYSLOT` on redis-server 7.0.
    assert key_slot(b"foo") == 12182
    assert key_slot(b"bar") == 5061
    assert key_slot(b"") == 0
    assert key_slot(b"user:1000") == 1649


def test_hash_tags() -> None:
    assert key_slot(b"{user1000}.following") == key_slot(b"user1000")
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}")  # empty tag: the whole key
    assert key_slot(b"foo{}{bar}") != key_slot(b"bar")
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")
    assert key_slot(b"foo{bar}{zap}") == key_slot(b"bar")
    assert key_slot(b"no{close") == crc16(b"no{close") % 16384


@given(st.binary(max_size=40), st.binary(min_size=1, max_size=10).filter(lambda t: b"}" not in t))
def test_tag_decides(prefix: bytes, tag: bytes) -> None:
    assert key_slot(prefix.replace(b"{", b"") + b"{" + tag + b"}tail") == key_slot(tag)


def test_key_positions() -> None:
    assert keys_of([b"GET", b"k"]) == [b"k"]
    assert keys_of([b"mset", b"a", b"1", b"b", b"2"]) == [b"a", b"b"]
    assert keys_of([b"DEL", b"a", b"b", b"c"]) == [b"a", b"b", b"c"]
    assert keys_of([b"BLPOP", b"a", b"b", b"0"]) == [b"a", b"b"]
    assert keys_of([b"EVAL", b"s", b"2", b"a", b"b", b"x"]) == [b"a", b"b"]
    assert keys_of([b"EVAL", b"s", b"0"]) == []
    assert keys_of([b"ZUNIONSTORE", b"d", b"2", b"a", b"b", b"WEIGHTS", b"1", b"2"]) == [b"d", b"a", b"b"]
    assert keys_of([b"LMPOP", b"2", b"a", b"b", b"LEFT"]) == [b"a", b"b"]
    assert keys_of([b"BLMPOP", b"0", b"1", b"a", b"LEFT"]) == [b"a"]
    assert keys_of([b"XREAD", b"COUNT", b"2", b"STREAMS", b"s1", b"s2", b"0", b"0"]) == [b"s1", b"s2"]
    assert keys_of([b"BITOP", b"AND", b"d", b"a", b"b"]) == [b"d", b"a", b"b"]
    assert keys_of([b"RENAME", b"a", b"b"]) == [b"a", b"b"]
    assert keys_of([b"SORT", b"a", b"LIMIT", b"0", b"1", b"STORE", b"d"]) == [b"a", b"d"]
    assert keys_of([b"OBJECT", b"ENCODING", b"k"]) == [b"k"]
    assert keys_of([b"MEMORY", b"USAGE", b"k"]) == [b"k"]
    assert keys_of([b"XGROUP", b"CREATE", b"s", b"g", b"$"]) == [b"s"]
    assert keys_of([b"PING"]) == []
    assert keys_of([b"GET"]) == []  # Redis answers the arity error
    assert keys_of([b"NOSUCHCOMMAND", b"x"]) is UNKNOWN
