"""Scenario ``cluster_command_path``: a 3-master cluster, straight and through the proxy.

``redis-benchmark --cluster`` at the cluster (the client routes by slot itself) against plain
``redis-benchmark`` through the proxy in front of the same cluster, alternated round by round.
Ratio ``proxy/direct_cluster`` (requests per second over SET and GET).
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.loads import combined_rps, redis_benchmark
from bench.procs import HOST, Stack, Unavailable, free_port
from bench.report import median, paired_ratio

MASTERS = 3
SETTLE_TIMEOUT = 30.0


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _cluster_port() -> int:
    # Redis Cluster needs port + 10000 free for its bus.
    for _ in range(100):
        port = free_port()
        if port <= 55535:
            return port
    raise Unavailable("no free port below 55536 for a cluster node")


def start_cluster(st: Stack) -> list[int]:
    """Three masters (no replicas: the benchmark measures routing), created and settled."""
    ports = []
    for _ in range(MASTERS):
        port = _cluster_port()
        st.start("redis-cluster-node", [
            "redis-server", "--bind", HOST, "--port", str(port), "--save", "", "--appendonly",
            "no", "--dir", st.dir, "--cluster-enabled", "yes", "--cluster-config-file",
            f"nodes-{port}.conf", "--cluster-node-timeout", "2000"], port)
        ports.append(port)
    create = subprocess.run(
        ["redis-cli", "--cluster", "create", *[f"{HOST}:{p}" for p in ports], "--cluster-yes"],
        capture_output=True, text=True, timeout=60)
    if create.returncode != 0:
        raise Unavailable(f"redis-cli --cluster create failed: {create.stdout[-300:]}")
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        states = [subprocess.run(["redis-cli", "-p", str(p), "cluster", "info"],
                                 capture_output=True, text=True).stdout for p in ports]
        if all("cluster_state:ok" in s for s in states):
            return ports
        time.sleep(0.2)
    raise Unavailable("the cluster did not reach cluster_state:ok")


def cluster_command_path(p) -> dict:
    n = max(p.cmd_requests_p1 // 2, 5000)
    with Stack(p.profile_dir, "cluster_path") as st:
        ports = start_cluster(st)
        proxy = st.proxy(ports[0])
        samples: dict[str, list[float]] = {"direct_cluster": [], "proxy": []}
        for r in range(p.rounds):
            samples["direct_cluster"].append(combined_rps(
                redis_benchmark(ports[0], "set,get", n, 50, 1, "--cluster")))
            samples["proxy"].append(combined_rps(redis_benchmark(proxy.port, "set,get", n, 50, 1)))
            log(f"round {r + 1}/{p.rounds}: " + ", ".join(
                f"{k}={v[-1]:,.0f}" for k, v in samples.items()))
    return {"ratios": {"proxy/direct_cluster": paired_ratio(samples["proxy"],
                                                            samples["direct_cluster"])},
            "values": {f"{k}_rps": median(v) for k, v in samples.items()},
            "samples": samples,
            "params": {"tests": "set,get", "clients": 50, "pipeline": 1, "requests": n,
                       "masters": MASTERS}}
