"""Scenarios on the event path: ``event_path`` and ``replay``, and the helpers they share.

The proxy runs with ``--keymask ALL --events A`` and a routing key of its own, bound to a queue
of our own on ``amq.direct``; SETs go straight to Redis. A rate is N divided by the time from the
first SET (or the ``connect`` command, for replay) to the moment the queue holds N. Then every
body is read back: each key must be there exactly once.
"""

from __future__ import annotations

import json
import os
import sys
import time

import redis as redis_py

from bench.amqp_raw import RawAMQP
from bench.ceiling import event_body, keys, run_ceiling, run_naive
from bench.loads import set_keys
from bench.procs import HOST, Service, Stack, Unavailable, free_port
from bench.report import median, na, paired_ratio

EXCHANGE = "amq.direct"
FALLBACK_KEY = b"REDIS_MODULE-key_evt_amqp-fallback_storage"  # the proxy's default
WARMUP_EVENTS = 10
WARMUP_TIMEOUT = 15.0
DELIVERY_TIMEOUT = 120.0  # seconds for N events to reach the queue


class EventsUnavailable(Exception):
    """The event pipeline cannot be measured here; the message says why."""


EXPECTED = {
    "event_path": {"ratios": ("proxy/ceiling", "proxy/naive"), "values": ("proxy_per_s",)},
    "event_path_tls": {"ratios": ("amqps/amqp", "amqps/amqp_relay"), "values": ("amqps_per_s",)},
    "event_path_format": {"ratios": ("json/default", "template/default"), "values": ("json_per_s",)},
    "replay": {"ratios": ("replay/ceiling",), "values": ("replay_per_s",)},
    "redis_cost": {"ratios": ("with_events/without",), "values": ()},
    "memory": {"ratios": (), "values": ("idle_mb", "clients_mb", "per_client_kb",
                                        "event_path_peak_mb")},
}


def unavailable(name: str, reason: str) -> dict:
    """A scenario's result when nothing of it could be measured."""
    keys_ = EXPECTED[name]
    return {"available": False, "reason": reason,
            "ratios": {k: na(reason) for k in keys_["ratios"]},
            "values": {k: na(reason) for k in keys_["values"]}}


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def unique(tag: str) -> str:
    return f"kea-bench-{tag}-{os.getpid()}-{os.urandom(3).hex()}"


def own_queue(admin: RawAMQP, tag: str) -> str:
    """Declare a queue bound to amq.direct with its own name as routing key."""
    name = unique(tag)
    admin.declare_queue(name)
    admin.bind(name, EXCHANGE, name)
    return name


def start_event_proxy(st: Stack, redis_port: int, routing_key: str, amqp_url: str,
                      *extra: str) -> Service:
    return st.proxy(redis_port, "--amqp", amqp_url, "--exchange", EXCHANGE,
                    "--routing-key", routing_key, "--keymask", "ALL", "--events", "A", *extra)


def check_flow(proxy: Service, redis_port: int, admin: RawAMQP, queue: str) -> None:
    """A few SETs must come out of the proxy into ``queue``; else raise EventsUnavailable."""
    set_keys(redis_port, keys(f"warm:{os.urandom(2).hex()}:", WARMUP_EVENTS))
    count, _ = admin.wait_count(queue, WARMUP_EVENTS, WARMUP_TIMEOUT, interval=0.05)
    admin.purge(queue)
    if count < WARMUP_EVENTS:
        raise EventsUnavailable(
            f"proxy published {count} of {WARMUP_EVENTS} events within {WARMUP_TIMEOUT:.0f}s; "
            f"proxy log: {proxy.log_tail(3) or '(empty)'}")


def verify(bodies: list[bytes], expected: list[bytes]) -> dict:
    """Every expected key exactly once among ``set`` events; counts of what is wrong."""
    want = set(expected)
    seen: dict[bytes, int] = {}
    other = 0
    for body in bodies:
        parts = body.split(b"\n", 2)
        if len(parts) == 3 and parts[1] == b"set" and parts[2] in want:
            seen[parts[2]] = seen.get(parts[2], 0) + 1
        else:
            other += 1
    missing = len(want) - len(seen)
    duplicates = sum(c - 1 for c in seen.values())
    return {"received": len(bodies), "missing": missing, "duplicates": duplicates,
            "other": other, "ok": missing == 0 and duplicates == 0}


def deliver(admin: RawAMQP, proxy: Service, queue: str, n: int, t0: float) -> tuple[float, int]:
    """Wait for ``n`` messages; returns (rate from t0, count seen)."""
    count, seen_at = admin.wait_count(queue, n, DELIVERY_TIMEOUT)
    if count < n:
        raise EventsUnavailable(f"only {count} of {n} events reached the queue within "
                                f"{DELIVERY_TIMEOUT:.0f}s; proxy log: {proxy.log_tail(3)}")
    return n / (seen_at - t0), count


def ceiling_and_naive(p, admin: RawAMQP, ceil_q: str, naive_q: str | None, r: int,
                      n: int, samples: dict, checks: list) -> None:
    result = run_ceiling(ceil_q, ceil_q, [event_body(k) for k in keys(f"ceil:{r}:", n)])
    samples["ceiling"].append(result["rate"])
    samples["ceiling_cpu_us"].append(result["cpu_us_per_msg"])
    checks.append({"candidate": "ceiling", "round": r, "ok": result["ok"],
                   "queue_count": result["queue_count"], "nacked": result["nacked"]})
    admin.purge(ceil_q)
    if naive_q is None:
        return
    bodies = [event_body(k) for k in keys(f"naive:{r}:", p.naive_n)]
    result = run_naive(naive_q, naive_q, bodies, p.amqp_url)
    samples["naive"].append(result["rate"])
    checks.append({"candidate": "naive", "round": r, "ok": result["ok"],
                   "queue_count": result["queue_count"]})
    admin.purge(naive_q)


def event_path(p) -> dict:
    samples = {"proxy": [], "ceiling": [], "naive": [], "ceiling_cpu_us": [],
               "proxy_cpu_us": []}
    checks: list[dict] = []
    reason = None
    with Stack(p.profile_dir, "event_path") as st, RawAMQP() as admin:
        queues = [own_queue(admin, t) for t in ("events", "ceiling", "naive")]
        ev_q, ceil_q, naive_q = queues
        try:
            redis = st.redis()
            try:
                proxy = start_event_proxy(st, redis.port, ev_q, p.amqp_url)
                check_flow(proxy, redis.port, admin, ev_q)
            except (Unavailable, EventsUnavailable) as exc:
                reason = str(exc)
                log(f"proxy: not available: {reason}")
            for r in range(p.rounds):
                if reason is None:
                    expected = keys(f"evt:{r}:", p.event_n)
                    cpu0, t0 = proxy.cpu_seconds(), time.monotonic()
                    set_keys(redis.port, expected)
                    rate, _ = deliver(admin, proxy, ev_q, p.event_n, t0)
                    samples["proxy"].append(rate)
                    samples["proxy_cpu_us"].append(
                        (proxy.cpu_seconds() - cpu0) / p.event_n * 1e6)
                    check = verify(admin.consume_bodies(ev_q, p.event_n, 60), expected)
                    checks.append({"candidate": "proxy", "round": r, **check})
                    admin.purge(ev_q)
                ceiling_and_naive(p, admin, ceil_q, naive_q, r, p.event_n, samples, checks)
                log(f"round {r + 1}/{p.rounds}: " + ", ".join(
                    f"{k}={v[-1]:,.0f}/s" for k, v in samples.items() if v and "cpu" not in k))
        finally:
            for q in queues:
                admin.delete(q)
    ratios = {"proxy/ceiling": na(reason), "proxy/naive": na(reason)} if reason else {
        "proxy/ceiling": paired_ratio(samples["proxy"], samples["ceiling"]),
        "proxy/naive": paired_ratio(samples["proxy"], samples["naive"])}
    ratios["naive/ceiling"] = paired_ratio(samples["naive"], samples["ceiling"])
    values = {"proxy_per_s": na(reason) if reason else median(samples["proxy"]),
              "ceiling_per_s": median(samples["ceiling"]), "naive_per_s": median(samples["naive"]),
              "ceiling_cpu_us_per_msg": median(samples["ceiling_cpu_us"]),
              "proxy_cpu_us_per_event": na(reason) if reason else median(samples["proxy_cpu_us"]),
              "all_counts_ok": all(c["ok"] for c in checks)}
    return {"available": reason is None, "reason": reason, "ratios": ratios, "values": values,
            "samples": samples, "checks": checks,
            "params": {"events": p.event_n, "naive_messages": p.naive_n,
                       "proxy_args": "--keymask ALL --events A", "writer": "pipelined SETs, "
                       "2000 per write, straight to Redis"}}


def fallback_length(redis_port: int) -> int:
    return redis_py.Redis(host=HOST, port=redis_port).llen(FALLBACK_KEY)


def fill_fallback(st: Stack, redis_port: int, queue: str, n: int, r: int,
                  amqp_url: str) -> tuple[Service, list[bytes]]:
    """A proxy whose broker is unreachable, with ``n`` events spilled to its fallback list."""
    dead = free_port()  # nothing listens there
    proxy = start_event_proxy(st, redis_port, queue,
                              f"amqp://guest:guest@{HOST}:{dead}/%2F")
    expected = keys(f"rep:{r}:", n)
    set_keys(redis_port, expected)
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    length = 0
    while time.monotonic() < deadline:
        length = fallback_length(redis_port)
        if length >= n:
            return proxy, expected
        time.sleep(0.1)
    st.stop(proxy)
    raise EventsUnavailable(f"the fallback list {FALLBACK_KEY.decode()} holds {length} of {n} "
                            f"events after {DELIVERY_TIMEOUT:.0f}s; proxy log: "
                            f"{proxy.log_tail(3)}")


def replay(p) -> dict:
    samples = {"replay": [], "ceiling": [], "ceiling_cpu_us": []}
    checks: list[dict] = []
    reason = None
    with Stack(p.profile_dir, "replay") as st, RawAMQP() as admin:
        rep_q, ceil_q = own_queue(admin, "replay"), own_queue(admin, "replay-ceiling")
        try:
            redis = st.redis()
            for r in range(p.rounds):
                if reason is None:
                    try:
                        proxy, expected = fill_fallback(st, redis.port, rep_q, p.replay_n, r,
                                                        p.amqp_url)
                        client = redis_py.Redis(host=HOST, port=proxy.port)
                        t0 = time.monotonic()
                        reply = client.execute_command("key_evt_amqp.connect", HOST, "5672")
                        rate, _ = deliver(admin, proxy, rep_q, p.replay_n, t0)
                    except (Unavailable, EventsUnavailable, redis_py.RedisError) as exc:
                        reason = str(exc)
                        log(f"replay: not available: {reason}")
                    else:
                        samples["replay"].append(rate)
                        check = verify(admin.consume_bodies(rep_q, p.replay_n, 60), expected)
                        checks.append({"candidate": "replay", "round": r,
                                       "connect_reply": repr(reply), **check,
                                       "fallback_left": fallback_length(redis.port)})
                        admin.purge(rep_q)
                        # connect's broker address is shared (kept in Redis, README "Shared
                        # settings"): the next round's proxy must start with its own dead one.
                        client.execute_command("key_evt_amqp.config_reset")
                        st.stop(proxy)
                ceiling_and_naive(p, admin, ceil_q, None, r, p.replay_n, samples, checks)
                log(f"round {r + 1}/{p.rounds}: " + ", ".join(
                    f"{k}={v[-1]:,.0f}/s" for k, v in samples.items() if v and "cpu" not in k))
        finally:
            admin.delete(rep_q)
            admin.delete(ceil_q)
    ratios = {"replay/ceiling": na(reason) if reason else
              paired_ratio(samples["replay"], samples["ceiling"])}
    values = {"replay_per_s": na(reason) if reason else median(samples["replay"]),
              "ceiling_per_s": median(samples["ceiling"]),
              "all_counts_ok": all(c["ok"] for c in checks)}
    return {"available": reason is None, "reason": reason, "ratios": ratios, "values": values,
            "samples": samples, "checks": checks,
            "params": {"events": p.replay_n, "fill": "proxy with --amqp at a closed port, "
                       "then key_evt_amqp.connect 127.0.0.1 5672 through the proxy"}}


def json_verify(bodies: list[bytes], expected: list[bytes]) -> dict:
    """:func:`verify` for JSON bodies (``--format json``): turned back into module bodies."""
    module = []
    for body in bodies:
        try:
            data = json.loads(body)
            module.append(b"%d\n%s\n%s" % (data["db"], data["event"].encode(), data["key"].encode()))
        except (ValueError, KeyError, TypeError):
            module.append(b"")
    return verify(module, expected)


def event_path_format(p) -> dict:
    """``event_path`` for the default (module format, fixed key), ``--format json`` and a routing
    key template (``<queue>.{db}.{event}``, one key per event): rates as ratios to the default,
    measured in alternation, round by round, in one run."""
    candidates = {"default": (), "json": ("--format", "json"), "template": ()}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    checks: list[dict] = []
    with Stack(p.profile_dir, "event_path_format") as st, RawAMQP() as admin:
        queues = {name: own_queue(admin, name) for name in candidates}
        admin.bind(queues["template"], EXCHANGE, queues["template"] + ".0.set")
        try:
            for r in range(p.rounds):
                for name, extra in candidates.items():
                    # A Redis of its own each time: proxies on one Redis form a fleet (one list,
                    # one lease), and a stopped one's lease would hold the next one back.
                    redis = st.redis()
                    key = queues[name] + (".{db}.{event}" if name == "template" else "")
                    try:
                        proxy = start_event_proxy(st, redis.port, key, p.amqp_url, *extra)
                        check_flow(proxy, redis.port, admin, queues[name])
                    except (Unavailable, EventsUnavailable) as exc:
                        raise EventsUnavailable(f"{name}: {exc}") from None
                    expected = keys(f"fmt:{name}:{r}:", p.event_n)
                    t0 = time.monotonic()
                    set_keys(redis.port, expected)
                    rate, _ = deliver(admin, proxy, queues[name], p.event_n, t0)
                    samples[name].append(rate)
                    bodies = admin.consume_bodies(queues[name], p.event_n, 60)
                    check = (json_verify if name == "json" else verify)(bodies, expected)
                    checks.append({"candidate": name, "round": r, **check})
                    admin.purge(queues[name])
                    st.stop(proxy)
                    st.stop(redis)
                log(f"round {r + 1}/{p.rounds}: " + ", ".join(
                    f"{k}={v[-1]:,.0f}/s" for k, v in samples.items() if v))
        finally:
            for q in queues.values():
                admin.delete(q)
    ratios = {"json/default": paired_ratio(samples["json"], samples["default"]),
              "template/default": paired_ratio(samples["template"], samples["default"])}
    values = {f"{name}_per_s": median(v) for name, v in samples.items()}
    values["all_counts_ok"] = all(c["ok"] for c in checks)
    return {"available": True, "reason": None, "ratios": ratios, "values": values,
            "samples": samples, "checks": checks,
            "params": {"events": p.event_n, "proxy_args": "--keymask ALL --events A; json: --format "
                       "json; template: --routing-key <queue>.{db}.{event}",
                       "writer": "pipelined SETs, 2000 per write, straight to Redis"}}
