"""Same bytes in, same bytes out, same close: the proxy against a redis-server, byte for byte.

Every test plays a :class:`fuzz_cases.Case` to Redis A directly and to the proxy in front of Redis B
(:class:`fuzz.Lane`) and compares what each client saw: the bytes, and whether the peer closed
within the idle timeout. Where a test also states what Redis answers, that is Redis 7.0's own
behaviour, checked on A on every run, so a wrong expectation fails as loudly as a wrong proxy.

- ``test_bounded_fuzz*``: a fixed seed and count of random cases (``make fuzz`` runs for minutes).
- ``test_fuzz_regression``: one case per kind of difference fuzz runs found, by (seed, index, fingerprint).
- the rest: hand-written reproductions from the relay review, one per defect.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from fuzz import Comparison, Lane, Outcome, fuzz, play
from fuzz_cases import Case, make_case, multibulk, single
from harness import RawClient, no_retry

PASSWORD = "fuzz-pw"
BOUNDED_SEED = int(os.environ.get("FUZZ_TEST_SEED", "20250101"))
BOUNDED_CASES = 150
BOUNDED_AUTH_CASES = 40
BOUNDED_SECONDS = 60.0  # a cap, should the proxy stall; without stalls the cases take about 25 s

#: (seed, index, fingerprint) of cases fuzz runs found different, one per kind, kept for good.
REGRESSIONS: list[tuple[int, int, str]] = [
    (1, 13, "c390299aa74d"),  # *2147483648 then commands: nothing, open, the proxy stalls 3-5 s
    (1, 21, "cf91db124767"),  # *4294967295 then ` "DI...` in pieces: "unbalanced quotes" instead
    (1, 22, "d68eb399231a"),  # `*` `1\r\n+4...` in pieces: "lost the connection" after Redis's error
    (1, 15, "c0e8626d9602"),  # ECHO <65536 a> in one write: Redis answers, the proxy "too big inline"
    (1, 43, "a78b5b2794d4"),  # `$` + 81928 digits in one write: "invalid bulk length" vs "too big"
    (1, 27, "c069b8104365"),  # byte by byte, then half-close: no reply at all
    (1, 30, "8c2f4b47fe58"),  # SET, MULTI, DISCARD..., then half-close: no reply at all
    (2, 159, "71f9b86383c2"),  # "got '\xf5'": the proxy writes it UTF-8 encoded
    (2, 155, "380f327c7d95"),  # DISCARD, inline PING, QUIT: the replies before QUIT are lost
    (2, 329, "57317bcdbfd9"),  # GET, then *4294967295: even GET's reply is lost, left open
    (2, 709, "3c9dffd3721c"),  # *4294967295 with args: nothing, left open
    (2, 21, "7953bbcc32a2"),  # "expected '$', got ..." then "lost the connection to Redis"
    (2, 89, "643cde4ec690"),  # "invalid bulk length" then "lost the connection to Redis"
    (2, 167, "21016bc2d0be"),  # `*` + 81912 digits in one write: "invalid multibulk length" vs "too big"
    (11, 1570, "e8b43465c4a2"),  # a 147 KB inline line in one write: Redis's reads decide (long-line)
]

#: Found against the proxy after the relay rewrite, with ``--requirepass``: played on the auth lane.
AUTH_REGRESSIONS: list[tuple[int, int, str]] = [
    (12, 166, "bb352ae74762"),  # `*1025\r\x00`: Redis refuses the unauthenticated count (header-before-name)
    (12, 646, "461388c6b14d"),  # `*1\r\n$-5\r\x00`: a header ended by CR + NUL was held, never judged
    (12, 1116, "849f5fa51c87"),  # `*294967295\r\n` alone
    (12, 2854, "921cea50cbd1"),  # `*1024` in pieces after an inline DEL
    (12, 3190, "091cdb566a99"),  # `*1025` then inline lines with a NUL: no name ever comes
]

PROTOCOL_ERROR = b"-ERR Protocol error: "


@pytest.fixture(scope="module")
def lane() -> Iterator[Lane]:
    with Lane() as pair:
        yield pair


@pytest.fixture(scope="module")
def auth_lane() -> Iterator[Lane]:
    with Lane(["--requirepass", PASSWORD]) as pair:
        yield pair


def check(result: Comparison, direct: bytes | None = None, closed: bool | None = None) -> None:
    """Redis said what we expect (when given), and the proxy said the same."""
    if direct is not None:
        assert result.direct.data == direct, f"Redis itself answered otherwise:\n{result.report()}"
    if closed is not None:
        assert result.direct.closed is closed, f"Redis itself closed otherwise:\n{result.report()}"
    assert result.same, result.report()


# -- the fuzzer ----------------------------------------------------------------------------------


def _run_bounded(cases: int, redis_args: tuple[str, ...] = ()) -> None:
    report = fuzz(BOUNDED_SEED, cases, BOUNDED_SECONDS, lanes=2, redis_args=redis_args)
    print(report.summary())
    if report.differences:
        shown = "\n\n".join(d.report() for d in report.differences[:8])
        more = len(report.differences) - 8
        pytest.fail(f"{report.summary()} (seed {BOUNDED_SEED}); failing cases"
                    f" {[(BOUNDED_SEED, d.index) for d in report.differences]}\n\n{shown}"
                    + (f"\n\n... and {more} more" if more > 0 else ""), pytrace=False)


def test_bounded_fuzz() -> None:
    _run_bounded(BOUNDED_CASES)


def test_bounded_fuzz_unauthenticated() -> None:
    """The same generator against a requirepass pair: every client stays unauthenticated."""
    _run_bounded(BOUNDED_AUTH_CASES, ("--requirepass", PASSWORD))


@pytest.mark.parametrize(("seed", "index", "fingerprint"), REGRESSIONS, ids=[f"{s}-{i}" for s, i, _ in REGRESSIONS])
def test_fuzz_regression(seed: int, index: int, fingerprint: str, lane: Lane) -> None:
    case = make_case(seed, index)
    assert case.fingerprint() == fingerprint, (
        f"fuzz_cases changed: ({seed}, {index}) is another case now; replace the entry with a"
        f" hand-written case holding these chunks from the old run")
    check(lane.run(case, seed=seed, index=index))


@pytest.mark.parametrize(("seed", "index", "fingerprint"), AUTH_REGRESSIONS,
                         ids=[f"{s}-{i}" for s, i, _ in AUTH_REGRESSIONS])
def test_fuzz_regression_unauthenticated(seed: int, index: int, fingerprint: str, auth_lane: Lane) -> None:
    case = make_case(seed, index)
    assert case.fingerprint() == fingerprint, f"fuzz_cases changed: ({seed}, {index}) is another case now"
    check(auth_lane.run(case, seed=seed, index=index))


# -- 1. counts above INT_MAX ----------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"*2147483648\r\n", b"*4294967295\r\n$3\r\nGET\r\n", b"*3000000000\r\n",
                                  b"*9223372036854775808\r\n"],
                         ids=["2^31", "2^32-1-then-arg", "3e9", "2^63"])
def test_count_above_int_max_is_an_error_and_a_close(data: bytes, lane: Lane) -> None:
    check(lane.run(single(data)), PROTOCOL_ERROR + b"invalid multibulk length\r\n", closed=True)


def test_count_int_max_waits(lane: Lane) -> None:
    """``*2147483647`` is a valid count: Redis waits for the arguments (and allocates 1024 slots)."""
    check(lane.run(single(b"*2147483647\r\n$3\r\nGET\r\n")), b"", closed=False)


@pytest.mark.parametrize("data", [
    b"*2147483648\r\n$3\r\nGET\r\n$1\r\nk\r\nECHO 1\r\n*1\r\n$5\r\nMULTI\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n",
    b'*3000000000\r\nECHO "\\x4"\n*4\r\n$6\r\nLRANGE\r\n$1\r\nk\r\n$1\r\n0\r\n$1\r\n1\r\n*1\r\n$4\r\nEXEC\r\n',
], ids=["2^31-then-commands", "3e9-then-inline"])
def test_huge_count_stalls_nobody(data: bytes, lane: Lane) -> None:
    """One client's bad count must not stop the proxy: a bystander's PING answers within 0.2 s."""
    result = lane.run(single(data))
    assert not result.notes, result.report()


# -- 4. replies owed before a close ---------------------------------------------------------------


def _every_time(lane: Lane, case: Case, runs: int, direct: bytes) -> None:
    seen = [lane.run(case) for _ in range(runs)]
    for result in seen:
        assert result.direct == Outcome(direct, True), f"Redis itself answered otherwise:\n{result.report()}"
    wrong = [result for result in seen if not result.same]
    assert not wrong, f"{len(wrong)}/{runs} runs differ; the first:\n{wrong[0].report()}"


def test_quit_in_an_inline_pipeline_every_time(lane: Lane) -> None:
    _every_time(lane, single(b"SET qk 1\r\nQUIT\r\nPING\r\nPING\r\nPING\r\n"), 20, b"+OK\r\n+OK\r\n")


def test_protocol_error_after_commands_every_time(lane: Lane) -> None:
    data = (multibulk([b"SET", b"counter", b"1"]) + multibulk([b"INCR", b"counter"])
            + b"*2\r\n$4\r\nINCR\r\n+$7\r\ncounter\r\n")
    _every_time(lane, single(data), 15, b"+OK\r\n:2\r\n" + PROTOCOL_ERROR + b"expected '$', got '+'\r\n")


# -- 5. the byte Redis names in "expected '$', got 'x'" --------------------------------------------


def test_every_byte_in_place_of_the_dollar(lane: Lane) -> None:
    """Redis quotes the byte raw (0x80-0xFF too). All 255 cases at once: PING changes nothing."""
    cases = [single(b"*1\r\n" + bytes([b]) + b"4\r\nPING\r\n") for b in range(256) if b != ord("$")]
    outcomes = play([(port, case) for case in cases for port in lane.ports])
    wrong = []
    for i, case in enumerate(cases):
        result = Comparison(case, outcomes[2 * i], outcomes[2 * i + 1])
        byte = case.data[4:5]
        if byte[0] >= 0x80:
            assert result.direct == Outcome(PROTOCOL_ERROR + b"expected '$', got '" + byte + b"'\r\n", True), \
                result.report()
        if not result.same:
            wrong.append(f"{byte!r}: direct {result.direct.data!r} {result.direct.closed},"
                         f" proxied {result.proxied.data!r} {result.proxied.closed}")
    assert not list(lane.health())
    assert not wrong, f"{len(wrong)} of 255 bytes differ, e.g.:\n" + "\n".join(wrong[:3] + wrong[-3:])


# -- 6. one error, then the close; Redis's close is the client's close -----------------------------


@pytest.mark.parametrize(("data", "error"), [
    (b"*1\r\n$536870913\r\n", b"invalid bulk length"),
    (b"*2147483648\r\n$3\r\nGET\r\n", b"invalid multibulk length"),
    (b"*2\r\n$3\r\nGET\r\n$9223372036854775808\r\n", b"invalid bulk length"),
], ids=["bulk-over-512MB", "count-over-int-max", "length-2^63"])
def test_exactly_one_error_then_close(data: bytes, error: bytes, lane: Lane) -> None:
    check(lane.run(single(data)), PROTOCOL_ERROR + error + b"\r\n", closed=True)


@pytest.mark.parametrize(("data", "direct", "closed"), [
    (b"*11\r\n", PROTOCOL_ERROR + b"unauthenticated multibulk length\r\n", True),
    (b"*11\r\n$3\r\nGET\r\n", PROTOCOL_ERROR + b"unauthenticated multibulk length\r\n", True),
    (b"*10\r\n$3\r\nGET\r\n", b"", False),
    (b"*1\r\n$16385\r\n", PROTOCOL_ERROR + b"unauthenticated bulk length\r\n", True),
    (b"*2\r\n$4\r\nECHO\r\n$16385\r\n" + b"x" * 16385 + b"\r\n",
     PROTOCOL_ERROR + b"unauthenticated bulk length\r\n", True),
    (b"*1\r\n$16384\r\n", b"", False),
    (b"PING\r\n*11\r\n", b"-NOAUTH Authentication required.\r\n" + PROTOCOL_ERROR
     + b"unauthenticated multibulk length\r\n", True),
    (b"*1\r\n$2147483648\r\n", PROTOCOL_ERROR + b"invalid bulk length\r\n", True),
    (b"AUTH " + PASSWORD.encode() + b"\r\n*11\r\n$3\r\nGET\r\n", b"+OK\r\n", False),
    (b"AUTH " + PASSWORD.encode() + b"\r\n*1\r\n$16385\r\n", b"+OK\r\n", False),
], ids=["count-11", "count-11-then-arg", "count-10-waits", "length-16385", "echo-16385", "length-16384-waits",
        "after-noauth", "length-2^31", "count-11-after-auth", "length-16385-after-auth"])
def test_unauthenticated_limits(data: bytes, direct: bytes, closed: bool, auth_lane: Lane) -> None:
    result = auth_lane.run(single(data))
    check(result, direct, closed)
    if data.endswith(b"*11\r\n"):
        # The documented difference: the header alone waits for its name; with it, the same bytes.
        assert result.allowed_by == ["header-before-name"], result.report()
        check(auth_lane.run(single(data + b"$3\r\nGET\r\n")), direct, closed)


def _new_client_ids(control: redis.Redis, after: int) -> list[int]:
    return [int(c["id"]) for c in control.client_list() if int(c["id"]) > after]


def test_client_kill_closes_the_client_without_a_byte(lane: Lane) -> None:
    before = [max(int(c["id"]) for c in control.client_list()) for control in lane.controls]
    clients = [RawClient(port) for port in lane.ports]
    try:
        for client in clients:
            assert client.command("PING") == b"PONG"
        for control, after in zip(lane.controls, before):
            for client_id in _new_client_ids(control, after):
                control.execute_command("CLIENT", "KILL", "ID", client_id)
        direct, proxied = (client.read_until_closed(timeout=2) for client in clients)
    finally:
        for client in clients:
            client.close()
    assert direct == (b"", True)
    assert proxied == direct


def test_redis_idle_timeout_closes_the_client_without_a_byte() -> None:
    with Lane(["--timeout", "1"]) as timeout_lane:
        clients = [RawClient(port) for port in timeout_lane.ports]
        try:
            for client in clients:
                assert client.command("PING") == b"PONG"
            direct, proxied = (client.read_until_closed(timeout=4) for client in clients)
        finally:
            for client in clients:
                client.close()
    assert direct == (b"", True)
    assert proxied == direct


def _redis_py_after_kill(port: int, control: redis.Redis) -> str:
    after = max(int(c["id"]) for c in control.client_list())
    with redis.Redis(port=port, retry=no_retry(), socket_timeout=3) as client:
        client.ping()
        for client_id in _new_client_ids(control, after):
            control.execute_command("CLIENT", "KILL", "ID", client_id)
        time.sleep(0.1)
        try:
            return f"reply {client.get('after-kill')!r}"
        except redis.ConnectionError:
            return "ConnectionError"
        except redis.ResponseError as exc:
            return f"ResponseError {exc}"


def test_redis_py_sees_a_killed_connection_as_direct(lane: Lane) -> None:
    """redis-py 8 reconnects when it finds its socket closed; an error reply it cannot: it raises it."""
    direct = _redis_py_after_kill(lane.direct.port, lane.controls[0])
    proxied = _redis_py_after_kill(lane.proxy.port, lane.controls[1])  # type: ignore[union-attr]
    assert direct in ("reply None", "ConnectionError")
    assert proxied == direct


# -- 8. long inline lines and long inline pipelines -------------------------------------------------


def test_echo_70000_inline_in_one_write(lane: Lane) -> None:
    """Redis takes 64 KiB inline lines and more when they arrive whole (it checks after 16 KiB reads)."""
    check(lane.run(single(b"ECHO " + b"a" * 70000 + b"\r\n")), b"$70000\r\n" + b"a" * 70000 + b"\r\n", False)


def _first_byte_and_all(port: int, data: bytes, expected: int) -> tuple[float, float, bytes]:
    """Write ``data`` in one go (from a thread), read ``expected`` bytes: (first byte s, all s, bytes)."""
    def write() -> None:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the peer closed: what it answered tells

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        received = bytearray(sock.recv(1 << 20))
        first = time.monotonic() - started
        while len(received) < expected and (chunk := sock.recv(1 << 20)):
            received += chunk
        writer.join(10)
        return first, time.monotonic() - started, bytes(received)


def test_100k_inline_pings_first_reply_soon(lane: Lane) -> None:
    count = 100_000
    expected = b"+PONG\r\n" * count
    direct = _first_byte_and_all(lane.direct.port, b"PING\r\n" * count, len(expected))
    proxied = _first_byte_and_all(lane.proxy.port, b"PING\r\n" * count, len(expected))  # type: ignore[union-attr]
    print(f"100k inline PINGs: first reply byte direct {direct[0] * 1000:.0f} ms, proxied"
          f" {proxied[0] * 1000:.0f} ms; all replies direct {direct[1]:.2f} s, proxied {proxied[1]:.2f} s")
    assert direct[2] == expected
    assert proxied[2] == expected
    assert proxied[0] < 0.5, f"first reply byte through the proxy after {proxied[0]:.2f} s"


# -- 12. half-close ---------------------------------------------------------------------------------


def test_ping_then_half_close(lane: Lane) -> None:
    """``printf 'PING\\r\\n' | socat -t3 - TCP:...``: the reply comes, then the close."""
    check(lane.run(single(b"PING\r\n", half_close=True)), b"+PONG\r\n", closed=True)


@pytest.mark.parametrize("data", [multibulk([b"SET", b"hc", b"v"]), b"SET hc v\r\n",
                                  multibulk([b"SET", b"hc", b"v"]) + b"GET hc\r\n"],
                         ids=["multibulk", "inline", "then-get"])
def test_set_then_half_close_takes_effect(data: bytes, lane: Lane) -> None:
    result = lane.run(single(data, half_close=True))
    effects = [control.get("hc") for control in lane.controls]
    assert result.direct.closed and result.direct.data.startswith(b"+OK\r\n"), result.report()
    assert (effects, result.proxied) == ([b"v", b"v"], result.direct), \
        f"SET done on [A, B]: {effects}\n{result.report()}"


def test_split_ping_then_half_close(lane: Lane) -> None:
    check(lane.run(Case((b"PI", b"NG\r\n"), (0.0, 0.01), half_close=True)), b"+PONG\r\n", closed=True)
