"""Numbers in, report out: medians, paired ratios, targets, machine facts, the markdown table.

A ratio is the median over rounds of (a / b) measured in the same round, so slow drift of a
shared machine cancels. A value that could not be measured is the string
``"not available: <reason>"``, never a number.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
from importlib import metadata

NA = "not available: "

# (scenario, "ratios" | "values", key, operator, bound): the targets of issue 4.
TARGETS = [
    ("command_path", "ratios", "proxy/twemproxy_p16", ">=", 1.2),
    ("command_path", "ratios", "proxy/bare_relay_p1", ">=", 0.9),
    ("command_path", "ratios", "proxy/twemproxy_p1", ">=", 0.6),  # beat the bare relay's 0.60
    ("latency", "ratios", "proxy/twemproxy_p99", "<=", 1.5),
    ("event_path", "ratios", "proxy/ceiling", ">=", 0.7),
    ("redis_cost", "ratios", "with_events/without", ">=", 0.9),
    ("replay", "ratios", "replay/ceiling", ">=", 0.7),
    ("memory", "values", "idle_mb", "<", 60),
    ("memory", "values", "per_client_kb", "<", 30),
]


def na(reason: str) -> str:
    return NA + " ".join(str(reason).split())


def median(values: list[float]):
    return statistics.median(values) if values else na("no samples")


def paired_ratio(a: list[float], b: list[float]):
    """Median of a[i] / b[i] over the rounds where both were measured."""
    pairs = [x / y for x, y in zip(a, b) if y]
    return statistics.median(pairs) if pairs else na("no paired samples")


def check(value, op: str, bound: float) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    ok = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
    return "met" if ok else "NOT met"


def _run(argv: list[str]) -> str:
    if not shutil.which(argv[0]):
        return na(f"{argv[0]} not installed")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return na(exc)
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else ""


def machine(rabbitmq_version: str | None) -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    packages = {}
    for name in ("uvloop", "hiredis", "aiormq", "pamqp", "redis"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    return {
        "nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "redis_server": _run(["redis-server", "--version"]),
        "nutcracker": _run(["nutcracker", "--version"]),
        "redis_benchmark": _run(["redis-benchmark", "--version"]),
        "rabbitmq": rabbitmq_version or na("broker unreachable"),
        "packages": packages,
    }


def _fmt(value, notes: list[str]) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, str) and value.startswith(NA):
        reason = value[len(NA):]
        if reason not in notes:
            notes.append(reason)
        return f"n/a [{notes.index(reason) + 1}]"
    return str(value)


UNITS = ("_rps", "_ms", "_mb", "_kb", "_per_s", "_per_msg", "_per_event", "_ok", "_fraction")


def markdown(report: dict) -> str:
    """The ratios with their targets, then the medians behind them, then why any is n/a."""
    m, notes = report["machine"], []
    lines = [f"Machine: {m['nproc']} cores, {m['cpu_model']}, Python {m['python']}, "
             f"{m['redis_server'].split(' sha=')[0]}, {m['nutcracker']}, RabbitMQ {m['rabbitmq']}; "
             f"load at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}.",
             f"Command: `{report['command']}` ({report['params']['rounds']} alternations, "
             f"medians of per-round ratios).", "",
             "| scenario | ratio | median | target | |", "|---|---|---|---|---|"]
    targets = {(s, k): (op, b) for s, _, k, op, b in TARGETS}
    for name, scenario in report["scenarios"].items():
        for key, value in scenario.get("ratios", {}).items():
            op, bound = targets.get((name, key), (None, None))
            lines.append(f"| {name} | {key} | {_fmt(value, notes)} | "
                         f"{f'{op} {bound}' if op else ''} | "
                         f"{check(value, op, bound) if op else ''} |")
        for key, value in scenario.get("values", {}).items():
            if (name, key) in targets:
                op, bound = targets[(name, key)]
                lines.append(f"| {name} | {key} | {_fmt(value, notes)} | {op} {bound} | "
                             f"{check(value, op, bound)} |")
        if "error" in scenario:
            lines.append(f"| {name} | error | {_fmt(scenario['error'], notes)} | | |")
    lines += ["", "| scenario | value | median |", "|---|---|---|"]
    for name, scenario in report["scenarios"].items():
        for key, value in scenario.get("values", {}).items():
            if key.endswith(UNITS) and (name, key) not in targets:
                lines.append(f"| {name} | {key} | {_fmt(value, notes)} |")
    if notes:
        lines += [""] + [f"[{i}] not available: {reason}" for i, reason in enumerate(notes, 1)]
    return "\n".join(lines)
