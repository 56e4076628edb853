"""``protocol.commands.encode_command``: the one request encoder, byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.commands import encode_command
from protocol.requests import Request, RequestParser


def by_hand(*args: bytes | str | int) -> bytes:
    """The multibulk form spelled out (what the proxy's encoders wrote before hiredis did it)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


@pytest.mark.parametrize(
    "args",
    [
        (b"PING",),
        (b"SET", b"k", b""),
        ("CONFIG", "SET", "key-evt-amqp-authority-probe", "1"),
        ("AUTH", "user", "pässword"),
        (b"LTRIM", b"key", -100, -1),
        ("SELECT", 0),
        ("X", 2**63 - 1, -(2**63)),
        (b"\x00\xff\r\n*$",),
        (),
    ],
)
def test_same_bytes_as_by_hand(args: tuple[bytes | str | int, ...]) -> None:
    assert encode_command(*args) == by_hand(*args)


args_strategy = st.lists(
    st.one_of(st.binary(max_size=30), st.text(max_size=10), st.integers(-(2**70), 2**70)), min_size=1, max_size=8
)


@given(args_strategy)
def test_any_bytes_str_int_args_encode_as_by_hand(args: list[bytes | str | int]) -> None:
    assert encode_command(*args) == by_hand(*args)


@given(st.lists(st.binary(max_size=30), min_size=1, max_size=8))
def test_the_exact_parser_reads_back_what_was_encoded(args: list[bytes]) -> None:
    parser = RequestParser()
    data = encode_command(*args)
    parser.feed(data)
    request = parser.next_request()
    assert isinstance(request, Request)
    assert request.args == tuple(args) and request.end == len(data)


def test_no_silent_guess_for_other_types() -> None:
    # str(True) would be "True" and Redis wants 1 or 0: the caller must say which.
    with pytest.raises(TypeError):
        encode_command("SET", "k", True)
    with pytest.raises(TypeError):
        encode_command("SET", "k", bytearray(b"v"))  # type: ignore[arg-type]
