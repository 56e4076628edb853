"""``serve --workers N``: a supervisor and N worker processes sharing the port (proxy/workers.py),
against a private redis-server. The broker is unreachable: these tests are about processes,
connections and our commands, not events."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness import (REPO_ROOT, ErrorReply, ProxyProcess, RawClient, RedisServer, port_accepts,
                     unreachable_amqp_url, wait_for)
from rabbit import RabbitQueue

CLIENTS = 40
RESTART_TIMEOUT = 10.0  # seconds for a killed worker's successor to answer (takes ~1 s here)


def info_of(raw: RawClient) -> dict[bytes, bytes]:
    text = raw.command("key_evt_amqp.info")
    assert isinstance(text, bytes) and not isinstance(text, ErrorReply), text
    return dict(line.split(b":", 1) for line in text.split(b"\r\n") if line and not line.startswith(b"#"))


def worker_of(raw: RawClient) -> tuple[int, int]:
    """(worker index, worker pid) of the process serving this connection."""
    info = info_of(raw)
    return int(info[b"worker"]), int(info[b"worker_pid"])


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def answering(proxy: ProxyProcess, connections: int = 12) -> set[int]:
    """The worker pids that answer ``connections`` new connections (the kernel picks by hash)."""
    pids = set()
    for _ in range(connections):
        with RawClient(proxy.port) as raw:
            pids.add(worker_of(raw)[1])
    return pids


def all_workers_answer(proxy: ProxyProcess, count: int) -> set[int]:
    """Wait until ``count`` workers run and each answers a connection; their pids."""
    def every_worker_answers() -> set[int] | None:
        pids = children(proxy.pid)
        return pids if len(pids) == count and answering(proxy) == pids else None
    return wait_for(every_worker_answers, timeout=20, message=f"for {count} workers to answer")


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for whoever adopted it counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and of its children it has waited for (utime stime cutime cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


@contextmanager
def workers_proxy(redis_server: RedisServer, *args: str, workers: str = "2",
                  cls: type[ProxyProcess] = ProxyProcess) -> Iterator[ProxyProcess]:
    """The proxy with ``--workers``, stopped by SIGTERM at the end while Redis still runs: its
    supervisor then bounds the workers' stop. (The harness's SIGKILL would leave them to stop on
    their own, racing the end of the test's Redis.)"""
    with cls(redis_server.url, ("--workers", workers, "--amqp", unreachable_amqp_url(), *args)) as proxy:
        try:
            yield proxy
        finally:
            if proxy.is_running():
                pids = children(proxy.pid)
                proxy.stop(timeout=30)
                assert not [pid for pid in pids if alive(pid)], "a worker outlived its supervisor"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_clients_spread_over_both_workers_and_either_answers_our_commands(redis_server: RedisServer) -> None:
    with workers_proxy(redis_server) as proxy:
        pids = all_workers_answer(proxy, 2)
        clients = [RawClient(proxy.port) for _ in range(CLIENTS)]
        try:
            served = [worker_of(raw) for raw in clients]
            by_pid: dict[int, list[RawClient]] = {}
            for raw, (index, pid) in zip(clients, served):
                by_pid.setdefault(pid, []).append(raw)
            assert set(by_pid) == pids, served
            assert sorted({index for index, _ in served}) == [1, 2], served
            # Every worker relays, and answers our commands, on its own.
            for pid, group in by_pid.items():
                raw = group[0]
                assert raw.command("SET", f"from-{pid}", "v") == b"OK"
                config = raw.command("key_evt_amqp.config_get")
                assert dict(zip(config[::2], config[1::2]))[b"workers"] == b"2"
                assert raw.command("key_evt_amqp.keymask_add", f"^from-{pid}") == b"OK"
                assert int(info_of(raw)[b"connected_clients"]) == len(group)
            with redis_server.client() as direct:
                assert sorted(direct.keys("from-*")) == sorted(f"from-{p}".encode() for p in pids)
        finally:
            for raw in clients:
                raw.close()


def test_a_single_process_has_no_supervisor(redis_server: RedisServer) -> None:
    with ProxyProcess(redis_server.url, ("--amqp", unreachable_amqp_url())) as proxy, \
            RawClient(proxy.port) as raw:
        assert worker_of(raw) == (0, proxy.pid)
        assert children(proxy.pid) == set()


def test_a_killed_worker_is_restarted_and_the_other_workers_clients_do_not_notice(
        redis_server: RedisServer) -> None:
    with workers_proxy(redis_server) as proxy:
        all_workers_answer(proxy, 2)
        clients = [RawClient(proxy.port) for _ in range(16)]
        try:
            by_pid: dict[int, list[RawClient]] = {}
            for raw in clients:
                by_pid.setdefault(worker_of(raw)[1], []).append(raw)
            victim, survivor = sorted(by_pid, key=lambda pid: len(by_pid[pid]))
            for i, raw in enumerate(by_pid[survivor]):
                assert raw.command("SET", f"k{i}", "before") == b"OK"
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            for raw in by_pid[victim]:
                assert raw.is_closed_by_peer(5)

            def successor_answers() -> int | None:
                # Meanwhile, the survivor's clients keep going on the connections they have.
                for i, raw in enumerate(by_pid[survivor]):
                    assert raw.command("INCR", f"n{i}") >= 1
                new = children(proxy.pid) - {survivor}
                return new.pop() if len(new) == 1 and new <= answering(proxy) else None

            successor = wait_for(successor_answers, timeout=RESTART_TIMEOUT, message="for the restart")
            print(f"killed worker answered again (new pid) after {time.monotonic() - killed_at:.2f}s")
            assert successor != victim
            for i, raw in enumerate(by_pid[survivor]):
                assert raw.command("GET", f"k{i}") == b"before"
                assert worker_of(raw)[1] == survivor
            assert f"(pid {victim}) was killed by SIGKILL" in proxy.log_text()
        finally:
            for raw in clients:
                raw.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_every_worker_exit_0_and_the_port_is_free(
        redis_server: RedisServer, signum: signal.Signals) -> None:
    with workers_proxy(redis_server) as proxy:
        pids = all_workers_answer(proxy, 2)
        with RawClient(proxy.port) as raw:
            assert raw.command("PING") == b"PONG"
            assert proxy.proc is not None
            started = time.monotonic()
            proxy.proc.send_signal(signum)
            assert raw.is_closed_by_peer(10)
            assert proxy.proc.wait(timeout=20) == 0, proxy.log_text()[-3000:]
            elapsed = time.monotonic() - started
        assert elapsed < 10, elapsed  # nothing to wait for: no client owes a reply
        assert not any(alive(pid) for pid in pids)
        assert not port_accepts(proxy.port)
        with socket.create_server((proxy.host, proxy.port)):  # no SO_REUSEPORT: nobody holds it
            pass
        assert f"{signum.name}: stopping the workers" in proxy.log_text()



def test_workers_stop_when_their_supervisor_is_killed(redis_server: RedisServer) -> None:
    """SIGKILL leaves the supervisor no time to pass anything on: the kernel sends each worker
    SIGTERM (PR_SET_PDEATHSIG), and no worker keeps the port."""
    with workers_proxy(redis_server) as proxy:
        pids = all_workers_answer(proxy, 2)
        proxy.kill()
        t0 = time.monotonic()
        wait_for(lambda: not any(alive(pid) for pid in pids), timeout=20,
                 message="for the orphaned workers to exit")
        print(f"orphaned workers exited after {time.monotonic() - t0:.2f}s")
        assert not port_accepts(proxy.port)

# Worker 2 raises at start, every time; worker 1 serves. Only the test's interpreter is patched.
CRASH_WORKER_2 = """
import sys
import proxy.server

serve = proxy.server.serve

async def crashing(config, **kw):
    if kw.get("worker") is not None and kw["worker"].index == 2:
        raise RuntimeError("worker 2 cannot start (test)")
    return await serve(config, **kw)

proxy.server.serve = crashing
from proxy.cli import main
sys.exit(main())
"""


class CrashingWorkerProxy(ProxyProcess):
    """Always this checkout's code (KEA_PROXY_COMMAND cannot be patched like this)."""

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-c", CRASH_WORKER_2, "serve", "--listen", f"{self.host}:{self.port}",
                "--upstream", self.upstream_url, *self.extra_args]


def test_a_worker_crashing_at_start_is_restarted_with_backoff(redis_server: RedisServer) -> None:
    window = 8.0
    with workers_proxy(redis_server, cls=CrashingWorkerProxy) as proxy:
        cpu_before, started = cpu_seconds(proxy.pid), time.monotonic()
        while time.monotonic() - started < window:
            with RawClient(proxy.port) as raw:  # worker 1 serves all along
                assert worker_of(raw)[0] == 1
            time.sleep(0.5)
        busy = (cpu_seconds(proxy.pid) - cpu_before) / (time.monotonic() - started)
        log = proxy.log_text()
        starts = log.count("worker 2 started")
        # 6 at once (the first and BURST restarts), then after 1 s, 2 s, 4 s: 9 in 8 s. Without
        # the backoff, hundreds.
        assert 6 <= starts <= 12, log[-3000:]
        assert "worker 2 (pid " in log and "exited with status 1 after" in log
        for delay in ("1s", "2s", "4s"):
            assert f"restarting it in {delay} (" in log, log[-3000:]
        assert "RuntimeError: worker 2 cannot start (test)" in log
        assert busy < 0.5, busy  # the supervisor and its crashing workers: CPU seconds per second
        t0 = time.monotonic()
        assert proxy.stop(timeout=20) == 0  # not held up by the pending restart
        assert time.monotonic() - t0 < 10


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KEY_EVT_AMQP_")}
    return subprocess.run([sys.executable, "-m", "proxy", "serve", *args], cwd=REPO_ROOT,
                          env={**environ, **(env or {})}, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("value", ["0", "-1", "x", "1025"])
def test_bad_workers_values_are_the_usual_config_error(value: str) -> None:
    done = run_cli("--workers", value)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"key-evt-amqp: invalid --workers {value!r}: expected a number of "
                           "processes from 1 to 1024, or auto\n")
    done = run_cli(env={"KEY_EVT_AMQP_WORKERS": value})
    assert done.returncode == 2 and done.stderr.startswith("key-evt-amqp: invalid KEY_EVT_AMQP_WORKERS")


def test_a_bad_config_fails_before_any_worker_starts() -> None:
    done = run_cli("--workers", "2", "--delivery-mode", "3")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "key-evt-amqp: invalid --delivery-mode '3': expected 1 or 2\n"


def test_workers_auto_is_one_per_usable_core(redis_server: RedisServer) -> None:
    cores = len(os.sched_getaffinity(0))
    with workers_proxy(redis_server, workers="auto") as proxy:
        pids = wait_for(lambda: len(children(proxy.pid)) == cores and children(proxy.pid), timeout=20)
        with RawClient(proxy.port) as raw:
            config = raw.command("key_evt_amqp.config_get")
            assert dict(zip(config[::2], config[1::2]))[b"workers"] == str(cores).encode()
            assert worker_of(raw)[1] in pids


def test_a_port_in_use_fails_the_start_even_when_its_owner_uses_so_reuseport(
        redis_server: RedisServer) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = run_cli("--workers", "2", "--listen", f"127.0.0.1:{port}", "--upstream", redis_server.url)
        assert (done.returncode, done.stderr) == (
            1, f"key-evt-amqp: cannot listen on 127.0.0.1:{port}: Address already in use\n")
    with workers_proxy(redis_server) as first:
        pids = all_workers_answer(first, 2)
        done = run_cli("--workers", "2", "--listen", f"127.0.0.1:{first.port}", "--upstream",
                       redis_server.url, "--amqp", unreachable_amqp_url())
        assert done.returncode == 1, done.stderr
        assert "cannot listen on" in done.stderr
        assert answering(first, 20) <= pids  # nobody joined the first proxy's port


def test_workers_are_one_fleet_events_once_per_id_through_a_worker_kill(redis_server: RedisServer) -> None:
    """--workers 2 with a real broker: one worker forwards, the other stands by; SIGKILL of the
    forwarding worker mid-stream: the standby takes over, every event arrives, duplicates carry
    the id of their first copy."""
    total = 20_000
    with RabbitQueue() as queue, ProxyProcess(redis_server.url, (
            "--workers", "2", "--amqp", "amqp://guest:guest@127.0.0.1:5672/", "--routing-key",
            queue.routing_key, "--events", "$", "--keymask", "ALL")) as proxy:
        pids = all_workers_answer(proxy, 2)

        def roles() -> dict[int, bytes]:
            out = {}
            for _ in range(12):
                with RawClient(proxy.port) as raw:
                    info = info_of(raw)
                    out[int(info[b"worker_pid"])] = info[b"fleet_role"]
            return out
        wait_for(lambda: sorted(roles().values()) == [b"forwarder", b"standby"] and set(roles()) == pids, 20)
        forwarder = next(pid for pid, role in roles().items() if role == b"forwarder")
        client = redis_server.client()
        for start in range(0, total, 1000):
            pipe = client.pipeline(transaction=False)
            for i in range(start, start + 1000):
                pipe.set(b"k%d" % i, b"v")
            pipe.execute()
            if start == total // 2:
                os.kill(forwarder, signal.SIGKILL)
        messages = queue.drain(expected=total, idle=3, timeout=60)
        proxy.stop(timeout=30)
    first: dict[bytes, str | None] = {}
    order = []
    for m in messages:
        if m.type == "key_evt_amqp.gap":
            continue
        key = m.body.split(b"\n", 2)[2]
        if key in first:
            assert first[key] == m.message_id, f"duplicate of {key!r} with another message_id"
        else:
            first[key] = m.message_id
            order.append(key)
    assert order == [b"k%d" % i for i in range(total)]
    print(f"\n--workers 2, forwarding worker killed: {len(messages) - total} duplicates")
