"""Scenario ``tls_command_path``: what TLS costs on the command path, beside what it costs Redis.

One redis-server listens twice (plain ``--port`` and ``--tls-port``, no client certificates) with
certificates made for the run (trustme). redis-benchmark ``-t set,get -c 50`` at ``-P 1`` and
``-P 16`` runs, round after round, against:

- ``direct`` / ``direct_tls``: Redis itself, plain and ``--tls``;
- ``proxy``: the proxy, plain on both sides;
- ``proxy_client_tls``: clients speak TLS to the proxy (``--tls-cert``), plain to Redis;
- ``proxy_upstream_tls``: plain clients, ``rediss://`` to Redis;
- ``proxy_tls``: TLS on both sides.

Ratios: each TLS proxy over the plain proxy, and ``direct_tls/direct`` (Redis's own TLS cost), so
the proxy's TLS overhead can be read beside Redis's.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys

from bench.loads import combined_rps, redis_benchmark
from bench.procs import HOST, Service, Stack, free_port
from bench.report import median, paired_ratio

PIPELINES = (1, 16)
CANDIDATES = ("direct", "direct_tls", "proxy", "proxy_client_tls", "proxy_upstream_tls", "proxy_tls")
TLS_CLIENTS = ("direct_tls", "proxy_client_tls", "proxy_tls")


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _certificates(directory: str) -> dict[str, str]:
    import trustme  # a bench extra; imported late so that other scenarios run without it

    ca = trustme.CA()
    server = ca.issue_cert(HOST, "localhost")
    paths = {name: os.path.join(directory, f"{name}.pem") for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["cert"])
    server.private_key_pem.write_to_path(paths["key"])
    return paths


def _tls_ping(port: int, ca: str) -> bool:
    try:
        context = ssl.create_default_context(cafile=ca)
        with socket.create_connection((HOST, port), timeout=1) as raw, \
                context.wrap_socket(raw, server_hostname=HOST) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _start(st: Stack, certs: dict[str, str]) -> dict[str, Service]:
    tls_port = free_port()
    redis = st.redis("--tls-port", str(tls_port), "--tls-cert-file", certs["cert"], "--tls-key-file",
                     certs["key"], "--tls-ca-cert-file", certs["ca"], "--tls-auth-clients", "no")
    plain_up = f"redis://{HOST}:{redis.port}/0"
    tls_up = f"rediss://{HOST}:{tls_port}/0"
    listen_tls = ("--tls-cert", certs["cert"], "--tls-key", certs["key"])
    up_ca = ("--upstream-tls-ca", certs["ca"])
    services = {"direct": redis}
    for name, upstream, args in (("proxy", plain_up, ()), ("proxy_client_tls", plain_up, listen_tls),
                                 ("proxy_upstream_tls", tls_up, up_ca), ("proxy_tls", tls_up, (*listen_tls, *up_ca))):
        port = free_port()
        argv = [sys.executable, "-m", "proxy", "serve", "--listen", f"{HOST}:{port}", "--upstream", upstream,
                "--amqp", f"amqp://guest:guest@{HOST}:{free_port()}/", *args]
        if name in TLS_CLIENTS:
            services[name] = st._start(name, argv, port, lambda port=port: _tls_ping(port, certs["ca"]))
        else:
            services[name] = st._start(name, argv, port)
    services["direct_tls"] = Service("direct_tls", tls_port, redis.proc, redis.log)
    return services


def tls_command_path(p) -> dict:
    """redis-benchmark -t set,get -c 50 at -P 1 and -P 16, plain and TLS, direct and through the proxy."""
    with Stack(p.profile_dir, "tls_command_path") as st:
        certs = _certificates(st.dir)
        services = _start(st, certs)
        samples: dict[str, list[float]] = {f"{c}_p{P}": [] for c in CANDIDATES for P in PIPELINES}
        for r in range(p.rounds):
            for pipeline in PIPELINES:
                n = p.cmd_requests_p1 if pipeline == 1 else p.cmd_requests_p16
                for name in CANDIDATES:
                    extra = ("--tls", "--cacert", certs["ca"]) if name in TLS_CLIENTS else ()
                    result = redis_benchmark(services[name].port, "set,get", n, 50, pipeline, *extra)
                    samples[f"{name}_p{pipeline}"].append(combined_rps(result))
            log(f"round {r + 1}/{p.rounds}: " + ", ".join(f"{k}={v[-1]:,.0f}" for k, v in samples.items()))
    ratios = {}
    for pipeline in PIPELINES:
        ratios[f"direct_tls/direct_p{pipeline}"] = paired_ratio(samples[f"direct_tls_p{pipeline}"],
                                                                samples[f"direct_p{pipeline}"])
        for name in ("proxy_client_tls", "proxy_upstream_tls", "proxy_tls"):
            ratios[f"{name}/proxy_p{pipeline}"] = paired_ratio(samples[f"{name}_p{pipeline}"],
                                                               samples[f"proxy_p{pipeline}"])
    return {"ratios": ratios, "values": {f"{k}_rps": median(v) for k, v in samples.items()}, "samples": samples,
            "params": {"tests": "set,get", "clients": 50, "pipelines": list(PIPELINES),
                       "requests_p1": p.cmd_requests_p1, "requests_p16": p.cmd_requests_p16,
                       "tls": "TLS 1.3, server certificate only (no client certificates)"}}
