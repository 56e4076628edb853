"""A private Redis Cluster for end-to-end tests: 6 nodes (3 masters, 3 replicas) on free ports.

Nothing here imports pytest. Each node is a :class:`harness.RedisServer` in its own temporary
directory; :class:`RedisCluster` creates the cluster with ``redis-cli --cluster create ...
--cluster-replicas 1`` and returns once every node reports ``cluster_state:ok`` and agrees on the
slot map. ``close()`` kills every node. The shared Redis on 6379 is never touched.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time

import redis

from harness import HOST, RedisServer, user_dbsize, wait_for

NODE_TIMEOUT_MS = 2000
#: Lines a test wants in the terminal summary (failover measurements), shown even without ``-s``.
SUMMARY: list[str] = []
CREATE_TIMEOUT = 60.0


#: Redis refuses ports above 55535 with cluster on: the bus listens on port + 10000.
PORT_RANGE = (20000, 55000)
BUS_OFFSET = 10000


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int]) -> int:
    """A free port whose cluster-bus port (+10000) is free too."""
    while True:
        port = random.randint(*PORT_RANGE)
        if port not in taken and _bindable(port) and _bindable(port + BUS_OFFSET):
            taken.add(port)
            return port


class RedisCluster:
    def __init__(self, nodes: int = 6) -> None:
        taken: set[int] = set()
        self.servers = [
            RedisServer(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-node-timeout", str(NODE_TIMEOUT_MS)], port=cluster_port(taken))
            for _ in range(nodes)
        ]

    @property
    def seed_url(self) -> str:
        return self.servers[0].url

    def start(self) -> RedisCluster:
        for server in self.servers:
            server.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli not found on PATH")
        addresses = [f"{HOST}:{s.port}" for s in self.servers]
        result = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=CREATE_TIMEOUT, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{result.stdout}\n{result.stderr}")
        wait_for(self.settled, timeout=CREATE_TIMEOUT, interval=0.1, message="for cluster_state:ok")
        return self

    def settled(self) -> bool:
        """Every node says ``cluster_state:ok`` and reports the same slot map."""
        maps = set()
        for server in self.servers:
            with server.client(socket_timeout=2) as client:
                if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    return False
                maps.add(repr(sorted(client.execute_command("CLUSTER", "SLOTS"))))
        return len(maps) == 1

    def masters(self) -> list[RedisServer]:
        """The servers that are masters right now, by port."""
        out = []
        for server in self.servers:
            with server.client(socket_timeout=2) as client:
                if client.execute_command("ROLE")[0] == b"master":
                    out.append(server)
        return out

    def client_for(self, port: int) -> redis.Redis:
        return next(s for s in self.servers if s.port == port).client()

    def node_id(self, server: RedisServer) -> bytes:
        with server.client() as client:
            return client.execute_command("CLUSTER", "MYID")

    def owner_of(self, slot: int) -> RedisServer:
        with self.servers[0].client() as client:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(s for s in self.servers if s.port == master[1])
        raise AssertionError(f"slot {slot} has no owner")

    def total_keys(self, user_only: bool = False) -> int:
        """Keys on every master (``user_only``: without the proxy's own, see harness.user_dbsize)."""
        total = 0
        for server in self.masters():
            with server.client() as client:
                total += user_dbsize(client) if user_only else client.dbsize()
        return total

    def flushall(self) -> None:
        for server in self.masters():
            with server.client() as client:
                client.flushall()

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def __enter__(self) -> RedisCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def wait_until_settled(cluster: RedisCluster, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    wait_for(cluster.settled, timeout=max(deadline - time.monotonic(), 0.1), interval=0.1)
