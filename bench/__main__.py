"""``python -m bench``: every scenario of issue 4, a markdown table on stdout, JSON on request.

Each scenario alternates its candidates round by round and reports medians and paired ratios.
Progress goes to stderr. See bench/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace

from bench import amqps_path, cluster_path, command_path, events, fleet, redis_cost, tls_path
from bench.amqp_raw import AMQPError, RawAMQP
from bench.report import machine, markdown, na

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


@dataclass(frozen=True)
class Params:
    rounds: int = 5
    cmd_requests_p1: int = 100_000
    cmd_requests_p16: int = 500_000
    latency_requests: int = 100_000
    event_n: int = 100_000
    naive_n: int = 5_000
    cost_requests_p1: int = 100_000
    cost_requests_p16: int = 500_000
    replay_n: int = 200_000
    idle_clients: int = 1_000
    takeovers: int = 20  # fleet: SIGKILLs of the forwarder
    amqp_url: str = AMQP_URL
    profile_dir: str | None = None  # py-spy raw profiles of every proxy, when set


QUICK = Params(rounds=3, cmd_requests_p1=10_000, cmd_requests_p16=60_000,
               latency_requests=10_000, event_n=20_000, naive_n=1_000,
               cost_requests_p1=10_000, cost_requests_p16=30_000, replay_n=20_000,
               takeovers=5)

SCENARIOS = {
    "command_path": command_path.command_path,
    "latency": command_path.latency,
    "event_path": events.event_path,
    "event_path_tls": amqps_path.event_path_tls,
    "event_path_format": events.event_path_format,
    "redis_cost": redis_cost.redis_cost,
    "replay": events.replay,
    "memory": redis_cost.memory,
    "cluster_command_path": cluster_path.cluster_command_path,
    "fleet": fleet.fleet,
    "tls_command_path": tls_path.tls_command_path,
}


def rabbitmq_version() -> str | None:
    try:
        with RawAMQP(timeout=5) as conn:
            version = conn.server_properties.get("version", "?")
            return version.decode() if isinstance(version, bytes) else str(version)
    except (OSError, AMQPError):
        return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, under 2 minutes")
    parser.add_argument("--only", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--rounds", type=int, help="alternations per scenario (at least 3)")
    parser.add_argument("--profile", metavar="DIR",
                        help="record every proxy with py-spy into DIR (slows it: numbers "
                             "from such a run are for reading profiles, not for targets)")
    args = parser.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(SCENARIOS)
        if unknown:
            parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    params = QUICK if args.quick else Params()
    if args.rounds:
        params = replace(params, rounds=args.rounds)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        params = replace(params, profile_dir=os.path.abspath(args.profile))
    names = args.only.split(",") if args.only else list(SCENARIOS)
    version = rabbitmq_version()
    report = {"command": shlex.join(["python", "-m", "bench", *argv]),
              "machine": machine(version), "params": asdict(params), "scenarios": {}}
    started = time.monotonic()
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            if name in ("event_path", "event_path_tls", "event_path_format", "replay", "redis_cost", "memory") and version is None:
                raise events.EventsUnavailable("RabbitMQ does not answer at 127.0.0.1:5672")
            result = SCENARIOS[name](params)
        except events.EventsUnavailable as exc:
            result = events.unavailable(name, str(exc))
        except Exception as exc:  # one broken scenario must not hide the others' numbers
            traceback.print_exc()
            result = {"ratios": {}, "values": {}, "error": na(f"{type(exc).__name__}: {exc}")}
        result["seconds"] = round(time.monotonic() - t0, 1)
        report["scenarios"][name] = result
        print(f"{name} done in {result['seconds']}s", file=sys.stderr, flush=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    table = markdown(report)
    report["table"] = table
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
