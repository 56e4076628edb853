"""Scenario ``fleet`` (issue 10): more than one proxy process in front of one Redis.

The scenario is a list of parts (:data:`PARTS`), each measured on its own stack and merged into
one result; a part's keys start with its name, so parts never collide, and a part that fails
shows as ``<name>_part: not available: <why>`` without hiding the others' numbers.

- ``workers``: the command path (``redis-benchmark -t set,get -c 50`` at ``-P 1`` and ``-P 16``)
  through ``serve --workers 2`` against ``serve --workers 1``, and Redis straight for reference,
  alternated round by round: ``workers/2_vs_1_pN``. Each run also records the CPU seconds of
  redis-benchmark, Redis and the proxy (supervisor and workers together) per second of run, and
  of the whole machine (``machine_cpu``: the rest is other work on the shared machine): that is
  what says where the cores went.
- ``takeover``: three proxies on one Redis with a real broker; each round pipelines
  :data:`TAKEOVER_EVENTS` SETs through a standby and SIGKILLs the forwarder halfway, then starts a
  new instance so that three run again. Per round: the takeover time (kill -> the new forwarder's
  first message written to the broker, ``amqp_messages_written`` polled every 5 ms), events lost
  (must be 0) and duplicates (events published twice: the dead forwarder's unconfirmed tail,
  with the same message_id); median and max over the rounds.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
import time
from collections.abc import Callable

from bench.loads import combined_rps, redis_benchmark
from bench.procs import HOST, Service, Stack, Unavailable
from bench.report import median, na, paired_ratio

PIPELINES = (1, 16)
WORKERS_READY_TIMEOUT = 20.0
INFO = b"*1\r\n$17\r\nkey_evt_amqp.info\r\n"


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live children (the workers of a supervisor)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        kids = []
    total = 0.0
    for one in (pid, *kids):
        try:
            with open(f"/proc/{one}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy so far (/proc/stat: all but idle, iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _worker_pid(port: int) -> int:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(INFO)
        data = b""
        while b"worker_pid:" not in data or not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.split(b"\r\n"):
        if line.startswith(b"worker_pid:"):
            return int(line.split(b":", 1)[1])
    raise Unavailable(f"no worker_pid in key_evt_amqp.info: {data[:200]!r}")


def _wait_for_workers(port: int, count: int) -> None:
    """Until ``count`` distinct workers have answered connections (each binds on its own)."""
    seen: set[int] = set()
    deadline = time.monotonic() + WORKERS_READY_TIMEOUT
    while len(seen) < count:
        if time.monotonic() > deadline:
            raise Unavailable(f"only {len(seen)} of {count} workers answered")
        seen.add(_worker_pid(port))


def _run(port: int, pipeline: int, n: int, redis: Service, proxy: Service | None) -> dict:
    """One redis-benchmark run: requests/s and CPU seconds per second of each process."""
    before = (resource.getrusage(resource.RUSAGE_CHILDREN), redis.cpu_seconds(),
              _cpu_seconds(proxy.pid) if proxy else 0.0, _machine_busy_seconds())
    started = time.monotonic()
    result = redis_benchmark(port, "set,get", n, 50, pipeline)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    bench_cpu = (after.ru_utime + after.ru_stime) - (before[0].ru_utime + before[0].ru_stime)
    return {"rps": combined_rps(result), "benchmark_cpu": bench_cpu / wall,
            "redis_cpu": (redis.cpu_seconds() - before[1]) / wall,
            "proxy_cpu": ((_cpu_seconds(proxy.pid) - before[2]) / wall) if proxy else 0.0,
            "machine_cpu": (_machine_busy_seconds() - before[3]) / wall}


def workers(p) -> dict:
    """--workers 2 against --workers 1 on the command path; Redis straight for reference."""
    with Stack(p.profile_dir, "fleet_workers") as st:
        redis = st.redis()
        proxies = {"workers1": st.proxy(redis.port), "workers2": st.proxy(redis.port, "--workers", "2")}
        _wait_for_workers(proxies["workers2"].port, 2)
        candidates: dict[str, tuple[int, Service | None]] = {
            "direct": (redis.port, None), **{k: (s.port, s) for k, s in proxies.items()}}
        samples: dict[str, list[float]] = {}
        for r in range(p.rounds):
            for pipeline in PIPELINES:
                n = p.cmd_requests_p1 if pipeline == 1 else p.cmd_requests_p16
                for name, (port, proxy) in candidates.items():
                    for key, value in _run(port, pipeline, n, redis, proxy).items():
                        samples.setdefault(f"workers/{name}_p{pipeline}_{key}", []).append(value)
            log(f"round {r + 1}/{p.rounds}: " + ", ".join(
                f"{k.removeprefix('workers/')}={v[-1]:,.0f}" for k, v in samples.items()
                if k.endswith("_rps")))
    ratios = {}
    for pipeline in PIPELINES:
        two, one, direct = (samples[f"workers/{c}_p{pipeline}_rps"]
                            for c in ("workers2", "workers1", "direct"))
        ratios[f"workers/2_vs_1_p{pipeline}"] = paired_ratio(two, one)
        ratios[f"workers/2_vs_direct_p{pipeline}"] = paired_ratio(two, direct)
    values = {}
    for key, series in samples.items():
        values[key if key.endswith("_rps") else key + "_fraction"] = median(series)
    return {"ratios": ratios, "values": values, "samples": samples,
            "params": {"tests": "set,get", "clients": 50, "pipelines": list(PIPELINES),
                       "requests_p1": p.cmd_requests_p1, "requests_p16": p.cmd_requests_p16,
                       "usable_cores": len(os.sched_getaffinity(0)),
                       "cpu": "CPU seconds per second of run (1.0 = one core busy)"}}


TAKEOVER_EVENTS = 20_000
TAKEOVER_TIMEOUT = 30.0


def _info(port: int) -> dict[str, str]:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(INFO)
        data = b""
        while not data.endswith(b"\r\n") or data.count(b"\r\n") < 2:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"$"):
                size = int(data[1:data.index(b"\r\n")])
                if len(data) >= data.index(b"\r\n") + 2 + size + 2:
                    break
    body = data.split(b"\r\n", 1)[1].decode("utf-8", "replace")
    return dict(line.split(":", 1) for line in body.splitlines() if ":" in line)


def _role(service: Service) -> str:
    try:
        return _info(service.port)["fleet_role"]
    except (OSError, KeyError, ValueError):
        return "unreachable"


def _until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise Unavailable(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def takeover(p) -> dict:
    """SIGKILL of the forwarder among three instances, ``p.takeovers`` times."""
    from bench.amqp_raw import RawAMQP
    from bench.events import EXCHANGE, own_queue, verify
    from bench.loads import set_keys

    times: list[float] = []
    lost: list[float] = []
    duplicates: list[float] = []
    with Stack(p.profile_dir, "fleet_takeover") as st, RawAMQP() as admin:
        queue = own_queue(admin, "takeover")
        redis = st.redis()
        args = ("--amqp", p.amqp_url, "--exchange", EXCHANGE, "--routing-key", queue, "--keymask", "ALL",
                "--events", "$")
        proxies = [st.proxy(redis.port, *args) for _ in range(3)]
        try:
            for r in range(p.takeovers):
                _until(lambda: sorted(_role(s) for s in proxies) == ["forwarder", "standby", "standby"],
                       TAKEOVER_TIMEOUT, "one forwarder and two standbys", interval=0.05)
                forwarder = next(s for s in proxies if _role(s) == "forwarder")
                standbys = [s for s in proxies if s is not forwarder]
                names = [b"r%d:k%d" % (r, i) for i in range(TAKEOVER_EVENTS)]
                set_keys(standbys[0].port, names[:TAKEOVER_EVENTS // 2])
                written = {s.port: int(_info(s.port)["amqp_messages_written"]) for s in standbys}
                forwarder.proc.kill()
                killed = time.monotonic()

                def new_publishes() -> bool:
                    return any(int(_info(s.port)["amqp_messages_written"]) > written[s.port] for s in standbys)
                set_keys(standbys[0].port, names[TAKEOVER_EVENTS // 2:])
                _until(new_publishes, TAKEOVER_TIMEOUT, "the new forwarder's first publish")
                times.append((time.monotonic() - killed) * 1000)
                forwarder.proc.wait()
                st.stop(forwarder)
                bodies = admin.consume_bodies(queue, TAKEOVER_EVENTS, 60.0, idle=2.0)
                got = verify([b for b in bodies if b"key_evt_amqp.gap" not in b], names)
                lost.append(got["missing"])
                duplicates.append(got["duplicates"])
                log(f"round {r + 1}/{p.takeovers}: takeover {times[-1]:.0f} ms, lost {got['missing']}, "
                    f"duplicates {got['duplicates']}")
                proxies = [*standbys, st.proxy(redis.port, *args)]
        finally:
            admin.delete(queue)
    return {"ratios": {},
            "values": {"takeover/ms_median": median(times), "takeover/ms_max": max(times),
                       "takeover/lost_total": sum(lost), "takeover/duplicates_median": median(duplicates),
                       "takeover/duplicates_max": max(duplicates)},
            "samples": {"takeover/ms": times, "takeover/lost": lost, "takeover/duplicates": duplicates},
            "params": {"instances": 3, "events_per_round": TAKEOVER_EVENTS, "rounds": p.takeovers,
                       "kill": "SIGKILL of the forwarder after half the events of the round"}}


#: The parts of the scenario, in the order they run.
PARTS: dict[str, Callable[[object], dict]] = {"workers": workers, "takeover": takeover}


def fleet(p) -> dict:
    result: dict = {"ratios": {}, "values": {}, "samples": {}, "params": {}}
    for name, part in PARTS.items():
        log(f"part {name}")
        try:
            got = part(p)
        except Exception as exc:  # one part's failure must not hide the other parts' numbers
            result["ratios"][f"{name}_part"] = na(f"{type(exc).__name__}: {exc}")
            continue
        for key in ("ratios", "values", "samples"):
            result[key].update(got[key])
        result["params"][name] = got["params"]
    return result
