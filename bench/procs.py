"""The processes a scenario runs against: redis-server, nutcracker, the bare relay, the proxy.

A :class:`Stack` owns everything it starts (processes by pid, one temp dir) and stops it all on
exit, TERM first and KILL after a bounded wait. Every service listens on a free 127.0.0.1 port.
A service that cannot start raises :class:`Unavailable` with the reason (its log's last lines).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HOST = "127.0.0.1"
START_TIMEOUT = 15.0  # seconds for a service to answer
STOP_TIMEOUT = 5.0
PROFILER_STOP_TIMEOUT = 10.0
PROFILE_RATE = 200  # py-spy samples per second


class Unavailable(Exception):
    """A candidate cannot run here; the message says why (shown as "not available: ...")."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _raise_nofile() -> None:
    # 1,000 idle clients need 2,000+ descriptors in the proxy: lift the soft limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Service:
    name: str
    port: int
    proc: subprocess.Popen
    log: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float:
        """Resident memory now, from /proc (MB)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise Unavailable(f"{self.name} has no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far, from /proc."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(line.strip() for line in f.readlines()[-lines:] if line.strip())
        except OSError:
            return ""


def ping(port: int, timeout: float = 1.0) -> bytes:
    """Send PING, return the first reply bytes (b"" on any error)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64)
    except OSError:
        return b""


class Stack:
    """Owns what it starts. With ``profile_dir``, every proxy runs under ``py-spy record``."""

    def __init__(self, profile_dir: str | None = None, tag: str = "bench"):
        self.dir = tempfile.mkdtemp(prefix="kea-bench-")
        self.services: list[Service] = []
        self.profile_dir, self.tag = profile_dir, tag
        self.profilers: dict[int, subprocess.Popen] = {}  # proxy pid -> its py-spy

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for service in reversed(self.services):
            self.stop(service)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _start(self, name: str, argv: list[str], port: int, ready=None) -> Service:
        log = os.path.join(self.dir, f"{name}-{port}.log")
        env = dict(os.environ, PYTHONPATH=project_root())
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.dir,
                                    stdin=subprocess.DEVNULL, env=env, preexec_fn=_raise_nofile)
        service = Service(name, port, proc, log)
        self.services.append(service)
        deadline = time.monotonic() + START_TIMEOUT
        ready = ready or (lambda: ping(port).startswith(b"+PONG"))
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.stop(service)
                raise Unavailable(f"{name} exited with {proc.returncode}: {service.log_tail()}")
            if ready():
                return service
            time.sleep(0.05)
        self.stop(service)
        raise Unavailable(f"{name} did not answer within {START_TIMEOUT:.0f}s: "
                          f"{service.log_tail()}")

    def start(self, name: str, argv: list[str], port: int) -> Service:
        """Any server that answers PING on ``port`` once it is up."""
        return self._start(name, argv, port)

    def spawn(self, name: str, argv: list[str], ready) -> Service:
        """A helper process that listens nowhere (port 0); ``ready()`` says when it is up."""
        return self._start(name, argv, 0, ready)

    def stop(self, service: Service) -> None:
        proc = service.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        if service in self.services:
            self.services.remove(service)
        profiler = self.profilers.pop(proc.pid, None)
        if profiler is not None:  # py-spy writes its file and exits when its target does
            try:
                profiler.wait(PROFILER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                profiler.send_signal(signal.SIGINT)
                try:
                    profiler.wait(PROFILER_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    profiler.kill()
                    profiler.wait()

    def _profile(self, service: Service) -> None:
        py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(py_spy):
            py_spy = shutil.which("py-spy") or "py-spy"
        out = os.path.join(self.profile_dir, f"{self.tag}-proxy-{service.port}.txt")
        log = open(out + ".log", "wb")
        with log:
            self.profilers[service.pid] = subprocess.Popen(
                [py_spy, "record", "--pid", str(service.pid), "--format", "raw", "--rate",
                 str(PROFILE_RATE), "--nonblocking", "--output", out],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    # -- the candidates -------------------------------------------------------------------
    def redis(self, *extra: str) -> Service:
        port = free_port()
        return self._start("redis", ["redis-server", "--bind", HOST, "--port", str(port),
                                     "--save", "", "--appendonly", "no", "--dir", self.dir,
                                     "--maxclients", "10000", *extra], port)

    def nutcracker(self, redis_port: int) -> Service:
        if not shutil.which("nutcracker"):
            raise Unavailable("nutcracker is not installed (apt-get install -y nutcracker)")
        port, stats = free_port(), free_port()
        conf = os.path.join(self.dir, f"nutcracker-{port}.yml")
        with open(conf, "w") as f:
            f.write(f"bench:\n  listen: {HOST}:{port}\n  hash: fnv1a_64\n"
                    f"  distribution: ketama\n  redis: true\n  auto_eject_hosts: false\n"
                    f"  timeout: 4000\n  servers:\n   - {HOST}:{redis_port}:1\n")
        return self._start("nutcracker", ["nutcracker", "-c", conf, "-a", HOST, "-s", str(stats),
                                          "-o", os.path.join(self.dir, f"nc-{port}.log")], port)

    def bare_relay(self, redis_port: int) -> Service:
        port = free_port()
        return self._start("bare_relay", [sys.executable, "-m", "bench.bare_relay", str(port),
                                          str(redis_port)], port)

    def proxy(self, redis_port: int, *args: str) -> Service:
        port = free_port()
        argv = [sys.executable, "-m", "proxy", "serve", "--listen", f"{HOST}:{port}",
                "--upstream", f"redis://{HOST}:{redis_port}/0", *args]
        service = self._start("proxy", argv, port)
        if self.profile_dir:
            self._profile(service)
        return service


def project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
