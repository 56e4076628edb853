"""The request parser: byte-level cases, split-invariance properties, and a check against real Redis.

The expected error texts and edge cases below were first read off a real redis-server 7.0; the
``real_redis`` tests at the end keep checking them on every run.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import hiredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import NEED_DATA, ProtocolError, Request, RequestParser
from protocol.requests import KEEP_ALL, KeptTooLong, split_args
from protocol.errors import Error

KIB = 1024
MAX_INLINE = 64 * KIB


def parse_all(data: bytes, **limits: int) -> list[Request]:
    parser = RequestParser(**limits)
    parser.feed(data)
    return drain(parser)


def drain(parser: RequestParser) -> list[Request]:
    requests = []
    while (request := parser.next_request()) is not NEED_DATA:
        requests.append(request)
    return requests


def args_of(data: bytes, **limits: int) -> list[tuple[bytes, ...]]:
    return [request.args for request in parse_all(data, **limits)]


def error_of(data: bytes, **limits: int) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_all(data, **limits)
    return info.value.message


def outcome(chunks: list[bytes], **limits: int) -> tuple[list[Request], str | None, int]:
    """Requests, the error text (or None) and the final offset after feeding ``chunks`` in turn."""
    parser = RequestParser(**limits)
    requests: list[Request] = []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            while (request := parser.next_request()) is not NEED_DATA:
                requests.append(request)
    except ProtocolError as exc:
        return requests, exc.message, parser.offset
    return requests, None, parser.offset


# --- the sentinel and the errors -------------------------------------------------------------


def test_need_data_is_a_readable_truthy_singleton() -> None:
    assert repr(NEED_DATA) == "NEED_DATA" == str(NEED_DATA)
    assert NEED_DATA is not None and NEED_DATA is not False and bool(NEED_DATA)
    assert RequestParser().next_request() is NEED_DATA


def test_protocol_error_reply_is_the_resp_error_line() -> None:
    exc = ProtocolError("ERR Protocol error: invalid multibulk length")
    assert isinstance(exc, Error)
    assert exc.reply == b"-ERR Protocol error: invalid multibulk length\r\n"
    assert ProtocolError("ERR got '\xff'").reply == b"-ERR got '\xff'\r\n"


# --- multibulk --------------------------------------------------------------------------------


def test_multibulk_requests_and_offsets() -> None:
    data = b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
    first, second = parse_all(data)
    assert first == Request((b"PING",), 0, 14, False)
    assert second == Request((b"SET", b"k", b""), 14, len(data), False)


def test_binary_args_pass_through_untouched() -> None:
    payload = bytes(range(256)) + b"\r\n$0\r\n*1\r\n"
    data = b"*2\r\n$4\r\nECHO\r\n$%d\r\n%s\r\n" % (len(payload), payload)
    assert args_of(data) == [(b"ECHO", payload)]


def test_ignored_multibulks_are_consumed_between_requests() -> None:
    data = b"*0\r\n*-1\r\n*-9223372036854775808\r\n*1\r\n$4\r\nPING\r\n*0\r\n"
    parser = RequestParser()
    parser.feed(data)
    assert drain(parser) == [Request((b"PING",), 32, 46, False)]
    assert parser.offset == len(data) and parser.buffered == 0


def test_bytes_after_a_bulk_and_after_a_header_cr_are_skipped_unread() -> None:
    # Redis skips 2 bytes after each bulk and 1 after each header's CR without looking at them.
    assert args_of(b"*1\r\n$4\r\nPINGxx*1\rX$4\rYPING\r\n") == [(b"PING",), (b"PING",)]


def test_header_waits_for_the_byte_after_its_cr() -> None:
    parser = RequestParser()
    parser.feed(b"*1\r")
    assert parser.next_request() is NEED_DATA
    parser.feed(b"\n$4\r")
    assert parser.next_request() is NEED_DATA
    parser.feed(b"\nPING\r")
    assert parser.next_request() is NEED_DATA
    parser.feed(b"\n")
    assert parser.next_request() == Request((b"PING",), 0, 14, False)


@pytest.mark.parametrize(
    "count", [b"", b"+1", b"01", b" 1", b"1 ", b"-0", b"1x", b"0x1", b"2147483648", b"-9223372036854775809"]
)
def test_invalid_multibulk_length(count: bytes) -> None:
    assert error_of(b"*" + count + b"\r\n") == "ERR Protocol error: invalid multibulk length"


def test_multibulk_count_limit_is_int_max_in_redis_7() -> None:
    parser = RequestParser()
    parser.feed(b"*2147483647\r\n")
    assert parser.next_request() is NEED_DATA
    assert error_of(b"*11\r\n", max_multibulk=10) == "ERR Protocol error: invalid multibulk length"


@pytest.mark.parametrize("length", [b"", b"-1", b"+4", b"04", b"4 ", b"-0", b"536870913", b"99999999999999999999"])
def test_invalid_bulk_length(length: bytes) -> None:
    assert error_of(b"*1\r\n$" + length + b"\r\n") == "ERR Protocol error: invalid bulk length"


def test_bulk_length_limit_is_inclusive() -> None:
    parser = RequestParser()
    parser.feed(b"*1\r\n$536870912\r\n")
    assert parser.next_request() is NEED_DATA
    assert args_of(b"*1\r\n$3\r\nabc\r\n", max_bulk=3) == [(b"abc",)]
    assert error_of(b"*1\r\n$4\r\n", max_bulk=3) == "ERR Protocol error: invalid bulk length"


@pytest.mark.parametrize(
    ("line", "shown"),
    [(b"x4", b"x"), (b"*1", b"*"), (b"", b" "), (b"\n", b" "), (b"\t", b"\t"), (b"\x01", b"\x01"), (b"\xff", b"\xff")],
)
def test_expected_dollar_echoes_the_byte_raw_but_cr_and_lf_as_space(line: bytes, shown: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_all(b"*1\r\n" + line + b"\r\n")
    assert info.value.reply == b"-ERR Protocol error: expected '$', got '" + shown + b"'\r\n"


def test_expected_dollar_waits_for_the_whole_line() -> None:
    parser = RequestParser()
    parser.feed(b"*1\r\nx4")
    assert parser.next_request() is NEED_DATA
    parser.feed(b"\r")
    assert parser.next_request() is NEED_DATA
    parser.feed(b"\n")
    with pytest.raises(ProtocolError, match="expected '\\$', got 'x'"):
        parser.next_request()


# --- inline -----------------------------------------------------------------------------------


def test_inline_requests_and_offsets() -> None:
    data = b"PING\r\nset \"a b\" c\n  \r\n\n\r\nGET k\r\r\n"
    assert parse_all(data) == [
        Request((b"PING",), 0, 6, True),
        Request((b"set", b"a b", b"c"), 6, 18, True),
        Request((b"GET", b"k"), 25, len(data), True),
    ]


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (b'ECHO ""', (b"ECHO", b"")),  # empty arguments are kept (7.0 sends "$0")
        (b'""', (b"",)),
        (b"\x0b\x0cECHO a", (b"ECHO", b"a")),  # \v and \f are blanks between arguments...
        (b"ECHO a\x0bb", (b"ECHO", b"a\x0bb")),  # ...but ordinary bytes inside one
        (b'ECHO "a"\x0bb', (b"ECHO", b"a", b"b")),
        (b"ECHO a\rb", (b"ECHO", b"a", b"b")),
        (b"ECHO\ta", (b"ECHO", b"a")),
        (b'ECHO a"b c"', (b"ECHO", b"ab c")),  # a quote may open mid-argument
        (b"ECHO a'b c'", (b"ECHO", b"ab c")),
        (b"ECHO 'a\\'b'", (b"ECHO", b"a'b")),
        (b"ECHO 'a\\nb\\\\x'", (b"ECHO", b"a\\nb\\\\x")),  # single quotes escape only \'
        (b'ECHO "\\x41\\x4g\\q\\n\\\\"', (b"ECHO", b"Ax4gq\n\\")),
        (b'ECHO "\\r\\t\\b\\a\\"\\x00\\xfF"', (b"ECHO", b"\r\t\b\a\"\x00\xff")),
        (b'ECHO "it\'s"', (b"ECHO", b"it's")),
        (b"ECHO '\"'", (b"ECHO", b'"')),
        (b"ECHO \xa0\x85", (b"ECHO", b"\xa0\x85")),  # not blanks in the C locale
        (b"ECHO *", (b"ECHO", b"*")),
        (b" *1", (b"*1",)),  # only a "*" in first position opens a multibulk
    ],
)
def test_inline_splitting(line: bytes, args: tuple[bytes, ...]) -> None:
    assert args_of(line + b"\r\n") == [args]
    assert args_of(line + b"\n") == [args]


@pytest.mark.parametrize(
    "line",
    [b'ECHO "abc', b"ECHO 'abc", b'ECHO "a"b', b"ECHO 'a'b", b'ECHO "a\\"', b"ECHO 'a\\'", b'"', b'ECHO "a""b"'],
)
def test_unbalanced_quotes(line: bytes) -> None:
    assert error_of(line + b"\r\n") == "ERR Protocol error: unbalanced quotes in request"


# --- limits -----------------------------------------------------------------------------------

TOO_BIG = [
    (b"", b"A", "ERR Protocol error: too big inline request"),
    (b"", b"*", "ERR Protocol error: too big mbulk count string"),
    (b"*1\r\n", b"$", "ERR Protocol error: too big bulk count string"),
    (b"*1\r\n", b"X", "ERR Protocol error: too big bulk count string"),  # judged before the "$"
]


@pytest.mark.parametrize(("prefix", "head", "message"), TOO_BIG)
def test_a_partial_line_over_the_limit_fails_at_once(prefix: bytes, head: bytes, message: str) -> None:
    parser = RequestParser()
    parser.feed(prefix + head + b"1" * (MAX_INLINE - 1))
    assert parser.next_request() is NEED_DATA
    assert parser.buffered == MAX_INLINE
    parser.feed(b"1")
    with pytest.raises(ProtocolError) as info:
        parser.next_request()
    assert info.value.message == message


WHOLE_LINE_VERDICTS = [
    (b"", b"*", "ERR Protocol error: invalid multibulk length"),
    (b"*1\r\n", b"$", "ERR Protocol error: invalid bulk length"),
    (b"*1\r\n", b"X", "ERR Protocol error: expected '$', got 'X'"),
]


@pytest.mark.parametrize(("prefix", "head", "message"), WHOLE_LINE_VERDICTS)
def test_a_whole_header_line_over_the_limit_is_judged_by_its_content(
    prefix: bytes, head: bytes, message: str
) -> None:
    # Redis checks the length only while no terminator has arrived; a whole header line that long
    # holds more than the 20 bytes string2ll takes, so it is refused for what it says.
    assert error_of(prefix + head + b"1" * MAX_INLINE + b"\r\n") == message


def test_a_whole_inline_line_over_the_limit_is_accepted() -> None:
    # Redis's rule: "too big inline request" only while no newline is buffered.
    assert args_of(b"ECHO " + b"a" * 70_000 + b"\r\n") == [(b"ECHO", b"a" * 70_000)]
    assert args_of(b"ECHO 123456789\n", max_inline=9) == [(b"ECHO", b"123456789")]


def test_lines_at_the_limit_are_accepted() -> None:
    line = b"ECHO " + b"a" * (MAX_INLINE - 6) + b"\r"
    assert args_of(line + b"\n") == [(b"ECHO", b"a" * (MAX_INLINE - 6))]
    assert error_of(b"*" + b"1" * (MAX_INLINE - 1) + b"\r\n") == "ERR Protocol error: invalid multibulk length"


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        (b"PING\0", "ERR Protocol error: too big inline request"),
        (b"*1\0", "ERR Protocol error: too big mbulk count string"),
        (b"*1\r\n$4\0", "ERR Protocol error: too big bulk count string"),
    ],
)
def test_a_nul_before_the_line_end_means_the_line_never_ends(prefix: bytes, message: str) -> None:
    parser = RequestParser(max_inline=100)
    parser.feed(prefix + b"\r\n")
    assert parser.next_request() is NEED_DATA
    parser.feed(b"\r\n" * 45)
    assert parser.next_request() is NEED_DATA
    parser.feed(b"\r\n" * 10)
    with pytest.raises(ProtocolError) as info:
        parser.next_request()
    assert info.value.message == message


def test_a_nul_inside_a_bulk_is_just_data() -> None:
    assert args_of(b"*1\r\n$3\r\na\0b\r\n") == [(b"a\0b",)]


def test_a_dead_parser_raises_the_same_error_forever() -> None:
    parser = RequestParser()
    parser.feed(b"*1\r\n$4\r\nPING\r\n*x\r\nPING\r\n")
    assert parser.next_request().args == (b"PING",)  # type: ignore[union-attr]
    with pytest.raises(ProtocolError) as info:
        parser.next_request()
    for call in (parser.next_request, lambda: parser.feed(b"PING\r\n")):
        with pytest.raises(ProtocolError) as again:
            call()
        assert again.value is info.value
    assert parser.buffered == 0 and parser.offset == 14


def test_a_big_bulk_in_small_chunks_parses_in_linear_time() -> None:
    payload = bytes(range(256)) * (20 * KIB * KIB // 256)
    data = b"*2\r\n$3\r\nSET\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n" % (len(payload), payload)
    parser, requests, most = RequestParser(), [], 0
    began = time.perf_counter()
    for at in range(0, len(data), 64 * KIB):
        parser.feed(data[at : at + 64 * KIB])
        requests += drain(parser)
        most = max(most, parser.buffered)
    elapsed = time.perf_counter() - began
    assert [r.args for r in requests] == [(b"SET", payload), (b"PING",)]
    assert requests[1].end == len(data)
    assert most <= len(payload) + 2
    assert elapsed < 2.0, f"{elapsed:.2f}s for 20 MB"


def test_a_long_line_fed_byte_by_byte_is_scanned_once() -> None:
    data = b"ECHO " + b"a" * (MAX_INLINE - 10) + b"\r\n"
    parser, requests = RequestParser(), []
    began = time.perf_counter()
    for at in range(len(data)):
        parser.feed(data[at : at + 1])
        requests += drain(parser)
    assert time.perf_counter() - began < 5.0
    assert requests == [Request((b"ECHO", b"a" * (MAX_INLINE - 10)), 0, len(data), True)]


def test_many_small_requests_in_one_chunk() -> None:
    data = b"*1\r\n$4\r\nPING\r\n" * 100_000
    began = time.perf_counter()
    requests = parse_all(data)
    assert time.perf_counter() - began < 5.0
    assert len(requests) == 100_000 and requests[-1].end == len(data)


# --- properties -------------------------------------------------------------------------------

any_arg = st.one_of(st.binary(max_size=40), st.just(bytes(range(256))), st.just(b""))
bare_safe = st.binary(min_size=1, max_size=10).filter(
    lambda b: not any(c in b for c in b" \t\n\r\v\f\"'\0") and not b.startswith(b"*")
)


def quoted(arg: bytes) -> bytes:
    """``arg`` as one double-quoted inline argument, escaping whatever could end the line."""
    out = bytearray(b'"')
    for byte in arg:
        if byte in b'"\\' or byte < 0x20 or byte >= 0x7F:
            out += b"\\x%02x" % byte
        else:
            out.append(byte)
    return bytes(out + b'"')


@st.composite
def valid_streams(draw: st.DrawFn) -> tuple[bytes, list[Request]]:
    data, expected = bytearray(), []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["multibulk", "inline", "ignored"]))
        start = len(data)
        if kind == "multibulk":
            args = draw(st.lists(any_arg, min_size=1, max_size=5))
            after = draw(st.sampled_from([b"\n", b"x"]))  # the byte after a header's CR is skipped
            data += b"*%d\r%s" % (len(args), after)
            for arg in args:
                data += b"$%d\r\n%s%s" % (len(arg), arg, draw(st.sampled_from([b"\r\n", b"??"])))
        elif kind == "inline":
            args = draw(st.lists(st.one_of(bare_safe, any_arg.map(quoted)), min_size=1, max_size=5))
            blank = draw(st.sampled_from([b" ", b"\t", b"  \x0b"]))
            data += draw(st.sampled_from([b"", b" "])) + blank.join(args) + draw(st.sampled_from([b"\n", b"\r\n"]))
            args = [parse_arg(arg) for arg in args]
        else:
            data += draw(st.sampled_from([b"*0\r\n", b"*-1\r\n", b"\r\n", b"\n", b"  \t\r\n"]))
            continue
        expected.append(Request(tuple(args), start, len(data), kind == "inline"))
    return bytes(data), expected


def parse_arg(token: bytes) -> bytes:
    return args_of(b"ECHO " + token + b"\n")[0][1]


def splits(data: bytes) -> st.SearchStrategy[list[bytes]]:
    cuts = st.lists(st.integers(0, len(data)), max_size=12).map(sorted)
    return cuts.map(lambda cut: [data[a:b] for a, b in zip([0, *cut], [*cut, len(data)], strict=True)])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_split_of_a_valid_stream_gives_the_same_requests(data: st.DataObject) -> None:
    stream, expected = data.draw(valid_streams())
    chunks = data.draw(splits(stream))
    assert outcome(chunks) == (expected, None, len(stream))
    assert outcome([bytes([b]) for b in stream]) == (expected, None, len(stream))


LIMITS = {"max_inline": 24, "max_bulk": 30, "max_multibulk": 6}
fragments = st.sampled_from(
    [b"*", b"$", b"\r", b"\n", b"\r\n", b"\0", b"-", b"0", b"1", b"3", b"7", b"99", b"+", b" ", b"x",
     b'"', b"'", b"\\", b"\\x4", b"f", b"PING", b"*1\r\n", b"$3\r\n", b"*-1\r\n", b"\xff", b"\x0b"]
)  # fmt: skip
structured = st.lists(st.one_of(fragments, st.binary(max_size=4)), max_size=60).map(b"".join)
garbage = st.one_of(st.binary(max_size=200), structured)


@settings(max_examples=500, deadline=None)
@given(garbage, st.data())
def test_garbage_only_raises_protocol_error_and_never_overfills(stream: bytes, data: st.DataObject) -> None:
    chunks = data.draw(splits(stream))
    # A line longer than max_inline is refused only if it is seen before its newline (Redis's rule),
    # so only shorter lines give the same verdict however the stream is split.
    split_invariant = all(len(line) <= LIMITS["max_inline"] for line in stream.split(b"\n"))
    parser, bound = RequestParser(**LIMITS), max(LIMITS["max_inline"] + 1, LIMITS["max_bulk"] + 2)
    try:
        for chunk in chunks:
            parser.feed(chunk)
            drain(parser)
            assert parser.buffered <= bound
    except ProtocolError as exc:
        assert exc.reply.startswith(b"-ERR Protocol error: ") and exc.reply.endswith(b"\r\n")
    # Whatever the input, how it was split never changes what comes out.
    if split_invariant:
        assert outcome(chunks, **LIMITS) == outcome([stream], **LIMITS)


# --- against a real redis-server 7.0 ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def real_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The port of a private redis-server, started for this module and stopped after it."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    workdir: Path = tmp_path_factory.mktemp("redis")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(workdir), "--logfile", str(workdir / "redis.log"), "--daemonize", "no"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(workdir / 'redis.log').read_text()}")
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def exchange(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send ``data`` raw, then read until Redis closes (True) or stays silent for a while (False)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = bytearray()
        sock.settimeout(0.3)
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return bytes(received), False
            if not chunk:
                return bytes(received), True
            received += chunk


PING = b"*1\r\n$4\r\nPING\r\n"
# Each input ends exactly where Redis gives up, so it closes with nothing left unread (a close
# with unread input sends a RST, which can destroy the error reply before we read it).
MALFORMED = [
    b"*x\r\n", b"*+1\r\n", b"*01\r\n", b"* 1\r\n", b"*-0\r\n", b"*\r\n", b"*2147483648\r\n",
    b"*-9223372036854775809\r\n", b"*1\r\n$-1\r\n", b"*1\r\n$+4\r\n", b"*1\r\n$04\r\n", b"*1\r\n$\r\n",
    b"*1\r\n$536870913\r\n", b"*1\r\nx4\r\n", b"*1\r\n\r\n", b"*1\r\n\n\r\n", b"*1\r\n\t\r\n",
    b"*1\r\n\x01\r\n", b"*1\r\n\xff4\r\n", b"*2\r\n$4\r\nECHO\r\n*1\r\n", PING + b"*1\r\n$4\r\nPINGxx*x\r\n",
    b'ECHO "abc\r\n', b"ECHO 'abc\n", b'ECHO "a"b\r\n', b"ECHO 'a'b\r\n", b'ECHO "a\\"\r\n',
    PING + b"PING\r\n" + b'"\r\n', b"A" * (MAX_INLINE + 1), b"*" + b"1" * MAX_INLINE,
    b"*1\r\n$" + b"1" * MAX_INLINE, b"*1\r\n" + b"X" * (MAX_INLINE + 1), PING + b"PING\0" + b"A" * (MAX_INLINE - 4),
    b"*1\0" + b"\r\n" * (MAX_INLINE // 2 - 1), b"*1\r\n$1\0" + b"\r\n" * (MAX_INLINE // 2 - 1),
]  # fmt: skip


@pytest.mark.parametrize("data", MALFORMED, ids=lambda data: repr(data[:24]))
def test_redis_sends_the_same_error_and_closes(real_redis: int, data: bytes) -> None:
    parser = RequestParser()
    parser.feed(data)
    requests = []
    with pytest.raises(ProtocolError) as info:
        while (request := parser.next_request()) is not NEED_DATA:
            requests.append(request)
    assert all(request.args[0] == b"PING" for request in requests)
    assert exchange(real_redis, data) == (b"+PONG\r\n" * len(requests) + info.value.reply, True)


@pytest.mark.parametrize("data", [b"*2147483647\r\n", b"*1\r\n$536870912\r\n", b"A" * MAX_INLINE, b"*1\r\nx4\r"])
def test_redis_waits_where_the_parser_does(real_redis: int, data: bytes) -> None:
    requests, error, _ = outcome([data])
    assert (requests, error) == ([], None)
    assert exchange(real_redis, data) == (b"", False)


inline_pieces = st.sampled_from(
    [b'"', b"'", b"\\", b" ", b"\t", b"\x0b", b"\x0c", b"\r", b"x", b"4", b"f", b"g", b"n", b"a",
     b"\xa0", b"\x85", b"\x01"]
)  # fmt: skip
inline_tails = st.lists(st.one_of(inline_pieces, st.binary(max_size=3)), max_size=20).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inline_tails.map(lambda tail: tail.replace(b"\n", b"").replace(b"\0", b"")))
def test_inline_splitting_matches_redis(real_redis: int, tail: bytes) -> None:
    # EVAL "return ARGV" echoes back exactly the arguments Redis split the line into.
    line = b'EVAL "return ARGV" 0 ' + tail + b"\r\n"
    try:
        (request,) = parse_all(line)
    except ProtocolError as exc:
        assert exchange(real_redis, line) == (exc.reply, True)
        return
    # QUIT answers +OK and closes, so no need to wait for silence.
    reply, closed = exchange(real_redis, line + b"QUIT\r\n")
    reader = hiredis.Reader()
    reader.feed(reply)
    assert (reader.gets(), reader.gets(), closed) == (list(request.args[3:]), b"OK", True)


@pytest.mark.parametrize(
    "tail",
    [b"a\x0bb", b"a\x0cb c\x0bd", b"\x0ba\x0c \x0cb\x0b", b"x \x0b\x0c y", b'"q"\x0bx', b"'q'\x0c", b'x\x0b"y z"'],
)
def test_split_args_matches_redis_on_vertical_tab_and_form_feed(real_redis: int, tail: bytes) -> None:
    # \v and \f are blanks between arguments but ordinary bytes inside an unquoted one (the
    # switch in sdssplitargs lists only ' ', \n, \r, \t): proxy/settings.py splits with this too.
    line = b'EVAL "return ARGV" 0 ' + tail
    reply, closed = exchange(real_redis, line + b"\r\nQUIT\r\n")
    reader = hiredis.Reader()
    reader.feed(reply)
    assert (reader.gets(), reader.gets(), closed) == (split_args(line)[3:], b"OK", True)


# --- streaming mode (the relay's exact path) --------------------------------------------------


def keep_for_tests(name: bytes) -> int:
    low = name.lower()
    if low.startswith(b"key_evt_amqp."):
        return KEEP_ALL
    return 2 if low in (b"hello", b"client") else 1


def test_streaming_keeps_only_what_was_asked_for() -> None:
    parser = RequestParser(keep=keep_for_tests)
    parser.feed(encode(b"SET", b"k", b"v" * 100) + encode(b"CLIENT", b"REPLY", b"OFF") + encode(b"key_evt_amqp.info", b"a"))
    requests = drain(parser)
    assert [(r.args, r.count, r.complete) for r in requests] == [
        ((b"SET",), 3, False),
        ((b"CLIENT", b"REPLY"), 3, False),
        ((b"key_evt_amqp.info", b"a"), 2, True),
    ]


def test_streaming_never_holds_a_body_nobody_asked_for() -> None:
    # A 512 MiB SET fed 1 MiB at a time: the parser holds nothing of it, and every byte of it
    # may be forwarded as soon as it arrived (the name showed it is not ours).
    parser = RequestParser(keep=keep_for_tests)
    head = b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$536870912\r\n"
    parser.feed(head)
    assert parser.next_request() is NEED_DATA
    assert parser.forwardable == len(head)
    fed = len(head)
    for _ in range(20):
        parser.feed(b"x" * KIB * KIB)
        fed += KIB * KIB
        assert parser.next_request() is NEED_DATA
        assert parser.buffered == 0 and parser.forwardable == fed


def test_streaming_holds_back_a_request_until_its_name_is_known() -> None:
    parser = RequestParser(keep=keep_for_tests)
    parser.feed(b"*1\r\n$4\r\nPING\r\n*2\r\n$17\r\nkey_evt")
    assert drain(parser)[0].args == (b"PING",)
    assert parser.forwardable == 14  # the unfinished one may be ours
    parser.feed(b"_amqp.info\r\n$1\r\n")
    assert parser.next_request() is NEED_DATA and parser.forwardable == 14  # it is: kept whole


def test_streaming_skips_a_name_longer_than_any_of_interest() -> None:
    parser = RequestParser(keep=keep_for_tests, max_name=8)
    parser.feed(b"*1\r\n$100\r\n" + b"n" * 50)
    assert parser.next_request() is NEED_DATA and parser.buffered == 0 and parser.forwardable == 60
    parser.feed(b"n" * 50 + b"\r\n")
    (request,) = drain(parser)
    assert (request.args, request.count, request.end) == ((), 1, 112)


def test_streaming_caps_what_is_kept_of_ours() -> None:
    parser = RequestParser(keep=keep_for_tests, max_kept=100)
    parser.feed(b"*2\r\n$24\r\nkey_evt_amqp.keymask_add\r\n$200\r\n")
    with pytest.raises(KeptTooLong):
        parser.next_request()


def test_streaming_counts_are_never_preallocated() -> None:
    parser = RequestParser(keep=keep_for_tests, max_bulk=2**63 - 1)
    parser.feed(b"*2147483647\r\n$3\r\nGET\r\n")
    assert parser.next_request() is NEED_DATA
    assert parser.forwardable == 22 and parser.buffered == 0


def test_streaming_takes_a_run_of_plain_inline_lines_at_once() -> None:
    parser = RequestParser(keep=keep_for_tests)
    data = b"PING\r\n" * 1000 + b"HELLO 3\r\nGET a\r\n"
    parser.feed(data)
    requests = drain(parser)
    assert [(r.args, r.start, r.end) for r in requests] == [
        ((), 0, 6000), ((b"HELLO", b"3"), 6000, 6009), ((), 6009, len(data))
    ]
    assert parser.at_boundary


def encode(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def test_streaming_absorbs_a_skipped_body_without_buffering() -> None:
    parser = RequestParser(keep=keep_for_tests)
    parser.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\n0123")
    assert parser.next_request() is NEED_DATA
    assert parser.passing_room == 6  # the rest of the body, not its CRLF
    parser.absorb(6)
    assert parser.offset == 35 and parser.forwardable == 35
    parser.feed(b"\r\n*1\r\n$4\r\nPING\r\n")
    first, second = drain(parser)
    assert (first.args, first.end, second.args) == ((b"SET",), 37, (b"PING",))
