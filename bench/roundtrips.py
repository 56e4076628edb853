"""What the proxy adds to each round trip, per command (issue #8 item 15).

Run from the repository root (private redis-server, proxy and bare relay on free ports; the shared
:6379 / :5672 are never used)::

    .venv/bin/python -m bench.roundtrips                      # sockets + Python loop + redis-benchmark
    .venv/bin/python -m bench.roundtrips --only rtt --n 3000 --rounds 5
    .venv/bin/python -m bench.roundtrips --only strace        # syscalls per command, write timing
    .venv/bin/python -m bench.roundtrips --only tcl --redis-tests /path/to/redis-7.0.15 \\
        --units unit/type/zset,unit/other --rounds 3           # Redis's own test units, timed

Sections (``--only`` takes a comma list):

``sockets``
    TCP_NODELAY as the kernel has it on every TCP socket of the proxy and the bare relay (and on
    Redis's end of the proxy's upstream connection), read with ``pidfd_getfd`` + ``getsockopt``
    on a duplicate of each descriptor while a client is connected.
``rtt``
    A blocking Python client (TCP_NODELAY on) times each request -> complete reply(ies) with
    ``perf_counter_ns``, N samples per case, against Redis directly, the bare relay
    (``bench/bare_relay.py``) and the proxy, in rotated order round after round, one fresh
    connection per (case, target, round). Reported: median / p99 / max in us (all samples), the
    count of samples >= 30 ms (a Nagle + delayed-ACK stall is ~40 ms), the median over rounds of
    ``proxy/direct`` and of ``proxy - direct`` per round trip, and ``excess``: what a case adds
    per round trip beyond what PING adds (same round). ``excess`` well above 0 means an extra
    round trip or a slow path for that command.
``benchmark``
    ``redis-benchmark -c 1 -P 1 -n N --csv`` per command (and -P 10), targets alternated.
``strace``
    ``strace -c -f`` on the proxy and on the bare relay during ``redis-benchmark -c 1 -P 1 -n N``
    (syscalls per command), and ``strace -tt`` of three PINGs (does the write of a reply follow
    its read in the same loop iteration, or only after another ``epoll_wait``?).
``inproc``
    The relay's own Python per request, driven with fake transports (no sockets): us per request
    and upstream writes per request, e.g. one write per command in the exact parser's mode.
``tcl``
    Redis's own test units (``./runtest --host --port --single UNIT``) against each target,
    alternated; wall time, commands Redis processed, per-test ms, and per-command round-trip time
    from a timing wrapper around the Tcl client's ``__dispatch__raw__`` (appended once to the
    given tree's ``tests/support/redis.tcl``; inert unless ``KEA_RTT_LOG`` is set).

The numbers are for comparing targets measured moments apart; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import hiredis

from protocol.commands import encode_command
from tests.harness import HOST, ProxyProcess, RedisServer, free_port, port_accepts, unreachable_amqp_url

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("direct", "bare", "proxy")
STALL_NS = 30_000_000  # a sample this slow is a Nagle / delayed-ACK suspect (those are ~40 ms)
_MORE = object()


def log(msg: str = "") -> None:
    print(msg, flush=True)


enc = encode_command  # the proxy's own request encoder (protocol.commands)


# -- the processes ---------------------------------------------------------------------------------


@dataclass
class Stack:
    redis: RedisServer
    proxy: ProxyProcess
    bare: subprocess.Popen
    bare_port: int

    @property
    def ports(self) -> dict[str, int]:
        return {"direct": self.redis.port, "bare": self.bare_port, "proxy": self.proxy.port}

    @property
    def pids(self) -> dict[str, int]:
        return {"direct": self.redis.pid, "bare": self.bare.pid, "proxy": self.proxy.pid}


@contextlib.contextmanager
def stack():
    # DEBUG is needed by Redis's own tests and by the DEBUG SLEEP case; the proxy's AMQP points
    # at a closed port (the shared broker is never used).
    with RedisServer(["--enable-debug-command", "yes"]) as redis_server, ProxyProcess(
        redis_server.url, ["--amqp", unreachable_amqp_url(), "--log-level", "WARNING"]
    ) as proxy:
        port = free_port()
        bare = subprocess.Popen([sys.executable, "-m", "bench.bare_relay", str(port), str(redis_server.port)],
                                cwd=REPO, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            while not port_accepts(port):
                if time.monotonic() > deadline or bare.poll() is not None:
                    raise RuntimeError("bare relay did not start")
                time.sleep(0.05)
            yield Stack(redis_server, proxy, bare, port)
        finally:
            bare.terminate()
            bare.wait(5)


# -- sockets: TCP_NODELAY as the kernel has it --------------------------------------------------------


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd on x86_64 and aarch64


def tcp_sockets(pid: int) -> list[dict]:
    """Every TCP socket of ``pid``: local and peer address, TCP_NODELAY (via a duplicate)."""
    out = []
    pidfd = os.pidfd_open(pid)
    try:
        for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            dup = _pidfd_getfd(pidfd, int(name))
            if dup < 0:
                continue
            sock = socket.socket(fileno=dup)
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                    continue
                local = sock.getsockname()[1]
                try:
                    peer = sock.getpeername()[1]
                except OSError:
                    peer = None  # listening
                out.append({"fd": int(name), "local": local, "peer": peer,
                            "nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)})
            finally:
                sock.close()  # closes our duplicate only
    finally:
        os.close(pidfd)
    return out


def section_sockets(st: Stack, args) -> dict:
    log("== sockets: TCP_NODELAY on each TCP socket (getsockopt on a pidfd_getfd duplicate)")
    clients = {}
    for name in ("proxy", "bare"):
        c = socket.create_connection((HOST, st.ports[name]))
        c.sendall(enc("PING"))
        c.recv(64)
        clients[name] = c
    result = {}
    try:
        redis_port = st.redis.port
        for name in ("proxy", "bare"):
            rows = tcp_sockets(st.pids[name])
            mine = clients[name].getsockname()[1]
            for r in rows:
                if r["peer"] is None:
                    r["role"] = "listening"
                elif r["peer"] == mine:
                    r["role"] = "accepted client (our connection)"
                elif r["peer"] == redis_port:
                    r["role"] = "upstream to Redis"
                else:
                    r["role"] = "other"
            result[name] = rows
            for r in rows:
                log(f"  {name:5s} fd {r['fd']:3d} {r['role']:34s} local :{r['local']} peer :{r['peer']} "
                    f"TCP_NODELAY={r['nodelay']}")
        # Redis's end of the proxy's upstream connection (Redis sets it itself: anetEnableTcpNoDelay)
        ups = {r["local"] for r in result["proxy"] if r["role"] == "upstream to Redis"}
        rows = [r for r in tcp_sockets(st.redis.pid) if r["peer"] in ups]
        for r in rows:
            log(f"  redis fd {r['fd']:3d} {'accepted from the proxy':34s} local :{r['local']} "
                f"peer :{r['peer']} TCP_NODELAY={r['nodelay']}")
        result["redis_side"] = rows
    finally:
        for c in clients.values():
            c.close()
    return result


# -- rtt: the Python loop ------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    steps: list[tuple[bytes, int]]  # (bytes written at once, replies to read) per round trip
    setup: list[bytes] = field(default_factory=list)  # one reply each, not timed
    proxy_only: bool = False
    divide_n: int = 1  # fewer samples for the big ones

    @property
    def trips(self) -> int:
        return len(self.steps)


def cases() -> list[Case]:
    big = b"x" * 100_000
    zmembers = []
    for i in range(100):
        zmembers += [str(i * 1.5), f"member:{i}"]
    one = lambda *a: [(enc(*a), 1)]  # noqa: E731
    return [
        Case("PING", one("PING")),
        Case("SET 16B", one("SET", "k:s", "v" * 16)),
        Case("GET 16B", one("GET", "k:s"), [enc("SET", "k:s", "v" * 16)]),
        Case("INCR", one("INCR", "k:n")),
        Case("ZADD", one("ZADD", "k:zadd", "1.5", "m")),
        Case("ZRANGE 100 WITHSCORES", one("ZRANGE", "k:z", 0, -1, "WITHSCORES"),
             [enc("DEL", "k:z"), enc("ZADD", "k:z", *zmembers)]),
        Case("ZSCORE", one("ZSCORE", "k:z", "member:7"), [enc("ZADD", "k:z", *zmembers)]),
        Case("MULTI/INCR/EXEC, 3 trips", [(enc("MULTI"), 1), (enc("INCR", "k:m"), 1), (enc("EXEC"), 1)]),
        Case("MULTI+INCR+EXEC, 1 write", [(enc("MULTI") + enc("INCR", "k:m") + enc("EXEC"), 3)]),
        Case("SELECT 0", one("SELECT", 0)),
        Case("CLIENT SETNAME", one("CLIENT", "SETNAME", "lat")),
        Case("CLIENT ID", one("CLIENT", "ID")),
        Case("DEBUG SLEEP 0", one("DEBUG", "SLEEP", 0)),
        Case("HELLO 2", one("HELLO", 2)),
        Case("HELLO 3", one("HELLO", 3)),
        Case("CONFIG GET maxmemory", one("CONFIG", "GET", "maxmemory")),
        Case("EVAL return 1", one("EVAL", "return 1", 0)),
        Case("SET 100KB", one("SET", "k:big", big)),
        Case("GET 100KB", one("GET", "k:big"), [enc("SET", "k:big", big)]),
        Case("pipeline 10 SET", [(b"".join(enc("SET", f"k:p{i}", "v") for i in range(10)), 10)]),
        Case("pipeline 10 GET", [(b"".join(enc("GET", f"k:p{i}") for i in range(10)), 10)]),
        Case("pipeline 1000 SET+GET", [(b"".join(enc("SET", f"k:q{i}", f"0000{i}0000") + enc("GET", f"k:q{i}")
                                                  for i in range(500)), 1000)], divide_n=20),
        # The shape of unit/other's "PIPELINING stresser": a burst of inline commands.
        Case("pipeline 1000 inline SET+GET", [(b"".join(b"SET k:q%d 0000%d0000\r\nGET k:q%d\r\n" % (i, i, i)
                                                         for i in range(500)), 1000)], divide_n=20),
        Case("inline PING", [(b"PING\r\n", 1)]),
        # One inline command turns the proxy's connection to its exact parser for good.
        Case("GET after an inline cmd", one("GET", "k:s"), [b"PING\r\n"]),
        # CLIENT REPLY ON makes the proxy's connection a plain pipe for good.
        Case("GET in pipe mode", one("GET", "k:s"), [enc("CLIENT", "REPLY", "ON")]),
        Case("key_evt_amqp.info (barrier)", one("key_evt_amqp.info"), proxy_only=True),
    ]


def _read(sock: socket.socket, reader: hiredis.Reader, count: int) -> list:
    got = []
    while len(got) < count:
        reply = reader.gets()
        if reply is _MORE:
            data = sock.recv(262144)
            if not data:
                raise ConnectionError("closed")
            reader.feed(data)
            continue
        got.append(reply)
    return got


def run_case(port: int, case: Case, n: int, warm: int) -> tuple[list[int], list]:
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = hiredis.Reader(notEnoughData=_MORE)
    try:
        for data in case.setup:
            sock.sendall(data)
            _read(sock, reader, 1)
        samples, first = [], []
        clock = time.perf_counter_ns
        for i in range(warm + n):
            t0 = clock()
            for data, count in case.steps:
                sock.sendall(data)
                replies = _read(sock, reader, count)
            dt = clock() - t0
            if i >= warm:
                samples.append(dt)
            elif i == 0:
                first = replies
        return samples, first
    finally:
        sock.close()


def redis_io(port: int) -> tuple[int, int]:
    """Redis's total_reads_processed / total_writes_processed (one read and one write are this query's)."""
    with socket.create_connection((HOST, port)) as sock:
        sock.sendall(enc("INFO", "stats"))
        reader = hiredis.Reader(notEnoughData=_MORE)
        text = _read(sock, reader, 1)[0].decode()
    stats = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(stats["total_reads_processed"]), int(stats["total_writes_processed"])


def pct(values: list[int], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _short(reply) -> str:
    text = repr(reply)
    return text if len(text) < 60 else text[:57] + "..."


def _io(io: dict, case: str, target: str) -> str:
    vals = io.get((case, target))
    if not vals:
        return "-"
    return "/".join(f"{statistics.median(x[k] for x in vals):.2f}" for k in (0, 1))


def section_rtt(st: Stack, args) -> dict:
    log(f"== rtt: Python loop, {args.n} samples per case/target/round, {args.rounds} rounds, "
        "one connection per case, TCP_NODELAY on the client")
    all_cases = cases()
    if args.cases:
        wanted = [w.strip().lower() for w in args.cases.split(",")]
        all_cases = [c for c in all_cases if any(w in c.name.lower() for w in wanted) or c.name == "PING"]
    samples: dict[tuple[str, str], list[int]] = defaultdict(list)
    medians: dict[tuple[str, str], list[float]] = defaultdict(list)  # per round
    firsts: dict[tuple[str, str], list] = {}
    io: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)  # Redis reads, writes per sample
    for r in range(args.rounds):
        order = TARGETS[r % 3:] + TARGETS[:r % 3]
        for case in all_cases:
            for target in order:
                if case.proxy_only and target != "proxy":
                    continue
                n, warm = max(10, args.n // case.divide_n), max(2, args.warm // case.divide_n)
                before = redis_io(st.redis.port)
                s, first = run_case(st.ports[target], case, n, warm)
                after = redis_io(st.redis.port)
                # minus the INFO query's own read and write, and the setup commands' (one each)
                io[case.name, target].append(tuple(
                    (after[k] - before[k] - 1 - len(case.setup)) / (n + warm) for k in (0, 1)))
                samples[case.name, target] += s
                medians[case.name, target].append(statistics.median(s))
                firsts.setdefault((case.name, target), first)
        log(f"  round {r + 1}/{args.rounds} done")

    def added(case: Case, target: str, rnd: int) -> float:
        return (medians[case.name, target][rnd] - medians[case.name, "direct"][rnd]) / case.trips

    ping = all_cases[0]
    rows = []
    head = (f"{'case':30s} {'trips':>5s} | {'direct med/p99':>15s} | {'bare med/p99':>15s} | "
            f"{'proxy med/p99/max':>22s} | {'>=30ms':>6s} | {'px/dir':>6s} {'px/bare':>7s} | "
            f"{'+us/trip':>8s} {'excess':>7s} | Redis rd/wr per sample: dir, proxy")
    log(head)
    log("-" * len(head))
    for case in all_cases:
        row = {"case": case.name, "trips": case.trips}
        for target in TARGETS:
            s = samples.get((case.name, target))
            if s:
                row[target] = {"median_us": statistics.median(s) / 1e3, "p99_us": pct(s, 0.99) / 1e3,
                               "max_us": max(s) / 1e3, "stalls_ge_30ms": sum(x >= STALL_NS for x in s),
                               "first_reply": _short(firsts[case.name, target])}
        px = row["proxy"]
        if case.proxy_only:
            rnds = range(args.rounds)
            row["proxy/proxy_ping"] = statistics.median(
                medians[case.name, "proxy"][i] / medians["PING", "proxy"][i] for i in rnds)
            row["added_vs_proxy_ping_us"] = statistics.median(
                (medians[case.name, "proxy"][i] - medians["PING", "proxy"][i]) / 1e3 for i in rnds)
            log(f"{case.name:30s} {case.trips:5d} | {'':>15s} | {'':>15s} | "
                f"{px['median_us']:6.1f}/{px['p99_us']:6.1f}/{px['max_us']:7.0f} | {px['stalls_ge_30ms']:6d} | "
                f"vs proxy PING: x{row['proxy/proxy_ping']:.2f}, +{row['added_vs_proxy_ping_us']:.1f} us | "
                f"Redis rd/wr {_io(io, case.name, 'proxy')}")
            rows.append(row)
            continue
        rnds = range(args.rounds)
        row["proxy/direct"] = statistics.median(
            medians[case.name, "proxy"][i] / medians[case.name, "direct"][i] for i in rnds)
        row["proxy/bare"] = statistics.median(
            medians[case.name, "proxy"][i] / medians[case.name, "bare"][i] for i in rnds)
        row["added_per_trip_us"] = statistics.median(added(case, "proxy", i) / 1e3 for i in rnds)
        row["bare_added_per_trip_us"] = statistics.median(added(case, "bare", i) / 1e3 for i in rnds)
        row["excess_vs_ping_us"] = statistics.median(
            (added(case, "proxy", i) - added(ping, "proxy", i)) / 1e3 for i in rnds)
        stalls = sum(row[t]["stalls_ge_30ms"] for t in TARGETS)
        d, b = row["direct"], row["bare"]
        log(f"{case.name:30s} {case.trips:5d} | {d['median_us']:6.1f}/{d['p99_us']:7.1f} | "
            f"{b['median_us']:6.1f}/{b['p99_us']:7.1f} | {px['median_us']:6.1f}/{px['p99_us']:6.1f}/"
            f"{px['max_us']:7.0f} | {stalls:6d} | {row['proxy/direct']:6.2f} {row['proxy/bare']:7.2f} | "
            f"{row['added_per_trip_us']:8.1f} {row['excess_vs_ping_us']:7.1f} | {_io(io, case.name, 'direct')}, "
            f"{_io(io, case.name, 'proxy')}")
        rows.append(row)
    for row in rows:
        for t in TARGETS:
            if (row["case"], t) in io:
                row.setdefault(t, {})["redis_reads_writes_per_sample"] = [
                    statistics.median(x[k] for x in io[row["case"], t]) for k in (0, 1)]
    bad = [f"{k[0]}@{k[1]}: {v}" for k, v in firsts.items()
           if any(isinstance(x, hiredis.ReplyError) for x in v)]
    if bad:
        log("  error replies: " + "; ".join(bad))
    return {"rows": rows, "n": args.n, "rounds": args.rounds}


# -- benchmark: redis-benchmark -c 1 -----------------------------------------------------------------------


BENCH_SPECS: list[tuple[str, list[str], list[str]]] = [  # (name, options, command)
    ("PING_MBULK", ["-t", "ping_mbulk"], []),
    ("SET", ["-t", "set"], []),
    ("GET", ["-t", "get"], []),
    ("INCR", ["-t", "incr"], []),
    ("ZADD", ["-t", "zadd"], []),
    ("ZRANGE 100 WITHSCORES", [], ["ZRANGE", "k:z", "0", "-1", "WITHSCORES"]),
    ("SELECT 0", [], ["SELECT", "0"]),
    ("CLIENT SETNAME", [], ["CLIENT", "SETNAME", "lat"]),
    ("CLIENT ID", [], ["CLIENT", "ID"]),
    ("DEBUG SLEEP 0", [], ["DEBUG", "SLEEP", "0"]),
    ("HELLO 2", [], ["HELLO", "2"]),
    ("HELLO 3", [], ["HELLO", "3"]),
    ("CONFIG GET maxmemory", [], ["CONFIG", "GET", "maxmemory"]),
    ("EVAL return 1", [], ["EVAL", "return 1", "0"]),
    ("SET 100KB", ["-t", "set", "-d", "100000"], []),
    ("GET 100KB", ["-t", "get", "-d", "100000"], []),
    ("-P 10 SET", ["-t", "set", "-P", "10"], []),
    ("-P 10 GET", ["-t", "get", "-P", "10"], []),
]


def redis_benchmark(port: int, n: int, opts: list[str], command: list[str]) -> dict[str, float]:
    argv = ["redis-benchmark", "-h", HOST, "-p", str(port), "-c", "1", "-n", str(n), "--csv"]
    argv += opts if "-P" in opts else [*opts, "-P", "1"]
    argv += command
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    rows = [r for r in csv.reader(io.StringIO(done.stdout)) if r]
    if done.returncode != 0 or len(rows) < 2 or rows[0][:2] != ["test", "rps"]:
        raise RuntimeError(f"redis-benchmark failed: {done.stdout[-200:]} {done.stderr[-200:]}")
    return {k: float(v) for k, v in zip(rows[0][1:], rows[-1][1:])}


def section_benchmark(st: Stack, args) -> dict:
    log(f"== benchmark: redis-benchmark -c 1 -P 1 -n {args.bench_n} (ms), {args.rounds} rounds alternated")
    with st.redis.client() as c:  # the keys the custom commands read
        c.delete("k:z")
        c.zadd("k:z", {f"member:{i}": i * 1.5 for i in range(100)})
    res: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in range(args.rounds):
        order = TARGETS[r % 3:] + TARGETS[:r % 3]
        for name, opts, command in BENCH_SPECS:
            for target in order:
                res[name, target].append(redis_benchmark(st.ports[target], args.bench_n, opts, command))
        log(f"  round {r + 1}/{args.rounds} done")
    head = (f"{'command':24s} | {'direct p50/p99':>14s} | {'bare p50/p99':>14s} | {'proxy p50/p99/max':>20s} | "
            f"{'px/dir avg':>10s} {'px/bare avg':>11s} | {'+us avg':>7s}")
    log(head)
    log("-" * len(head))
    rows = []
    for name, _, _ in BENCH_SPECS:
        med = {t: {k: statistics.median(x[k] for x in res[name, t])
                   for k in ("avg_latency_ms", "p50_latency_ms", "p99_latency_ms", "max_latency_ms", "rps")}
               for t in TARGETS}
        rnds = range(args.rounds)
        avg = lambda t, i: res[name, t][i]["avg_latency_ms"]  # noqa: E731
        row = {"command": name, **med,
               "proxy/direct_avg": statistics.median(avg("proxy", i) / avg("direct", i) for i in rnds),
               "proxy/bare_avg": statistics.median(avg("proxy", i) / avg("bare", i) for i in rnds),
               "added_avg_us": statistics.median((avg("proxy", i) - avg("direct", i)) * 1e3 for i in rnds)}
        d, b, p = med["direct"], med["bare"], med["proxy"]
        log(f"{name:24s} | {d['p50_latency_ms']:6.3f}/{d['p99_latency_ms']:6.3f} | "
            f"{b['p50_latency_ms']:6.3f}/{b['p99_latency_ms']:6.3f} | "
            f"{p['p50_latency_ms']:5.3f}/{p['p99_latency_ms']:5.3f}/{p['max_latency_ms']:6.2f} | "
            f"{row['proxy/direct_avg']:10.2f} {row['proxy/bare_avg']:11.2f} | {row['added_avg_us']:7.1f}")
        rows.append(row)
    return {"rows": rows, "n": args.bench_n}


# -- strace: syscalls per command and when replies are written ---------------------------------------------


def _burst(port: int, bursts: int, inline: bool) -> None:
    """``bursts`` times: 500 SET + 500 GET in one write (inline or multibulk), all replies read."""
    if inline:
        data = b"".join(b"SET k:q%d 0000%d0000\r\nGET k:q%d\r\n" % (i, i, i) for i in range(500))
    else:
        data = b"".join(enc("SET", f"k:q{i}", f"0000{i}0000") + enc("GET", f"k:q{i}") for i in range(500))
    sock = socket.create_connection((HOST, port))
    reader = hiredis.Reader(notEnoughData=_MORE)
    for _ in range(bursts):
        sock.sendall(data)
        _read(sock, reader, 1000)
    sock.close()


def _strace_count(pid: int, port: int, n: int, test: str) -> dict[str, int]:
    out = tempfile.mktemp(prefix="kea-strace-")
    tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", out],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        if test.startswith("burst"):
            _burst(port, n // 1000, inline=test == "burst-inline")
        else:
            subprocess.run(["redis-benchmark", "-h", HOST, "-p", str(port), "-c", "1", "-P", "1", "-n", str(n),
                            "-t", test, "-q"], capture_output=True, check=True, timeout=600)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
    counts = {}
    for line in Path(out).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1].isidentifier() and parts[3].isdigit() and parts[-1] != "total":
            counts[parts[-1]] = int(parts[3])
    os.unlink(out)
    return counts


def _strace_sequence(pid: int, port: int, request: bytes, replies: int = 1, times: int = 3) -> list[str]:
    out = tempfile.mktemp(prefix="kea-strace-")
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = hiredis.Reader(notEnoughData=_MORE)
    sock.sendall(request)
    _read(sock, reader, replies)
    tracer = subprocess.Popen(["strace", "-f", "-tt", "-p", str(pid), "-o", out, "-e",
                               "trace=read,write,writev,recvfrom,sendto,sendmsg,recvmsg,epoll_wait,epoll_pwait"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    for _ in range(times):
        sock.sendall(request)
        _read(sock, reader, replies)
        time.sleep(0.05)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    sock.close()
    lines = Path(out).read_text().splitlines()
    os.unlink(out)
    # from the first read of the client's request on, idle epoll timeouts left out
    head = repr(request[:6])[2:-1].replace("\\\\", "\\")
    start = next((i for i, line in enumerate(lines) if " read(" in line and head in line), 0)
    return [line for line in lines[start:] if "= 0" not in line or "epoll" not in line]


def section_strace(st: Stack, args) -> dict:
    if not shutil.which("strace"):
        log("== strace: not available (apt-get install strace)")
        return {}
    n = args.strace_n
    log(f"== strace -c -f during redis-benchmark -c 1 -P 1 -n {n} (ping_mbulk, get) and during {n // 1000} "
        "bursts of 500 SET + 500 GET in one write (burst-*): syscalls per command")
    result = {}
    for name in ("bare", "proxy"):
        for test in ("ping_mbulk", "get", "burst-multibulk", "burst-inline"):
            counts = _strace_count(st.pids[name], st.ports[name], n, test)
            per = {k: round(v / n, 2) for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v >= n // 200}
            result[f"{name}_{test}"] = per
            log(f"  {name:5s} {test:15s} total {sum(counts.values()) / n:5.2f}/cmd: " +
                ", ".join(f"{k} {v}" for k, v in per.items()))
    for label, request, replies, times in (
            ("PING", enc("PING"), 1, 2),
            ("MULTI+INCR+EXEC in one write", enc("MULTI") + enc("INCR", "k:m") + enc("EXEC"), 3, 1),
            ("HELLO 3", enc("HELLO", 3), 1, 1),
            ("key_evt_amqp.info", enc("key_evt_amqp.info"), 1, 1)):
        log(f"== strace -tt, {label} x{times} through the proxy: the proxy's syscalls per request")
        seq = _strace_sequence(st.pids["proxy"], st.ports["proxy"], request, replies, times)
        for line in seq[:30]:
            log("  " + line[:200])
        result[f"proxy_sequence {label}"] = seq
    return result


# -- tcl: Redis's own test units ---------------------------------------------------------------------------

TCL_MARK = "# kea-roundtrips timing wrapper"
TCL_WRAPPER = TCL_MARK + r"""
if {[info exists ::env(KEA_RTT_LOG)] && [info commands ::redis::__dispatch__raw__untimed] eq ""} {
    rename ::redis::__dispatch__raw__ ::redis::__dispatch__raw__untimed
    set ::redis::kea_log [open "$::env(KEA_RTT_LOG).[pid]" a]
    proc ::redis::__dispatch__raw__ {id method argv} {
        set deferred [expr {[info exists ::redis::deferred($id)] && $::redis::deferred($id)}]
        set t0 [clock microseconds]
        set code [catch {uplevel 1 [list ::redis::__dispatch__raw__untimed $id $method $argv]} res opts]
        set dt [expr {[clock microseconds] - $t0}]
        set name [string tolower $method]
        if {$name in {client config object debug cluster script function xinfo memory command acl}} {
            append name " " [string tolower [lindex $argv 0]]
        }
        puts $::redis::kea_log "[expr {$deferred ? {deferred } : {}}]$name\t$dt"
        return -options $opts $res
    }
}
"""


def _prepare_tree(tree: Path) -> None:
    if not (tree / "runtest").exists():
        raise SystemExit(f"{tree} has no runtest: give the top of a Redis source tree "
                         "(e.g. `apt-get source redis` with a deb-src line)")
    (tree / "src").mkdir(exist_ok=True)
    for binary in ("redis-server", "redis-cli", "redis-benchmark", "redis-check-aof", "redis-check-rdb"):
        link = tree / "src" / binary
        if not link.exists() and shutil.which(binary):
            link.symlink_to(shutil.which(binary))
    support = tree / "tests" / "support" / "redis.tcl"
    text = support.read_text()
    if TCL_MARK not in text:
        support.write_text(text + "\n" + TCL_WRAPPER)


def _test_times(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\[(ok|err|skip|exception)\]: (.*) \((\d+) ms\)", re.sub(r"\x1b\[[0-9;]*m", "", line).strip())
        if m:
            key, i = m.group(2), 0
            while f"{key} #{i}" in out:
                i += 1
            out[f"{key} #{i}"] = int(m.group(3))
    return out


def _run_unit(tree: Path, port: int, unit: str, redis_server: RedisServer) -> dict:
    logbase = tempfile.mktemp(prefix="kea-tclrtt-")
    with redis_server.client() as c:
        c.config_resetstat()
    t0 = time.monotonic()
    done = subprocess.run(["./runtest", "--host", HOST, "--port", str(port), "--single", unit, "--clients", "1"],
                          cwd=tree, capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, KEA_RTT_LOG=logbase))
    wall = time.monotonic() - t0
    with redis_server.client() as c:
        stats = c.info("stats")
    per_cmd: dict[str, list[int]] = defaultdict(list)
    for path in Path(logbase).parent.glob(Path(logbase).name + ".*"):
        for line in path.read_text(errors="replace").splitlines():
            name, _, us = line.rpartition("\t")
            if us.isdigit():
                per_cmd[name].append(int(us))
        path.unlink()
    passed = "All tests passed without errors" in done.stdout
    return {"wall_s": wall, "passed": passed, "rc": done.returncode,
            "commands": stats["total_commands_processed"], "connections": stats["total_connections_received"],
            "tests": _test_times(done.stdout),
            "per_cmd": {k: (len(v), sum(v), statistics.median(v)) for k, v in per_cmd.items()},
            "tail": "" if passed else done.stdout[-1500:]}


def section_tcl(st: Stack, args) -> dict:
    if not args.redis_tests:
        log("== tcl: skipped (no --redis-tests DIR)")
        return {}
    tree = Path(args.redis_tests).resolve()
    _prepare_tree(tree)
    targets = args.tcl_targets.split(",")
    out = {}
    for unit in args.units.split(","):
        log(f"== tcl: {unit}, {args.rounds} rounds alternated ({', '.join(targets)})")
        runs: dict[str, list[dict]] = defaultdict(list)
        for r in range(args.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for target in order:
                runs[target].append(_run_unit(tree, st.ports[target], unit, st.redis))
            log("  round %d: " % (r + 1) + ", ".join(
                f"{t} {runs[t][-1]['wall_s']:.1f}s{'' if runs[t][-1]['passed'] else ' (FAILED)'}" for t in targets))
        rnds = range(args.rounds)
        wall = {t: statistics.median(x["wall_s"] for x in runs[t]) for t in targets}
        ratio = {t: statistics.median(runs[t][i]["wall_s"] / runs["direct"][i]["wall_s"] for i in rnds)
                 for t in targets}
        commands = statistics.median(x["commands"] for x in runs["direct"])
        log(f"  wall s (median): " + ", ".join(f"{t} {wall[t]:.1f} (x{ratio[t]:.2f})" for t in targets)
            + f"; Redis processed ~{commands:,.0f} commands, "
            f"{runs['direct'][0]['connections']} connections per run")
        for t in targets:
            if t != "direct":
                extra = statistics.median(runs[t][i]["wall_s"] - runs["direct"][i]["wall_s"] for i in rnds)
                log(f"  {t}: +{extra:.2f} s = {extra / commands * 1e6:.1f} us per command Redis processed")
        # per command, from the Tcl client's own timing: total time pooled over rounds
        pooled = {t: defaultdict(lambda: [0, 0, []]) for t in targets}
        for t in targets:
            for run in runs[t]:
                for name, (cnt, us, med) in run["per_cmd"].items():
                    pooled[t][name][0] += cnt
                    pooled[t][name][1] += us
                    pooled[t][name][2].append(med)
        names = set().union(*(pooled[t].keys() for t in targets))
        rows = []
        for name in names:
            d = pooled["direct"].get(name, [0, 0, []])
            p = pooled["proxy"].get(name, [0, 0, []]) if "proxy" in targets else [0, 0, []]
            b = pooled["bare"].get(name, [0, 0, []]) if "bare" in targets else [0, 0, []]
            if not d[0] or not p[0]:
                continue
            rows.append({"command": name, "calls_per_run": d[0] / args.rounds,
                         "direct_us": d[1] / d[0], "bare_us": b[1] / b[0] if b[0] else None,
                         "proxy_us": p[1] / p[0], "direct_med_us": statistics.median(d[2]),
                         "bare_med_us": statistics.median(b[2]) if b[2] else None,
                         "proxy_med_us": statistics.median(p[2]),
                         "added_s_per_run": (p[1] / p[0] - d[1] / d[0]) * d[0] / args.rounds / 1e6})
        rows.sort(key=lambda x: -x["added_s_per_run"])
        total_added = sum(x["added_s_per_run"] for x in rows)
        log(f"  per command (Tcl client's round trip in us, mean and median of run medians; "
            f"added = (proxy-direct mean) x calls), sum of added {total_added:.2f} s/run:")
        log(f"    {'command':24s} {'calls/run':>9s} {'direct':>13s} {'bare':>13s} {'proxy':>13s} {'added s':>8s}")
        for x in rows[:args.top]:
            bare = (f"{x['bare_us']:6.1f}/{x['bare_med_us']:6.1f}" if x["bare_us"] is not None else f"{'-':>13s}")
            log(f"    {x['command'][:24]:24s} {x['calls_per_run']:9.0f} {x['direct_us']:6.1f}/{x['direct_med_us']:6.1f} "
                f"{bare} {x['proxy_us']:6.1f}/{x['proxy_med_us']:6.1f} {x['added_s_per_run']:8.2f}")
        # per test: median over rounds of proxy - direct
        tests = runs["direct"][0]["tests"].keys()
        diffs = []
        for name in tests:
            try:
                vals = [runs["proxy"][i]["tests"][name] - runs["direct"][i]["tests"][name] for i in rnds]
                meds = {t: statistics.median(x["tests"][name] for x in runs[t]) for t in targets}
            except KeyError:
                continue
            diffs.append((statistics.median(vals), name, meds))
        diffs.sort(key=lambda x: -x[0])
        log(f"  tests with the largest median added time, proxy - direct (ms; medians per target)")
        log("    " + " ".join(f"{t:>7s}" for t in targets) + "   added  test")
        for added_ms, name, meds in diffs[:args.top]:
            log("    " + " ".join(f"{meds[t]:7.0f}" for t in targets) + f" {added_ms:+7.0f}  {name[:80]}")
        for t in targets:
            for run in runs[t]:
                if not run["passed"]:
                    log(f"  {t}: a run did not pass: ...{run['tail'][-600:]}")
        out[unit] = {"wall_s": wall, "ratio_vs_direct": ratio, "commands": commands, "per_command": rows,
                     "per_test": diffs, "runs": {t: [{k: v for k, v in x.items() if k not in ("tests", "per_cmd")}
                                                      for x in runs[t]] for t in targets}}
    return out


# -- inproc: the proxy's own Python per request, without sockets --------------------------------------------


def section_inproc(st: Stack | None, args) -> dict:
    """Drive a ClientConnection with fake transports: Python time and writes per request.

    Uses the relay's internals (ClientConnection, its ``_up_write`` and ``barrier``); when they
    change shape this section says so and measures nothing.
    """
    log("== inproc: the relay's Python per request (fake transports, no syscalls; medians)")
    try:
        from proxy.relay import ClientConnection
    except Exception as exc:  # noqa: BLE001
        log(f"  not available: {exc!r}")
        return {}

    class Transport:
        def __init__(self):
            self.out = []

        def write(self, data):
            self.out.append(data)

        def is_closing(self):
            return False

        def pause_reading(self):
            pass

        def resume_reading(self):
            pass

    class Server:
        buffer_limit = 1 << 20

    hello3 = (b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n$5\r\nproto\r\n:3\r\n"
              b"$2\r\nid\r\n:5\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n")
    big = b"x" * 100_000
    inline_burst = b"".join(b"SET k:q%d 0000%d0000\r\nGET k:q%d\r\n" % (i, i, i) for i in range(500))
    specs = [  # label, setup bytes (one reply each), request, reply, requests per sample
        ("PING", [], enc("PING"), b"+PONG\r\n", 1),
        ("GET", [], enc("GET", "k"), b"$1\r\nv\r\n", 1),
        ("CLIENT SETNAME (noticed name)", [], enc("CLIENT", "SETNAME", "x"), b"+OK\r\n", 1),
        ("MULTI+INCR+EXEC, 1 write", [], enc("MULTI") + enc("INCR", "k") + enc("EXEC"),
         b"+OK\r\n+QUEUED\r\n*1\r\n:1\r\n", 1),
        ("HELLO 3 (barrier)", [], enc("HELLO", 3), hello3, 1),
        ("SET 100KB", [], enc("SET", "k", big), b"+OK\r\n", 1),
        ("GET 100KB", [], enc("GET", "k"), b"$100000\r\n" + big + b"\r\n", 1),
        ("GET after an inline cmd", [b"PING\r\n"], enc("GET", "k"), b"$1\r\nv\r\n", 1),
        ("1000 inline SET+GET, 1 chunk", [], inline_burst, b"+OK\r\n$1\r\nv\r\n" * 500, 1000),
    ]
    out = {}
    try:
        for label, setup, request, reply, per in specs:
            client = ClientConnection(Server(), None)
            client.transport = Transport()
            upstream: list[bytes] = []
            client._up_write = upstream.append
            for data in setup:
                client.data_received(data)
                client.reply_data(b"+PONG\r\n")
            times = []
            rounds = 20_000 if per == 1 and len(request) < 1000 else 300
            for _ in range(rounds):
                upstream.clear()
                client.transport.out.clear()
                t0 = time.perf_counter_ns()
                client.data_received(request)
                marker = client.barrier.marker_reply if client.barrier is not None else b""
                client.reply_data(reply + marker)
                times.append(time.perf_counter_ns() - t0)
            us = statistics.median(times) / 1e3 / per
            writes = len(upstream)
            out[label] = {"us_per_request": us, "upstream_writes_per_sample": writes, "mode": client.mode.value}
            log(f"  {label:32s} {us:6.2f} us/request, {writes:4d} upstream write(s) per sample, "
                f"mode {client.mode.value}")
    except Exception as exc:  # noqa: BLE001 - the relay changed shape
        log(f"  stopped: {exc!r}")
    return out


# -- main -------------------------------------------------------------------------------------------------------

SECTIONS = {"sockets": section_sockets, "rtt": section_rtt, "benchmark": section_benchmark,
            "strace": section_strace, "tcl": section_tcl,
            "inproc": section_inproc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="sockets,rtt,benchmark", help="comma list of " + ",".join(SECTIONS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000, help="rtt: samples per case, target and round")
    ap.add_argument("--warm", type=int, default=50)
    ap.add_argument("--cases", default="", help="rtt: only cases whose name contains one of these (+PING)")
    ap.add_argument("--bench-n", type=int, default=20000)
    ap.add_argument("--strace-n", type=int, default=20000)
    ap.add_argument("--redis-tests", default=os.environ.get("REDIS_TESTS"), help="tcl: a Redis source tree")
    ap.add_argument("--units", default="unit/type/zset,unit/other")
    ap.add_argument("--tcl-targets", default="direct,bare,proxy")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    results = {}
    with stack() as st:
        log(f"redis :{st.redis.port} (pid {st.redis.pid}), bare relay :{st.bare_port} (pid {st.bare.pid}), "
            f"proxy :{st.proxy.port} (pid {st.proxy.pid}); load {os.getloadavg()[0]:.2f}")
        for name in args.only.split(","):
            results[name] = SECTIONS[name.strip()](st, args)
            log()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
