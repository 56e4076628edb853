"""A private Redis Sentinel setup for end-to-end tests: 1 master, 1 replica, 3 sentinels.

Nothing here imports pytest. Every process runs on a free port in its own temporary directory
(the shared Redis on 6379 is never touched). Sentinels are ``redis-server <conf> --sentinel``
(what Debian's ``redis-sentinel`` runs: the same executable), with ``down-after-milliseconds``
small so that a killed master is replaced within a few seconds. :meth:`SentinelGroup.start`
returns once every sentinel knows the master, the replica and the two other sentinels.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from harness import HOST, RedisServer, _reap, _tail, free_port, no_retry, wait_for

MASTER_NAME = "mymaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


class SentinelServer:
    def __init__(self, master_port: int, name: str = MASTER_NAME) -> None:
        self.host = HOST
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="kea-sentinel-")
        self.dir = Path(self._tmp.name)
        self.log_path = self.dir / "sentinel.log"
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind {HOST}\ndaemonize no\nlogfile {self.log_path}\ndir {self.dir}\n"
            f"sentinel monitor {name} {HOST} {master_port} 2\n"
            f"sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {name} 1\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found on PATH: install it (apt-get install redis-server)")
        self.proc = subprocess.Popen([binary, str(self.conf), "--sentinel"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=self.dir)
        try:
            wait_for(self._pings, 15)
        except AssertionError:
            raise RuntimeError(f"sentinel on {self.port} did not start:\n{_tail(self.log_path)}") from None
        return self

    def _pings(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"sentinel exited:\n{_tail(self.log_path)}")
        with self.client(socket_timeout=1) as client:
            return bool(client.ping())

    def client(self, **kw: Any) -> redis.Redis:
        kw.setdefault("socket_timeout", 5)
        return redis.Redis(host=self.host, port=self.port, retry=no_retry(), decode_responses=True, **kw)

    def master_info(self) -> dict[str, Any]:
        with self.client() as client:
            return client.execute_command("SENTINEL", "MASTER", MASTER_NAME)

    def close(self) -> None:
        _reap(self.proc, 9, timeout=5)
        self._tmp.cleanup()


class SentinelGroup:
    """``with SentinelGroup() as group:`` -> ``group.url`` (``redis+sentinel://...``),
    ``group.master()`` (the RedisServer that is master now), ``group.failover()``."""

    def __init__(self) -> None:
        self.servers = [RedisServer(["--replica-announce-ip", HOST])]
        self.servers.append(RedisServer(["--replicaof", HOST, str(self.servers[0].port),
                                         "--replica-announce-ip", HOST]))
        self.sentinels = [SentinelServer(self.servers[0].port) for _ in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{s.host}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}"

    def start(self) -> SentinelGroup:
        for server in self.servers:
            server.start()
        wait_for(lambda: self._link_up(self.servers[1]), 15)
        for sentinel in self.sentinels:
            sentinel.start()
        wait_for(self.settled, 30, interval=0.1, message="for the sentinels to know each other")
        return self

    @staticmethod
    def _link_up(server: RedisServer) -> bool:
        with server.client() as client:
            return client.info("replication").get("master_link_status") == "up"

    def settled(self) -> bool:
        """Every sentinel names the same master, sees one replica and the two other sentinels."""
        masters = set()
        for sentinel in self.sentinels:
            info = sentinel.master_info()
            if int(info["num-slaves"]) < 1 or int(info["num-other-sentinels"]) < 2:
                return False
            if "s_down" in info["flags"] or "o_down" in info["flags"] or "failover" in info["flags"]:
                return False
            masters.add((info["ip"], int(info["port"])))
        return len(masters) == 1

    def master_port(self) -> int:
        with self.sentinels[0].client() as client:
            return int(client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)[1])

    def master(self) -> RedisServer:
        port = self.master_port()
        return next(s for s in self.servers if s.port == port)

    def replica(self) -> RedisServer:
        port = self.master_port()
        return next(s for s in self.servers if s.port != port)

    def replica_ready(self) -> bool:
        """The replica follows the master (link up), and every sentinel sees it as a good replica."""
        replica = self.replica()
        if not replica.is_running() or not self._link_up(replica):
            return False
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                replicas = client.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)
            if not any(int(r["port"]) == replica.port and r["flags"] == "slave"
                       and r.get("master-link-status") == "ok" for r in replicas):
                return False
        return True

    def failover(self, timeout: float = 30.0) -> tuple[int, int]:
        """``SENTINEL FAILOVER``; returns (old, new) master ports once every sentinel names the new one."""
        old = self.master_port()
        with self.sentinels[0].client() as client:
            client.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        wait_for(lambda: self._all_name_other(old), timeout, interval=0.1)
        return old, self.master_port()

    def _all_name_other(self, old: int) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                if int(client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)[1]) == old:
                    return False
        return True

    def wait_switched(self, old: int, timeout: float = 30.0) -> int:
        wait_for(lambda: self._all_name_other(old), timeout, interval=0.1)
        return self.master_port()

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        for server in self.servers:
            server.close()

    def __enter__(self) -> SentinelGroup:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def elapsed(since: float) -> float:
    return time.monotonic() - since
