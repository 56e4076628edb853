"""The operability parts without servers: the counters registry and its Prometheus text, the log
formats, tail's key escaping and filters, and the settings they added."""

from __future__ import annotations

import io
import json
import logging
import re
import types
from pathlib import Path

import pytest

from proxy import logs
from proxy.metrics import COUNTERS, LatencyHistogram, Metrics
from proxy.monitor import render
from proxy.settings import ConfigError, load
from proxy.tail import Filters, Formatter, Seen, escape_key


def test_every_counter_is_a_slot_starting_at_zero() -> None:
    m = Metrics()
    assert all(getattr(m, spec.attribute) == 0 for spec in COUNTERS)
    assert len({spec.attribute for spec in COUNTERS}) == len(COUNTERS)
    with pytest.raises(AttributeError):
        m.no_such_counter = 1  # type: ignore[attr-defined]


def test_latency_buckets_and_sum() -> None:
    h = LatencyHistogram()
    now = 10_000
    confirmed = [(types.SimpleNamespace(timestamp_ms=now - ms),) for ms in (0, 1, 3, 40, 400_000)]
    h.observe_confirmed(now, confirmed)
    assert h.count == 5 and h.sum_ms == 400_044
    assert h.counts[0] == 2  # 0 and 1 ms: <= 1 ms
    assert h.counts[2] == 1 and h.counts[5] == 1 and h.counts[-1] == 1  # 3 ms, 40 ms, beyond 300 s


def test_prometheus_text_reads_the_counters_and_the_info_fields() -> None:
    m = Metrics()
    m.events_seen, m.gap_ms, m.dropped_overflow = 7, 1500, 2
    m.count_admin("info", "ok")
    text = render(m, lambda: {"connected_clients": 3, "amqp_state": "ready", "fallback_length": 9}).decode()
    assert "key_evt_amqp_events_seen_total 7.0" in text
    assert "key_evt_amqp_gap_seconds_total 1.5" in text
    assert 'key_evt_amqp_events_dropped_total{reason="overflow"} 2.0' in text
    assert 'key_evt_amqp_admin_commands_total{command="info",result="ok"} 1.0' in text
    assert "key_evt_amqp_clients_connected 3.0" in text and "key_evt_amqp_fallback_length 9.0" in text
    assert 'key_evt_amqp_broker_state{state="ready"} 1.0' in text
    assert m.events_dropped == 2


def test_log_lines_in_utc_text_and_json() -> None:
    stream = io.StringIO()
    logs.setup("info", "text", stream)
    logging.getLogger("key_evt_amqp.test").info("hello %s", "there")
    logs.setup("info", "json", stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("key_evt_amqp.test").exception("failed")
    logs.setup("warning", "text", io.StringIO())  # leave no handler on our stream
    text, entry = stream.getvalue().split("\n", 1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO key_evt_amqp\.test: hello there", text)
    parsed = json.loads(entry)
    assert parsed["level"] == "ERROR" and parsed["message"] == "failed" and "boom" in parsed["exception"]
    assert parsed["time"].endswith("Z")


def test_keys_are_escaped_onto_one_line() -> None:
    assert escape_key(b"plain:key") == '"plain:key"'
    assert escape_key(b'a"b\\c\n\r\t\x00\xff') == '"a\\"b\\\\c\\n\\r\\t\\x00\\xff"'
    every_byte = escape_key(bytes(range(256)))
    assert "\n" not in every_byte and every_byte.isprintable()


def test_tail_filters_and_the_gap_line() -> None:
    seen = Seen.parse(b"3\nset\nuser:1", "id-1", "set", {})
    assert Filters(frozenset({"set"}), "user:*", 3).keep(seen)
    assert not Filters(frozenset({"del"})).keep(seen)
    assert not Filters(key="order:*").keep(seen) and not Filters(db=0).keep(seen)
    gap = Seen.parse(b"-1\nkey_evt_amqp.gap\n127.0.0.1:6379", "id-2", "key_evt_amqp.gap",
                     {"gap_start_ms": 1000, "gap_end_ms": 3500})
    assert Filters(frozenset({"del"}), "x", 5).keep(gap)  # always shown
    line = Formatter(as_json=False, colour=True).line(gap, 0)
    assert line.startswith("\x1b[1;31m") and "(2500 ms)" in line and "127.0.0.1:6379" in line


def test_metrics_listen_port_alone_means_loopback() -> None:
    assert (load(["--metrics-listen", "9100"], {}).metrics_host, load(["--metrics-listen", "9100"], {}).metrics_port) \
        == ("127.0.0.1", 9100)
    config = load(["--metrics-listen", "[::1]:9101"], {})
    assert (config.metrics_host, config.metrics_port) == ("::1", 9101)
    assert load([], {}).metrics_port == 0
    with pytest.raises(ConfigError, match="invalid --metrics-listen '0.0.0.0:0'"):
        load(["--metrics-listen", "0.0.0.0:0"], {})
    with pytest.raises(ConfigError, match="invalid --log-format 'xml': expected text or json"):
        load(["--log-format", "xml"], {})


def test_toml_takes_dashes_and_underscores(tmp_path: Path) -> None:
    path = tmp_path / "kea.toml"
    path.write_text('delivery-mode = 2\nrouting_key = "rk"\nmetrics-listen = "9102"\n')
    config = load(["--config", str(path)], {})
    assert (config.delivery_mode, config.routing_key, config.metrics_port) == (2, "rk", 9102)
    path.write_text("delivery-mode = 2\ndelivery_mode = 1\n")
    with pytest.raises(ConfigError, match="given twice"):
        load(["--config", str(path)], {})


def test_an_unknown_environment_variable_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="unknown environment variable KEY_EVT_AMQP_ROUTNG_KEY"):
        load([], {"KEY_EVT_AMQP_ROUTNG_KEY": "rk"})
    assert load([], {"KEY_EVT_AMQP_CONFIG": "", "OTHER": "x"}).routing_key == "redis_keyspace_events"
