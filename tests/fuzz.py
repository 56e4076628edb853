"""A socket-level differential fuzzer: the same bytes to Redis directly and through the proxy.

A :class:`Lane` is two private redis-servers of the same binary and configuration: ``direct`` (A),
which the fuzzer talks to straight, and ``behind`` (B), which it reaches through a
:class:`harness.ProxyProcess`. For each :class:`fuzz_cases.Case` both are flushed over a control
connection of their own, then the case's chunks are written to both at the same moments
(:func:`exchange`), and each side's :class:`Outcome` is recorded: every byte received, and whether
the peer closed (EOF or reset) within ``idle`` seconds of the last byte either way. The outcomes
must be equal, unless an :class:`Allowance` in :data:`DOCUMENTED_DIFFERENCES` says otherwise. A
proxy connection to Redis that outlives its client by more than a second is a difference too.

Nothing here imports pytest. Run it alone (``make fuzz``)::

    python tests/fuzz.py --seed 7 --cases 5000 --seconds 300

It prints the cases tried and each difference (seed, case index, the exact chunks, both outputs).
A difference is kept as a regression in ``tests/e2e/test_fuzz_differential.py``.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis  # noqa: E402

from fuzz_cases import INLINE_MAX, Case, make_case, show  # noqa: E402
from harness import HOST, ProxyProcess, RedisServer, unreachable_amqp_url  # noqa: E402

IDLE = 0.35  # seconds without a byte either way after which "not closed" is the verdict
CASE_LIMIT = 10.0  # seconds one exchange may take in all, whatever happens
LINGER = 1.0  # seconds a Redis connection may outlive its client
SLOW = 0.2  # seconds a bystander's PING through the proxy may take after a case
STALL = 5.0  # seconds after which the bystander gives up
RECOVER = 30.0  # seconds a stalled proxy gets to answer again before it is restarted
SHOWN_BYTES = 600  # of each output, in a report


@dataclass(frozen=True)
class Outcome:
    """What a client saw: the bytes, and whether the peer closed within the idle timeout."""

    data: bytes
    closed: bool
    seconds: float = field(default=0.0, compare=False)  # first write to the verdict (information)

    def describe(self) -> str:
        data = self.data if len(self.data) <= SHOWN_BYTES else self.data[:SHOWN_BYTES]
        more = f" ... ({len(self.data)} bytes)" if len(self.data) > SHOWN_BYTES else ""
        return f"{show(data)}{more}, {'closed' if self.closed else 'open'} after {self.seconds:.2f} s"


# -- one exchange ----------------------------------------------------------------------------------


class _Side:
    """One client connection driven by :func:`exchange` (non-blocking)."""

    def __init__(self, port: int, case: Case, start: float) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.case = case
        self.next_chunk = 0
        self.due = start  # when the next chunk may go
        self.out = bytearray()
        self.writing = True  # False once every chunk went (or the peer refused more)
        self.data = bytearray()
        self.eof = False
        self.last = start  # last byte either way
        self.done_at = 0.0

    def step(self, now: float, idle: float) -> float:
        """Write what is due, note the verdict when it is reached; seconds until the next step."""
        chunks = self.case.chunks
        while self.writing and not self.out and self.next_chunk < len(chunks) and now >= self.due:
            self.out += chunks[self.next_chunk]
            self.next_chunk += 1
            if self.next_chunk < len(chunks):
                self.due = now + self.case.gaps[self.next_chunk]
            self._send(now)
        if self.out and self.writing:
            self._send(now)
        if self.writing and not self.out and self.next_chunk == len(chunks):
            self.writing = False
            if self.case.half_close:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if self.writing:
            return 0.001 if self.out else self.due - now
        if now - self.last >= idle:
            self.done_at = now
        return self.last + idle - now

    def _send(self, now: float) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError:  # EPIPE / ECONNRESET: the peer closed; what it sent is still readable
            self.out.clear()
            self.writing = False
            return
        del self.out[:sent]
        self.last = now

    def receive(self, now: float) -> None:
        try:
            chunk = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self.data += chunk
            self.last = now
        else:
            self.eof = True
            self.done_at = now


def exchange(ports: Sequence[int], case: Case, idle: float = IDLE) -> list[Outcome]:
    """Play ``case`` to every port at once (same chunks, same pauses); one :class:`Outcome` each."""
    return play([(port, case) for port in ports], idle)


def play(targets: Sequence[tuple[int, Case]], idle: float = IDLE) -> list[Outcome]:
    """Play each case to its port, all at once, on a connection of its own; one :class:`Outcome` each."""
    start = time.monotonic()
    sides: list[_Side] = []
    selector = selectors.DefaultSelector()
    try:
        for port, case in targets:
            sides.append(_Side(port, case, start))
            selector.register(sides[-1].sock, selectors.EVENT_READ, sides[-1])
        while True:
            now = time.monotonic()
            waits = [side.step(now, idle) for side in sides if not side.done_at]
            if all(side.done_at for side in sides) or now - start > CASE_LIMIT:
                break
            for key, _ in selector.select(max(0.0, min(waits, default=0.0))):
                side = key.data
                side.receive(time.monotonic())
                if side.eof:
                    selector.unregister(side.sock)
        return [Outcome(bytes(s.data), s.eof, (s.done_at or time.monotonic()) - start) for s in sides]
    finally:
        selector.close()
        for side in sides:
            side.sock.close()


# -- what may differ -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allowance:
    """A documented difference: ``applies(case, direct, proxied)`` says when outputs may differ."""

    name: str
    readme_row: str  # the row of README's "Limits and overflow policies" table it stands for
    why: str
    applies: Callable[[Case, Outcome, Outcome], bool]


def _longest_line(data: bytes) -> int:
    return max(len(line) for line in data.split(b"\n"))


def _long_line_split(case: Case, direct: Outcome, proxied: Outcome) -> bool:
    """A line over 64 KiB where one side says "too big": Redis applies the limit only to what its
    reads left buffered, and how much it reads at once depends on its query buffer's history on
    that connection (16 KiB first, then greedy growth), which a proxy's connection does not share.
    Up to that verdict both outputs must agree."""
    too_big = (b"too big inline request", b"too big mbulk count string", b"too big bulk count string")
    if _longest_line(case.data) <= INLINE_MAX:
        return False
    for outcome, other in ((direct, proxied), (proxied, direct)):
        for text in too_big:
            at = outcome.data.find(b"-ERR Protocol error: " + text)
            if at >= 0 and other.data[:at] == outcome.data[:at]:
                return True
    return False


def _header_before_name(case: Case, direct: Outcome, proxied: Outcome) -> bool:
    """Redis refused an unauthenticated client's count (over 10) at its header; the proxy holds a
    header until the command's name has come (none of our commands may reach Redis in part), so
    where no name follows, Redis never saw it. Up to that error both outputs agree."""
    rest = direct.data[len(proxied.data):]
    return (direct.closed and direct.data.startswith(proxied.data)
            and rest == b"-ERR Protocol error: unauthenticated multibulk length\r\n")


#: Proposed, not yet agreed: :class:`Comparison` ignores these until one moves to the next table.
PROPOSED_DIFFERENCES: tuple[Allowance, ...] = ()
DOCUMENTED_DIFFERENCES: tuple[Allowance, ...] = (
    Allowance(
        "long-line",
        "an inline line longer than 64 KiB",
        "Redis tests a line's 64 KiB limit only against what its reads left buffered (16 KiB reads,"
        " then greedy ones, sized by the connection's history), so a longer line is accepted or"
        " refused depending on how its bytes reached Redis; up to that verdict outputs must agree",
        _long_line_split,
    ),
    Allowance(
        "header-before-name",
        "a request header alone, before its first argument",
        "none of our commands may reach Redis in part, so a header is forwarded with the command's"
        " name; a real client sends both",
        _header_before_name,
    ),
)
@dataclass(frozen=True)
class Comparison:
    """One case played both ways; :attr:`same` unless the outputs differ beyond what is documented."""

    case: Case
    direct: Outcome
    proxied: Outcome
    notes: tuple[str, ...] = ()  # what else went wrong: a lingering connection, a stall, a death
    seed: int | None = None
    index: int | None = None

    @property
    def allowed_by(self) -> list[str]:
        return [a.name for a in DOCUMENTED_DIFFERENCES if a.applies(self.case, self.direct, self.proxied)]

    @property
    def same(self) -> bool:
        return not self.notes and (self.direct == self.proxied or bool(self.allowed_by))

    def _first_difference(self) -> str:
        a, b = self.direct.data, self.proxied.data
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return (f"  first different byte at {at}: direct {show(a[at:at + 80])}..., proxied"
                f" {show(b[at:at + 80])}...")

    def report(self) -> str:
        proposed = [a.name for a in PROPOSED_DIFFERENCES if a.applies(self.case, self.direct, self.proxied)]
        return "\n".join([
            f"{'SAME' if self.same else 'DIFFERENCE'} seed={self.seed} case={self.index}"
            f" fingerprint={self.case.fingerprint()}",
            self.case.describe(),
            f"  direct : {self.direct.describe()}",
            f"  proxied: {self.proxied.describe()}",
            *([self._first_difference()] if self.direct.data != self.proxied.data else []),
            *(f"  {note}" for note in self.notes),
            *([f"  allowed by: {', '.join(self.allowed_by)}"] if self.allowed_by else []),
            *([f"  (a proposed allowance would cover it: {', '.join(proposed)})"] if proposed else []),
        ])


# -- servers ---------------------------------------------------------------------------------------


class Lane:
    """Redis A (direct), Redis B with the proxy in front, and a control client to each.

    ``redis_args`` go to both servers (``["--requirepass", pw]`` for an authenticated pair: the
    proxy's URL carries the password, the fuzzed clients never send it). Before and after each case
    a bystander connection through the proxy must get its PING answered within :data:`SLOW` seconds.
    """

    def __init__(self, redis_args: Sequence[str] = (), proxy_args: Sequence[str] = ()) -> None:
        self.redis_args = tuple(redis_args)
        self.proxy_args = tuple(proxy_args) or ("--amqp", unreachable_amqp_url())
        self.direct = RedisServer(self.redis_args)
        self.behind = RedisServer(self.redis_args)
        args = list(self.redis_args)
        self.password = args[args.index("--requirepass") + 1] if "--requirepass" in args else None
        self.proxy: ProxyProcess | None = None
        self.controls: list[redis.Redis] = []
        self.bystander: socket.socket | None = None

    def __enter__(self) -> Lane:
        try:
            self.direct.start()
            self.behind.start()
            self._start_proxy()
            self.controls = [self.direct.client(), self.behind.client()]
            # The proxy sets notify-keyspace-events on B: the same on A, so the configs are equal.
            name = "notify-keyspace-events"
            wait_until(lambda: "E" in self.controls[1].config_get(name)[name], "the proxy's CONFIG SET")
            self.controls[0].config_set(name, self.controls[1].config_get(name)[name])
        except BaseException:
            self.close()
            raise
        return self

    def _start_proxy(self) -> None:
        auth = f"default:{self.password}@" if self.password else ""
        self.proxy = ProxyProcess(f"redis://{auth}{HOST}:{self.behind.port}/", self.proxy_args)
        self.proxy.__enter__()  # closes itself when it cannot start

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._drop_bystander()
        for control in self.controls:
            control.close()
        if self.proxy is not None:
            self.proxy.close()
        self.direct.close()
        self.behind.close()

    @property
    def ports(self) -> tuple[int, int]:
        assert self.proxy is not None
        return self.direct.port, self.proxy.port

    def run(self, case: Case, idle: float = IDLE, seed: int | None = None,
            index: int | None = None) -> Comparison:
        """Flush both, play ``case``, check what it left behind; the difference, if any."""
        for control in self.controls:
            control.flushall()
        # A stall that began earlier (an earlier case's doing) would be blamed on this one.
        earlier = [f"{note} (before this case: an earlier case's doing)" for note in self.health()]
        before = [max(int(c["id"]) for c in control.client_list()) for control in self.controls]
        direct, proxied = exchange(self.ports, case, idle)
        notes = [*earlier, *self._leftovers(before), *self.health()]
        return Comparison(case, direct, proxied, tuple(notes), seed, index)

    def _leftovers(self, before: list[int]) -> Iterator[str]:
        """Connections opened during the case that outlive it by :data:`LINGER` (then killed)."""
        for side, (control, after) in enumerate(zip(self.controls, before)):
            deadline = time.monotonic() + LINGER
            while True:
                left = [int(c["id"]) for c in control.client_list() if int(c["id"]) > after]
                if not left or time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            for client_id in left:
                control.execute_command("CLIENT", "KILL", "ID", client_id)
            if left:
                yield f"{['Redis', 'the proxy'][side]}'s connection to Redis outlived the client by {LINGER} s"

    def health(self) -> Iterator[str]:
        """Notes unless a bystander's PING through the proxy answers within SLOW seconds (it waits
        STALL, then RECOVER for a fresh connection, then restarts the proxy; a dead one too)."""
        assert self.proxy is not None
        if not self.proxy.is_running():
            yield f"the proxy died: {self.proxy.log_text()[-1500:]!r}"
            self._drop_bystander()
            self.proxy.close()
            self._start_proxy()
            return
        started = time.monotonic()
        try:
            if self.bystander is None:
                self.bystander = _connect_authenticated(self.ports[1], self.password)
            self.bystander.settimeout(STALL)
            self.bystander.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = self.bystander.recv(64)
            if reply != b"+PONG\r\n":
                raise OSError(f"bystander got {reply!r}")
        except OSError as exc:
            self._drop_bystander()
            yield f"a bystander's PING through the proxy failed: {exc!r}"
            try:
                wait_until(lambda: port_answers(self.ports[1], self.password), "the proxy", timeout=RECOVER)
            except AssertionError:
                yield f"the proxy did not answer for {RECOVER:.0f} s more: restarted"
                self.proxy.close()
                self._start_proxy()
            return
        elapsed = time.monotonic() - started
        if elapsed > SLOW:
            yield f"the proxy stalled: a bystander's PING took {elapsed:.2f} s"

    def _drop_bystander(self) -> None:
        if self.bystander is not None:
            self.bystander.close()
            self.bystander = None


def _connect_authenticated(port: int, password: str | None) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=STALL)
    try:
        if password is not None:
            sock.sendall(b"AUTH %s\r\n" % password.encode())
            if sock.recv(64) != b"+OK\r\n":
                raise OSError("AUTH through the proxy failed")
    except BaseException:
        sock.close()
        raise
    return sock


def port_answers(port: int, password: str | None = None) -> bool:
    """A fresh connection's PING gets +PONG within STALL seconds."""
    try:
        with _connect_authenticated(port, password) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64) == b"+PONG\r\n"
    except OSError:
        return False


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- a run -----------------------------------------------------------------------------------------


@dataclass
class Report:
    tried: int = 0
    differences: list[Comparison] = field(default_factory=list)

    def summary(self) -> str:
        return f"fuzz: {self.tried} cases tried, {len(self.differences)} differences"


def fuzz(seed: int, cases: int, seconds: float, lanes: int = 2, idle: float = IDLE,
         redis_args: Sequence[str] = (), log: Callable[[str], None] | None = None) -> Report:
    """Cases ``0..cases-1`` of ``seed`` over ``lanes`` lanes in parallel, stopping after ``seconds``."""
    report = Report()
    lock = threading.Lock()
    indices: Iterator[int] = iter(range(cases))
    deadline = time.monotonic() + seconds
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with Lane(redis_args) as lane:
                while time.monotonic() < deadline:
                    with lock:
                        index = next(indices, None)
                    if index is None:
                        return
                    result = lane.run(make_case(seed, index), idle, seed, index)
                    with lock:
                        report.tried += 1
                        if not result.same:
                            report.differences.append(result)
                            if log:
                                log(result.report())
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    report.differences.sort(key=lambda d: d.index or 0)
    return report


def replay(seed: int, indices: Sequence[int], idle: float, redis_args: Sequence[str]) -> int:
    """Play the given cases one by one and print each, equal or not."""
    failed = 0
    with Lane(redis_args) as lane:
        for index in indices:
            case = make_case(seed, index)
            result = lane.run(case, idle, seed, index)
            failed += not result.same
            print(result.report())
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=int(env("FUZZ_SEED", "1")))
    parser.add_argument("--cases", type=int, default=int(env("FUZZ_CASES", "100000")))
    parser.add_argument("--seconds", type=float, default=float(env("FUZZ_SECONDS", "300")))
    parser.add_argument("--lanes", type=int, default=int(env("FUZZ_LANES", "3")))
    parser.add_argument("--idle", type=float, default=IDLE)
    parser.add_argument("--requirepass", help="fuzz an unauthenticated client against a requirepass pair")
    parser.add_argument("--replay", type=int, nargs="+", metavar="INDEX",
                        help="play only these case indices of --seed, each once, and show both outputs")
    args = parser.parse_args(argv)
    redis_args = ("--requirepass", args.requirepass) if args.requirepass else ()
    if args.replay:
        return replay(args.seed, args.replay, args.idle, redis_args)
    started = time.monotonic()
    report = fuzz(args.seed, args.cases, args.seconds, args.lanes, args.idle, redis_args,
                  log=lambda text: print(text, flush=True))
    print(f"{report.summary()} (seed {args.seed}, {time.monotonic() - started:.0f} s)")
    if report.differences:
        print("failing cases: " + ", ".join(f"({args.seed}, {d.index})" for d in report.differences))
    return 1 if report.differences else 0


if __name__ == "__main__":
    sys.exit(main())

