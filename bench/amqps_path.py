"""``event_path_tls``: the event path over ``amqps://`` against ``amqp://``, as ratios.

Three candidates, each a proxy in front of its own redis-server (so a SET makes events for one
proxy only) publishing to its own queue on the local RabbitMQ:

- ``amqp``: ``amqp://`` straight to 127.0.0.1:5672 (as ``event_path``);
- ``amqp_relay``: ``amqp://`` through ``socat`` without TLS: the extra hop alone;
- ``amqps``: ``amqps://`` through ``socat`` terminating TLS (certificates made with openssl,
  ``--amqp-tls-ca``): the same hop plus TLS in the proxy and in socat.

Every round runs the three one after the other, in a rotated order, N distinct-key SETs each; a
rate is N / (first SET -> the queue holds N). ``amqps/amqp`` is what TLS costs end to end here,
``amqps/amqp_relay`` the part that is TLS (both sides of it on these same cores), and the proxy's
CPU per event says how much of it the proxy itself pays. Every body is read back (each key once).
"""

from __future__ import annotations

import shutil
import time

from bench.amqp_raw import RawAMQP
from bench.ceiling import keys
from bench.events import (EXCHANGE, EventsUnavailable, check_flow, deliver, log, own_queue,
                          start_event_proxy, verify)
from bench.loads import set_keys
from bench.procs import HOST, Stack, Unavailable
from bench.report import median, na, paired_ratio
from tests.amqps import Certificates, TlsTerminator

CANDIDATES = ("amqp", "amqp_relay", "amqps")


def event_path_tls(p) -> dict:
    for tool in ("socat", "openssl"):
        if shutil.which(tool) is None:
            raise EventsUnavailable(f"{tool} is not installed (apt-get install -y {tool})")
    samples: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    cpu: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    checks: list[dict] = []
    certs, tmp = Certificates.temporary()
    with Stack(p.profile_dir, "event_path_tls") as st, RawAMQP() as admin, \
            TlsTerminator(certs) as tls, TlsTerminator(certs, tls=False) as relay:
        urls = {"amqp": (p.amqp_url, ()),
                "amqp_relay": (f"amqp://guest:guest@{HOST}:{relay.port}/%2F", ()),
                "amqps": (f"amqps://guest:guest@{HOST}:{tls.port}/%2F", ("--amqp-tls-ca", str(certs.ca)))}
        queues = {name: own_queue(admin, f"tls-{name}") for name in CANDIDATES}
        try:
            stacks = {}
            for name in CANDIDATES:
                redis = st.redis()
                url, extra = urls[name]
                try:
                    proxy = start_event_proxy(st, redis.port, queues[name], url, *extra)
                    check_flow(proxy, redis.port, admin, queues[name])
                except Unavailable as exc:
                    raise EventsUnavailable(f"{name}: {exc}") from None
                stacks[name] = (redis, proxy)
            for r in range(p.rounds):
                order = CANDIDATES[r % 3:] + CANDIDATES[:r % 3]
                for name in order:
                    redis, proxy = stacks[name]
                    expected = keys(f"tls:{name}:{r}:", p.event_n)
                    cpu0, t0 = proxy.cpu_seconds(), time.monotonic()
                    set_keys(redis.port, expected)
                    rate, _ = deliver(admin, proxy, queues[name], p.event_n, t0)
                    samples[name].append(rate)
                    cpu[name].append((proxy.cpu_seconds() - cpu0) / p.event_n * 1e6)
                    check = verify(admin.consume_bodies(queues[name], p.event_n, 60), expected)
                    checks.append({"candidate": name, "round": r, **check})
                    admin.purge(queues[name])
                log(f"round {r + 1}/{p.rounds}: " + ", ".join(
                    f"{k}={v[-1]:,.0f}/s" for k, v in samples.items()))
        finally:
            for q in queues.values():
                admin.delete(q)
            tmp.cleanup()
    ratios = {"amqps/amqp": paired_ratio(samples["amqps"], samples["amqp"]),
              "amqps/amqp_relay": paired_ratio(samples["amqps"], samples["amqp_relay"]),
              "amqp_relay/amqp": paired_ratio(samples["amqp_relay"], samples["amqp"]),
              "proxy_cpu amqps/amqp": paired_ratio(cpu["amqps"], cpu["amqp"])}
    values: dict[str, object] = {f"{name}_per_s": median(samples[name]) for name in CANDIDATES}
    values.update({f"{name}_proxy_cpu_us_per_event": median(cpu[name]) for name in CANDIDATES})
    values["all_counts_ok"] = all(c["ok"] for c in checks) if checks else na("no rounds")
    return {"available": True, "reason": None, "ratios": ratios, "values": values,
            "samples": {"rates": samples, "proxy_cpu_us": cpu}, "checks": checks,
            "params": {"events": p.event_n, "exchange": EXCHANGE, "terminator": "socat (fork per "
                       "connection), EC P-256 certificates, TLS as negotiated by OpenSSL",
                       "proxy_args": "--keymask ALL --events A"}}
