"""The bytes of the barrier that puts our replies in their place (the I/O is :mod:`proxy.admin`).

Behind one of our commands the proxy sends Redis, on the client's connection, the authority
:data:`PROBE` and a marker (:func:`markers`): ``ECHO <token>``, or, where ECHO is refused or
inside ``MULTI``, a command named by the token, which every Redis refuses at once. When the reply
stream ends with the marker's reply, everything before it has been answered; :func:`cut` then says
which bytes are the client's and which are the probe's reply, :func:`judge_probe` what the probe
said, and :func:`hello_refused` whether a relayed ``HELLO`` was refused.

Pure: bytes in, values out. The caller keeps the state (which marker it waits for, whether it
fell back) and does the writing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocol import replies
from protocol.commands import encode_command

__all__ = [
    "PROBE", "PROBE_REPLY_MAX", "READ_PROBE", "WHOAMI", "Markers", "Probe", "cut", "ends_with_error",
    "hello_refused", "judge_probe", "line_start", "markers", "refusal", "user_of",
]

#: ``CONFIG SET`` of an option no Redis has: Redis checks the ACL before the arguments, so the
#: reply says whether the user may run ``CONFIG SET`` and nothing changes.
PROBE = encode_command(b"CONFIG", b"SET", b"key-evt-amqp-authority-probe", b"1")
#: For our commands that only read (``info``, ``config_get``), sent before :data:`PROBE` (either
#: right suffices): ``INFO`` of a section no Redis has. Redis checks the ACL first (``-NOPERM``,
#: ``-NOAUTH``); an allowed user gets an empty text (``$0``, or ``=4 txt:`` in RESP3): nothing
#: changes, no error is counted, and Redis builds no section at all.
READ_PROBE = encode_command(b"INFO", b"key-evt-amqp-authority-probe")
_READ_ALLOWED = (b"$0\r\n\r\n", b"=4\r\ntxt:\r\n")
#: The probe's reply is one error line (or an empty text), shorter than this.
PROBE_REPLY_MAX = 512
#: Asked after an allowed command that changes something, for the audit log: the user's name.
WHOAMI = encode_command(b"ACL", b"WHOAMI")


@dataclass(frozen=True, slots=True)
class Markers:
    """The two markers for one token, and the replies that end the wait for each."""

    echo: bytes
    echo_reply: bytes
    unknown: bytes
    unknown_reply: bytes


def markers(token: bytes) -> Markers:
    """The markers for ``token`` (random, so that no reply of the client's can look like ours;
    letters, digits and ``-`` only, so that it is the same in every reply that quotes it)."""
    name = token + b"-x"
    return Markers(
        echo=encode_command(b"ECHO", token),
        echo_reply=replies.bulk(token),
        unknown=encode_command(name),
        unknown_reply=b"-ERR unknown command '%s', with args beginning with: \r\n" % name,
    )


def line_start(stream: bytes, end: int) -> int:
    """Where the line that ends (with its CRLF) at ``end`` begins."""
    before = stream.rfind(b"\r\n", 0, end - 2)
    return before + 2 if before >= 0 else 0


def ends_with_error(stream: bytes) -> bool:
    """Whether the last frame in ``stream`` may be an error line (ECHO refused)."""
    return stream.endswith(b"\r\n") and stream[line_start(stream, len(stream)):][:1] == b"-"


def cut(stream: bytes, marks: Markers, waited: bytes, *, fallback: bool, probed: bool,
        probes: int = 1) -> tuple[int, int]:
    """``(start, end)`` in a reply stream that ends with ``waited``, the marker reply waited for:
    ``stream[:start]`` is the client's, ``stream[start:end]`` the replies of the ``probes`` probes
    (none unless ``probed``), and the rest the markers' replies. ``fallback``: the unknown command
    was sent behind ECHO, whose reply comes just before its own."""
    end = len(stream) - len(waited)
    if fallback:
        # ECHO's reply is the frame before: the token, or the one error line it got.
        if stream.endswith(marks.echo_reply, 0, end):
            end -= len(marks.echo_reply)
        else:
            end = line_start(stream, end)
    # The probe's reply is the frame before the marker's: one error line, no CRLF inside, or the
    # read probe's empty text (two lines: the header and an empty or "txt:" line).
    start = end
    for _ in range(probes if probed else 0):
        start = _probe_reply_start(stream, start)
    return start, end


def _probe_reply_start(stream: bytes, end: int) -> int:
    for allowed in _READ_ALLOWED:
        if stream.endswith(allowed, 0, end):
            return end - len(allowed)
    return line_start(stream, end)


def hello_refused(stream: bytes, end: int) -> bool:
    """Whether the HELLO reply that ends at ``end`` (just before the marker's) is an error."""
    start = line_start(stream, end)
    line = stream[start:end - 2]
    if not line.startswith(b"-"):
        return False
    if start < 2:
        return True
    # A bulk string whose text starts with `-` (a module argument) is not an error.
    header = stream[line_start(stream, start):start - 2]
    return header != b"$%d" % len(line)


class Probe(enum.Enum):
    """What the authority probe's reply says."""

    ALLOWED = "allowed"  # ``Unknown option``: CONFIG SET was tried, so the user may run it
    NOAUTH = "noauth"  # not authenticated: Redis's own reply is the answer
    NOPERM = "noperm"  # the user may not run CONFIG SET
    PROXY_ERROR = "proxy-error"  # an error of the proxy's own in its place (a lost node link)
    OTHER = "other"  # anything else: CONFIG SET was not even tried


def judge_probe(reply: bytes) -> Probe:
    """What the probes' replies say: ``reply`` is :data:`PROBE`'s, or :data:`READ_PROBE`'s and
    then :data:`PROBE`'s (allowed when either is)."""
    if (reply.startswith(b"-ERR Unknown option") or reply.startswith(_READ_ALLOWED)
            or b"\r\n-ERR Unknown option" in reply):
        return Probe.ALLOWED
    if reply.startswith(b"-NOAUTH"):
        return Probe.NOAUTH
    if reply.startswith(b"-NOPERM"):
        return Probe.NOPERM
    if reply.startswith(b"-ERR key-evt-amqp"):
        return Probe.PROXY_ERROR
    return Probe.OTHER


def refusal(name: str, needs: str = "CONFIG SET") -> bytes:
    """The reply to our command ``name`` when the probe did not allow it (NOAUTH aside):
    ``needs`` is the Redis command whose right it takes (``CONFIG SET``, or ``INFO``)."""
    return replies.error(
        f"NOPERM this user has no permissions to run the '{name}' command "
        f"(it needs the right to run {needs})"
    )


def user_of(reply: bytes) -> str:
    """The user name in the reply to :data:`WHOAMI` (a bulk string), or ``"?"`` when Redis
    refused it (a user without ``+acl|whoami``) or it is not one."""
    header, sep, rest = reply.partition(b"\r\n")
    if sep and header[:1] == b"$" and header[1:].isdigit() and len(rest) == int(header[1:]) + 2:
        return rest[:-2].decode("utf-8", "backslashreplace")
    return "?"
