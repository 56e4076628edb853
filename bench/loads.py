"""Load generators: redis-benchmark (parsed from ``--csv``) and a pipelined SET writer."""

from __future__ import annotations

import csv
import io
import socket
import subprocess

from bench.procs import HOST

BENCHMARK_TIMEOUT = 300.0  # seconds for one redis-benchmark run


class LoadError(Exception):
    """The load generator failed; the message has its output."""


def parse_csv(text: str) -> dict[str, dict[str, float]]:
    """redis-benchmark ``--csv`` lines -> {"SET": {"rps": ..., "p50_latency_ms": ...}, ...}."""
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    while rows and rows[0][:2] != ["test", "rps"] and len(rows[0]) < 3:
        rows.pop(0)  # `--cluster` prints the masters it found before the CSV
    if not rows or rows[0][:2] != ["test", "rps"]:
        raise LoadError(f"unexpected redis-benchmark output: {text[:300]!r}")
    header = rows[0]
    out = {}
    for row in rows[1:]:
        if len(row) != len(header):
            continue
        name = row[0].split()[0]  # "SET", "GET", "LPUSH (needed to benchmark LRANGE)" ...
        out[name] = {k: float(v) for k, v in zip(header[1:], row[1:])}
    return out


def redis_benchmark(port: int, tests: str, requests: int, clients: int, pipeline: int,
                    *extra: str) -> dict[str, dict[str, float]]:
    argv = ["redis-benchmark", "-h", HOST, "-p", str(port), "-t", tests, "-n", str(requests),
            "-c", str(clients), "-P", str(pipeline), "--csv", *extra]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=BENCHMARK_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise LoadError(f"redis-benchmark ran over {BENCHMARK_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        raise LoadError(f"redis-benchmark exited {done.returncode}: {done.stderr[-300:]}")
    result = parse_csv(done.stdout)
    if not result:
        raise LoadError(f"redis-benchmark printed no results: {done.stderr[-300:]}")
    return result


def combined_rps(result: dict[str, dict[str, float]]) -> float:
    """Requests per second over the whole run (equal request counts per test)."""
    return len(result) / sum(1.0 / r["rps"] for r in result.values())


def set_keys(port: int, keys: list[bytes], value: bytes = b"v", chunk: int = 2000,
             timeout: float = 60.0) -> None:
    """SET every key, pipelined ``chunk`` commands at a time, each reply checked to be +OK."""
    tail = b"\r\n$%d\r\n%s\r\n" % (len(value), value)
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(keys), chunk):
            part = keys[start:start + chunk]
            s.sendall(b"".join(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s%s" % (len(k), k, tail)
                               for k in part))
            want, got = 5 * len(part), bytearray()
            while len(got) < want:
                data = s.recv(want - len(got))
                if not data:
                    raise LoadError("redis closed the connection during SETs")
                got += data
            if got != b"+OK\r\n" * len(part):
                raise LoadError(f"unexpected SET reply: {bytes(got[:80])!r}")
