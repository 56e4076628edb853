"""``protocol.integers.string2ll``: Redis's integer syntax, byte for byte."""

from __future__ import annotations

import pytest

from protocol.integers import LLONG_MAX, LLONG_MIN, string2ll


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"0", 0),
        (b"7", 7),
        (b"-1", -1),
        (b"10000000", 10_000_000),
        (b"9223372036854775807", LLONG_MAX),
        (b"-9223372036854775808", LLONG_MIN),
        ("42", 42),
    ],
)
def test_accepted(text: bytes | str, value: int) -> None:
    assert string2ll(text) == value


@pytest.mark.parametrize(
    "text",
    [
        b"", b"-", b"+5", b" 5", b"5 ", b"5\r\n", b"1_000", b"05", b"00", b"-0", b"-05", b"0x10",
        b"1e3", b"5.0", b"9223372036854775808", b"-9223372036854775809",
        b"999999999999999999999999999999", b"1" * 10_000, "\u0663".encode(), "\u0663", "\uff15",
        "\U0001d7d3",
    ],
)
def test_refused(text: bytes | str) -> None:
    assert string2ll(text) is None


def test_a_bytearray_is_read_like_bytes() -> None:
    # The exact request parser hands over slices of its buffer.
    assert string2ll(bytearray(b"-12")) == -12
    assert string2ll(bytearray(b"012")) is None
