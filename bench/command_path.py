"""Scenarios on the command path: ``command_path`` and ``latency``.

Both run redis-benchmark against each candidate in turn, round after round (direct Redis,
twemproxy, the bare relay, our proxy), so every ratio compares runs made moments apart.
"""

from __future__ import annotations

import sys

from bench.loads import combined_rps, redis_benchmark
from bench.procs import Stack, Unavailable
from bench.report import median, na, paired_ratio

PIPELINES = (1, 16)


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def start_candidates(st: Stack, names: tuple[str, ...]) -> tuple[dict[str, int], dict[str, str]]:
    """Redis plus the named relays in front of it: ({name: port}, {name: why unavailable})."""
    redis = st.redis()
    starters = {"twemproxy": st.nutcracker, "bare_relay": st.bare_relay,
                "proxy": lambda port: st.proxy(port)}
    ports, missing = {"direct": redis.port}, {}
    for name in names:
        try:
            ports[name] = starters[name](redis.port).port
        except Unavailable as exc:
            missing[name] = str(exc)
            log(f"{name}: not available: {exc}")
    return ports, missing


def command_path(p) -> dict:
    """redis-benchmark -t set,get -c 50 at -P 1 and -P 16 through each candidate."""
    with Stack(p.profile_dir, "command_path") as st:
        ports, missing = start_candidates(st, ("twemproxy", "bare_relay", "proxy"))
        samples: dict[str, list[float]] = {f"{c}_p{P}": [] for c in ports for P in PIPELINES}
        for r in range(p.rounds):
            for pipeline in PIPELINES:
                n = p.cmd_requests_p1 if pipeline == 1 else p.cmd_requests_p16
                for name, port in ports.items():
                    result = redis_benchmark(port, "set,get", n, 50, pipeline)
                    samples[f"{name}_p{pipeline}"].append(combined_rps(result))
            log(f"round {r + 1}/{p.rounds}: " + ", ".join(
                f"{k}={v[-1]:,.0f}" for k, v in samples.items()))
    ratios = {}
    for pipeline in PIPELINES:
        for other in ("twemproxy", "bare_relay", "direct"):
            key = f"proxy/{other}_p{pipeline}"
            if "proxy" in missing or other in missing:
                ratios[key] = na(missing.get("proxy") or missing[other])
            else:
                ratios[key] = paired_ratio(samples[f"proxy_p{pipeline}"],
                                           samples[f"{other}_p{pipeline}"])
        if "bare_relay" not in missing and "twemproxy" not in missing:
            ratios[f"bare_relay/twemproxy_p{pipeline}"] = paired_ratio(
                samples[f"bare_relay_p{pipeline}"], samples[f"twemproxy_p{pipeline}"])
    values = {f"{k}_rps": median(v) for k, v in samples.items()}
    values.update({f"{name}_rps": na(reason) for name, reason in missing.items()})
    return {"ratios": ratios, "values": values, "samples": samples,
            "params": {"tests": "set,get", "clients": 50, "pipelines": list(PIPELINES),
                       "requests_p1": p.cmd_requests_p1, "requests_p16": p.cmd_requests_p16,
                       "rps": "requests / total seconds over SET and GET (harmonic mean)"}}


def latency(p) -> dict:
    """p50 / p99 at -c 10 -P 1 (redis-benchmark's own percentiles, mean of SET and GET)."""
    with Stack(p.profile_dir, "latency") as st:
        ports, missing = start_candidates(st, ("twemproxy", "bare_relay", "proxy"))
        samples: dict[str, list[float]] = {f"{c}_{q}": [] for c in ports for q in ("p50", "p99")}
        for r in range(p.rounds):
            for name, port in ports.items():
                result = redis_benchmark(port, "set,get", p.latency_requests, 10, 1)
                for q in ("p50", "p99"):
                    samples[f"{name}_{q}"].append(
                        sum(t[f"{q}_latency_ms"] for t in result.values()) / len(result))
            log(f"round {r + 1}/{p.rounds}: " + ", ".join(
                f"{k}={v[-1]:.3f}ms" for k, v in samples.items()))
    ratios, values = {}, {f"{k}_ms": median(v) for k, v in samples.items()}
    for q in ("p50", "p99"):
        for other in ("twemproxy", "direct", "bare_relay"):
            key = f"proxy/{other}_{q}"
            if "proxy" in missing or other in missing:
                ratios[key] = na(missing.get("proxy") or missing[other])
                values[f"added_vs_{other}_{q}_ms"] = ratios[key]
                continue
            ratios[key] = paired_ratio(samples[f"proxy_{q}"], samples[f"{other}_{q}"])
            values[f"added_vs_{other}_{q}_ms"] = median(
                [a - b for a, b in zip(samples[f"proxy_{q}"], samples[f"{other}_{q}"])])
    values.update({f"{name}_ms": na(reason) for name, reason in missing.items()})
    return {"ratios": ratios, "values": values, "samples": samples,
            "params": {"tests": "set,get", "clients": 10, "pipeline": 1,
                       "requests": p.latency_requests,
                       "note": "closed loop: 10 clients, one request each in flight"}}
