"""Scenarios about what the proxy costs others: ``redis_cost`` (Redis CPU) and ``memory`` (RSS)."""

from __future__ import annotations

import socket
import threading
import time

import redis as redis_py

from bench.amqp_raw import RawAMQP
from bench.ceiling import keys
from bench.events import (EventsUnavailable, check_flow, deliver, fallback_length, log, na,
                          own_queue, start_event_proxy, unavailable)
from bench.loads import redis_benchmark, set_keys
from bench.procs import HOST, Service, Stack, Unavailable
from bench.report import median, paired_ratio

PIPELINES = (1, 16)
KEYSPACE = 100_000  # redis-benchmark -r: distinct keys
SETTLE_TIMEOUT = 60.0  # seconds for the proxy to publish a run's events before the next run
SAMPLE_INTERVAL = 0.02


def settle(admin: RawAMQP, queue: str, redis_port: int) -> int:
    """Wait until the queue stops growing and the fallback is empty; returns the queue count."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = admin.declare_queue(queue, passive=True)
        if count != last:
            last, stable_since = count, time.monotonic()
        elif time.monotonic() - stable_since > 0.5 and fallback_length(redis_port) == 0:
            break
        time.sleep(0.05)
    admin.purge(queue)
    return last


MODES = ("with_events", "without", "cli_subscriber")
PATTERN = "__keyevent@*__:*"


def cli_subscriber(st: Stack, flags: str) -> Service:
    """A second Redis with the same notify-keyspace-events and redis-cli as its subscriber:
    what notifications cost Redis with a subscriber that reads as fast as C can."""
    redis = st.redis("--notify-keyspace-events", flags)
    client = redis_py.Redis(host=HOST, port=redis.port)
    st.spawn("redis-cli", ["redis-cli", "-p", str(redis.port), "psubscribe", PATTERN],
             ready=lambda: client.execute_command("PUBSUB", "NUMPAT") == 1)
    return redis


def redis_cost(p) -> dict:
    """SET throughput straight to Redis, notifications on (proxy forwarding all) vs off."""
    samples: dict[str, list[float]] = {f"{m}_p{P}": [] for P in PIPELINES for m in MODES}
    published: list[float] = []
    with Stack(p.profile_dir, "redis_cost") as st, RawAMQP() as admin:
        queue = own_queue(admin, "cost")
        try:
            redis = st.redis()
            client = redis_py.Redis(host=HOST, port=redis.port, decode_responses=True)
            try:
                proxy = start_event_proxy(st, redis.port, queue, p.amqp_url)
            except Unavailable as exc:
                raise EventsUnavailable(str(exc)) from None
            check_flow(proxy, redis.port, admin, queue)
            flags = client.config_get("notify-keyspace-events")["notify-keyspace-events"]
            floor = cli_subscriber(st, flags)
            for r in range(p.rounds):
                for pipeline in PIPELINES:
                    n = p.cost_requests_p1 if pipeline == 1 else p.cost_requests_p16
                    for mode in MODES:
                        if mode != "cli_subscriber":
                            client.config_set("notify-keyspace-events",
                                              flags if mode == "with_events" else "")
                        port = floor.port if mode == "cli_subscriber" else redis.port
                        result = redis_benchmark(port, "set", n, 50, pipeline,
                                                 "-r", str(KEYSPACE))
                        samples[f"{mode}_p{pipeline}"].append(result["SET"]["rps"])
                        if mode == "with_events":
                            published.append(settle(admin, queue, redis.port) / n)
                log(f"round {r + 1}/{p.rounds}: " + ", ".join(
                    f"{k}={v[-1]:,.0f}" for k, v in samples.items()))
            client.config_set("notify-keyspace-events", flags)
        finally:
            admin.delete(queue)
    ratios = {f"with_events/without_p{P}": paired_ratio(samples[f"with_events_p{P}"],
                                                        samples[f"without_p{P}"])
              for P in PIPELINES}
    ratios["with_events/without"] = min(ratios.values())
    for P in PIPELINES:  # the floor: what notifications cost Redis with the fastest reader
        ratios[f"cli_subscriber/without_p{P}"] = paired_ratio(samples[f"cli_subscriber_p{P}"],
                                                              samples[f"without_p{P}"])
    values = {f"{k}_rps": median(v) for k, v in samples.items()}
    values["published_fraction"] = median(published)
    return {"available": True, "ratios": ratios, "values": values, "samples": samples,
            "params": {"tests": "set", "clients": 50, "keyspace": KEYSPACE,
                       "notify_keyspace_events_with": flags,
                       "requests_p1": p.cost_requests_p1, "requests_p16": p.cost_requests_p16,
                       "headline": "with_events/without is the lower of the -P 1 and -P 16 "
                                   "ratios",
                       "cli_subscriber": f"a second redis-server with the same flags, "
                                         f"redis-cli psubscribe {PATTERN} > log"}}


def open_idle_clients(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that each got +PONG once (so their upstream exists), then sit idle."""
    socks = []
    for _ in range(n):
        s = socket.create_connection((HOST, port), timeout=10)
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        socks.append(s)
    for s in socks:
        if not s.recv(16).startswith(b"+PONG"):
            raise Unavailable("an idle client did not get +PONG")
    return socks


class PeakRSS(threading.Thread):
    """Samples a process's RSS every SAMPLE_INTERVAL until stopped; ``peak`` in MB."""

    def __init__(self, service: Service):
        super().__init__(daemon=True)
        self.service, self.peak, self.done = service, 0.0, threading.Event()

    def run(self):
        while not self.done.wait(SAMPLE_INTERVAL):
            self.peak = max(self.peak, self.service.rss_mb())

    def stop(self) -> float:
        self.done.set()
        self.join(5)
        return self.peak


def memory(p) -> dict:
    """Proxy RSS idle, with idle clients, and at its peak while forwarding event_n events."""
    values: dict[str, object] = {}
    with Stack(p.profile_dir, "memory") as st, RawAMQP() as admin:
        queue = own_queue(admin, "memory")
        try:
            redis = st.redis()
            try:
                proxy = start_event_proxy(st, redis.port, queue, p.amqp_url)
            except Unavailable as exc:
                return unavailable("memory", str(exc))
            time.sleep(1.0)
            values["idle_mb"] = proxy.rss_mb()
            socks = open_idle_clients(proxy.port, p.idle_clients)
            try:
                time.sleep(1.0)
                values["clients_mb"] = proxy.rss_mb()
            finally:
                for s in socks:
                    s.close()
            values["per_client_kb"] = (values["clients_mb"] - values["idle_mb"]) * 1024 / len(socks)
            try:
                check_flow(proxy, redis.port, admin, queue)
                sampler = PeakRSS(proxy)
                sampler.start()
                try:
                    t0 = time.monotonic()
                    set_keys(redis.port, keys("mem:", p.event_n))
                    deliver(admin, proxy, queue, p.event_n, t0)
                finally:
                    values["event_path_peak_mb"] = sampler.stop()
            except EventsUnavailable as exc:
                values["event_path_peak_mb"] = na(str(exc))
            values["after_mb"] = proxy.rss_mb()
        finally:
            admin.delete(queue)
    return {"available": True, "ratios": {}, "values": values,
            "params": {"idle_clients": p.idle_clients, "events": p.event_n,
                       "rss": "VmRSS of the proxy process, /proc/PID/status"}}
