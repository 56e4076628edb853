"""``protocol.barrier``: the bytes behind our commands and how the reply stream is cut."""

from __future__ import annotations

import pytest

from protocol.barrier import (
    PROBE, READ_PROBE, Probe, cut, ends_with_error, hello_refused, judge_probe, line_start, markers,
    refusal, user_of,
)

TOKEN = b"key-evt-amqp-marker-0123456789abcdef0123456789abcdef"
MARKS = markers(TOKEN)
UNKNOWN_OPTION = b"-ERR Unknown option or number of arguments for CONFIG SET - 'key-evt-amqp-authority-probe'\r\n"


def test_probe_and_markers_bytes() -> None:
    assert PROBE == b"*4\r\n$6\r\nCONFIG\r\n$3\r\nSET\r\n$28\r\nkey-evt-amqp-authority-probe\r\n$1\r\n1\r\n"
    assert MARKS.echo == b"*2\r\n$4\r\nECHO\r\n$52\r\n" + TOKEN + b"\r\n"
    assert MARKS.echo_reply == b"$52\r\n" + TOKEN + b"\r\n"
    assert MARKS.unknown == b"*1\r\n$54\r\n" + TOKEN + b"-x\r\n"
    assert MARKS.unknown_reply == b"-ERR unknown command '" + TOKEN + b"-x', with args beginning with: \r\n"


def test_line_start() -> None:
    stream = b"+OK\r\n:1\r\n-ERR x\r\n"
    assert line_start(stream, len(stream)) == 9
    assert line_start(stream, 9) == 5
    assert line_start(stream, 5) == 0


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"+OK\r\n-NOAUTH Authentication required.\r\n", True),
        (b"-ERR x\r\n", True),
        (b"+OK\r\n", False),
        (b"-ERR cut sh", False),  # not a whole line yet
        (b"$4\r\n-abc\r\n", True),  # may be: the caller waits for the marker it sends behind
    ],
)
def test_ends_with_error(stream: bytes, expected: bool) -> None:
    assert ends_with_error(stream) is expected


def test_cut_probe_then_echo() -> None:
    stream = b"+OK\r\n:7\r\n" + UNKNOWN_OPTION + MARKS.echo_reply
    start, end = cut(stream, MARKS, MARKS.echo_reply, fallback=False, probed=True)
    assert stream[:start] == b"+OK\r\n:7\r\n"
    assert stream[start:end] == UNKNOWN_OPTION


def test_cut_marker_alone() -> None:
    stream = b"%1\r\n+server\r\n+redis\r\n" + MARKS.echo_reply
    start, end = cut(stream, MARKS, MARKS.echo_reply, fallback=False, probed=False)
    assert start == end == len(stream) - len(MARKS.echo_reply)


@pytest.mark.parametrize(
    "echo_answer",
    [b"-NOPERM User u has no permissions to run the 'echo' command\r\n", MARKS.echo_reply],
)
def test_cut_after_a_fallback_strips_whatever_echo_got(echo_answer: bytes) -> None:
    noperm = b"-NOPERM User u has no permissions to run the 'config|set' command\r\n"
    stream = b"+PONG\r\n" + noperm + echo_answer + MARKS.unknown_reply
    start, end = cut(stream, MARKS, MARKS.unknown_reply, fallback=True, probed=True)
    assert stream[:start] == b"+PONG\r\n"
    assert stream[start:end] == noperm


def test_cut_inside_multi() -> None:
    stream = b"+QUEUED\r\n" + MARKS.unknown_reply
    assert cut(stream, MARKS, MARKS.unknown_reply, fallback=False, probed=False) == (9, 9)


@pytest.mark.parametrize(
    ("reply", "refused"),
    [
        (b"-NOPROTO unsupported protocol version\r\n", True),
        (b"-ERR x\r\n", True),
        (b"+OK\r\n-ERR y\r\n", True),  # behind an earlier reply (lines are found from the end)
        (b"*2\r\n$6\r\nserver\r\n$5\r\nredis\r\n", False),
        (b"*2\r\n$7\r\nmodules\r\n$4\r\n-abc\r\n", False),  # a bulk string that starts with `-`
        (b"*2\r\n$7\r\nmodules\r\n$3\r\n-abc\r\n", True),  # not its length: an error line after all
    ],
)
def test_hello_refused(reply: bytes, refused: bool) -> None:
    stream = reply + MARKS.echo_reply
    _, end = cut(stream, MARKS, MARKS.echo_reply, fallback=False, probed=False)
    assert hello_refused(stream, end) is refused


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        (UNKNOWN_OPTION, Probe.ALLOWED),
        (b"-NOAUTH Authentication required.\r\n", Probe.NOAUTH),
        (b"-NOPERM User u has no permissions to run the 'config|set' command\r\n", Probe.NOPERM),
        (b"-ERR key-evt-amqp: lost the connection to Redis node a:1 (reset)\r\n", Probe.PROXY_ERROR),
        (b"-BUSY Redis is busy running a script.\r\n", Probe.OTHER),
        (b"+OK\r\n", Probe.OTHER),
    ],
)
def test_judge_probe(reply: bytes, verdict: Probe) -> None:
    assert judge_probe(reply) is verdict


def test_refusal_names_the_command() -> None:
    assert refusal("key_evt_amqp.info") == (
        b"-NOPERM this user has no permissions to run the 'key_evt_amqp.info' command "
        b"(it needs the right to run CONFIG SET)\r\n"
    )


@pytest.mark.parametrize("allowed", [b"$0\r\n\r\n", b"=4\r\ntxt:\r\n"])
@pytest.mark.parametrize("before", [b"", b"+OK\r\n", b"$0\r\n\r\n", b"$2\r\n\r\n\r\n"])
def test_the_read_probes_replies_are_cut_whole_in_resp2_and_resp3(allowed: bytes, before: bytes) -> None:
    """Ours that only read send INFO's probe, then CONFIG SET's: either right is enough."""
    no_config = b"-NOPERM User u has no permissions to run the 'config|set' command\r\n"
    for probes, expected in ((allowed + no_config, Probe.ALLOWED), (allowed + UNKNOWN_OPTION, Probe.ALLOWED)):
        stream = before + probes + MARKS.echo_reply
        start, end = cut(stream, MARKS, MARKS.echo_reply, fallback=False, probed=True, probes=2)
        assert (stream[:start], stream[start:end]) == (before, probes)
        assert judge_probe(stream[start:end]) is expected


def test_refused_read_probes_are_error_lines() -> None:
    no_info = b"-NOPERM User u has no permissions to run the 'info' command\r\n"
    for second, expected in ((b"-NOPERM User u has no permissions to run the 'config|set' command\r\n", Probe.NOPERM),
                             (UNKNOWN_OPTION, Probe.ALLOWED)):
        stream = b"$0\r\n\r\n" + no_info + second + MARKS.echo_reply
        start, end = cut(stream, MARKS, MARKS.echo_reply, fallback=False, probed=True, probes=2)
        assert stream[start:end] == no_info + second and judge_probe(stream[start:end]) is expected
    assert READ_PROBE == b"*2\r\n$4\r\nINFO\r\n$28\r\nkey-evt-amqp-authority-probe\r\n"
    assert b"right to run INFO" in refusal("key_evt_amqp.info", "INFO")


@pytest.mark.parametrize(("reply", "user"), [
    (b"$7\r\ndefault\r\n", "default"),
    (b"$0\r\n\r\n", ""),
    (b"-NOPERM User u has no permissions to run the 'acl|whoami' command\r\n", "?"),
    (b"$9\r\ndefault\r\n", "?"),  # not a whole bulk string
    (b"+OK\r\n", "?"),
])
def test_user_of_the_whoami_reply(reply: bytes, user: str) -> None:
    assert user_of(reply) == user
