"""Shared settings (issue 10): three proxy processes in front of one private Redis behave as one.

A ``key_evt_amqp.*`` change sent to any instance is stored in the hash ``{key_evt_amqp}:config``
and applied by every instance (proxy/fleet/shared_config.py): measured here, within 1 s. The
settings survive a restart of every instance, ``config_reset`` takes every instance back to its
start values, ``disconnect`` sent to one stops the broker on all. Concurrent changes converge; a
field that cannot be read is logged and ignored; a change Redis refuses changes nothing.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
import redis

from cluster import SUMMARY, RedisCluster
from faults import FaultRelay
from harness import (ErrorReply, ProxyProcess, RawClient, RedisServer, unreachable_amqp_url,
                     wait_for)
from protocol.slots import key_slot
from rabbit import URL as AMQP_URL

KEY = b"{key_evt_amqp}:config"
PROPAGATION_LIMIT = 1.0  # seconds: the "applies to every instance within 1 s"
ROUNDS = 5


@contextmanager
def fleet(upstream_url: str, extra_args: Sequence[str] = (), count: int = 3,
          env: dict[str, str] | None = None) -> Iterator[list[ProxyProcess]]:
    """``count`` proxy processes in front of one Redis (each with its own start arguments)."""
    with ExitStack() as stack:
        yield [stack.enter_context(ProxyProcess(upstream_url, extra_args, env=env)) for _ in range(count)]


@contextmanager
def clients(proxies: Sequence[ProxyProcess]) -> Iterator[list[RawClient]]:
    with ExitStack() as stack:
        yield [stack.enter_context(RawClient(p.port)) for p in proxies]


def config_of(raw: RawClient) -> dict[bytes, Any]:
    reply = raw.command("key_evt_amqp.config_get")
    assert isinstance(reply, list), reply
    values = dict(zip(reply[::2], reply[1::2], strict=True))
    origins = values[b"origins"]
    values[b"origins"] = dict(zip(origins[::2], origins[1::2], strict=True))
    return values


def info_of(raw: RawClient) -> dict[bytes, bytes]:
    text = raw.command("key_evt_amqp.info")
    assert isinstance(text, bytes) and not isinstance(text, ErrorReply), text
    return dict(line.split(b":", 1) for line in text.split(b"\r\n") if line and not line.startswith(b"#"))


def no_broker() -> list[str]:
    return ["--amqp", unreachable_amqp_url()]


def until(predicate: Any, timeout: float = 10.0, message: str = "") -> Any:
    return wait_for(predicate, timeout=timeout, interval=0.002, message=message)


def test_keymask_set_on_one_instance_applies_on_every_instance_within_a_second(
        redis_server: RedisServer, fresh_redis: redis.Redis) -> None:
    with fleet(redis_server.url, no_broker()) as proxies, clients(proxies) as (a, b, c):
        delays = []
        for round_ in range(ROUNDS):
            mask = f"m{round_}-{uuid.uuid4().hex}".encode()
            start = time.monotonic()
            assert a.command("key_evt_amqp.keymask_set", mask) == b"OK"
            for other in (b, c):
                until(lambda other=other: config_of(other)[b"keymasks"] == [mask],  # type: ignore[misc]
                      timeout=5, message="for the mask on another instance")
            delays.append(time.monotonic() - start)
        line = (f"fleet config: keymask_set on A seen on B and C after median {statistics.median(delays) * 1000:.1f} ms, "
                f"max {max(delays) * 1000:.1f} ms ({ROUNDS} rounds, command reply included)")
        print(line)
        SUMMARY.append(line)
        assert max(delays) < PROPAGATION_LIMIT, delays
        for raw in (a, b, c):
            config = config_of(raw)
            assert config[b"origins"][b"keymasks"] == b"command"
            assert config[b"origins"][b"routing_key"] == b"default"
            assert config[b"origins"][b"amqp_host"] == b"flag"
        assert fresh_redis.hget(KEY, "version") == str(ROUNDS).encode()


def test_the_settings_survive_a_restart_of_every_instance(
        redis_server: RedisServer, fresh_redis: redis.Redis) -> None:
    args = [*no_broker(), "--keymask", "start:", "--events", "$"]
    with fleet(redis_server.url, args) as proxies, clients(proxies) as (a, b, c):
        assert a.command("key_evt_amqp.keymask_set", "kept:") == b"OK"
        assert b.command("key_evt_amqp.fallback_storage_size_set", "777") == b"OK"
    # Every instance stopped; new ones with the same start values.
    with fleet(redis_server.url, args) as proxies, clients(proxies) as raws:
        for raw in raws:
            config = config_of(raw)
            assert (config[b"keymasks"], config[b"fallback_size"]) == ([b"kept:"], b"777")
            assert config[b"origins"][b"keymasks"] == config[b"origins"][b"fallback_size"] == b"command"
            until(lambda raw=raw: info_of(raw)[b"source_state"] == b"subscribed",  # type: ignore[misc]
                  message="for the keyspace subscription")
        before = [info_of(raw) for raw in raws]
        fresh_redis.set("kept:1", "v")
        fresh_redis.set("start:1", "v")  # the start mask no longer applies: filtered
        for raw, old in zip(raws, before, strict=True):
            def counted(raw: RawClient = raw, old: dict[bytes, bytes] = old) -> bool:
                new = info_of(raw)
                return (int(new[b"events_accepted"]) - int(old[b"events_accepted"]),
                        int(new[b"events_filtered"]) - int(old[b"events_filtered"])) == (1, 1)
            until(counted, message="for one event accepted (kept:1) and one filtered (start:1)")


def test_config_reset_takes_every_instance_back_to_its_start_values(
        redis_server: RedisServer, fresh_redis: redis.Redis) -> None:
    args = [*no_broker(), "--keymask", "start:", "--routing-key", "rk-flag"]
    with fleet(redis_server.url, args, env={"KEY_EVT_AMQP_EXCHANGE": "ex-env"}) as proxies, \
            clients(proxies) as (a, b, c):
        assert a.command("key_evt_amqp.config_set", "127.0.0.2", "5673", "u", "hidden-pw", "7", "ex-cmd",
                         "rk-cmd", "2", "5", "cmd:") == b"OK"
        assert a.command("key_evt_amqp.events_set", "g") == b"OK"
        until(lambda: config_of(c)[b"routing_key"] == b"rk-cmd", message="for the change on C")
        config = config_of(c)
        assert config[b"amqp_password"] == b"***"
        assert {k: v for k, v in config[b"origins"].items() if v == b"command"}.keys() == {
            b"amqp_host", b"amqp_port", b"amqp_user", b"amqp_password", b"heartbeat", b"exchange",
            b"routing_key", b"delivery_mode", b"fallback_size", b"keymasks", b"events"}
        assert b.command("key_evt_amqp.config_reset", "x") == ErrorReply(
            b"ERR wrong number of arguments for 'key_evt_amqp.config_reset' command")
        assert b.command("key_evt_amqp.config_reset") == b"OK"
        assert fresh_redis.exists(KEY) == 0
        for raw in (a, b, c):
            until(lambda raw=raw: config_of(raw)[b"routing_key"] == b"rk-flag",  # type: ignore[misc]
                  timeout=PROPAGATION_LIMIT, message="for the start value")
            config = config_of(raw)
            assert (config[b"keymasks"], config[b"exchange"], config[b"heartbeat"], config[b"events"],
                    config[b"amqp_host"]) == ([b"start:"], b"ex-env", b"30", b"xe", b"127.0.0.1")
            origins = config[b"origins"]
            assert (origins[b"keymasks"], origins[b"routing_key"], origins[b"exchange"], origins[b"heartbeat"],
                    origins[b"amqp_host"]) == (b"flag", b"flag", b"env", b"default", b"flag")
        for proxy in proxies:
            assert "hidden-pw" not in proxy.log_text()


def test_disconnect_sent_to_one_instance_stops_the_broker_on_every_instance(
        redis_server: RedisServer, fresh_redis: redis.Redis) -> None:
    # lazy: the instances connect when told to (the default connects at start)
    args = ["--amqp", AMQP_URL, "--routing-key", f"kea-fleet-{uuid.uuid4().hex}", "--heartbeat", "2",
            "--amqp-connect", "lazy"]
    with fleet(redis_server.url, args) as proxies, clients(proxies) as (a, b, c):
        assert a.command("key_evt_amqp.connect") == b"AMQP CONNECT OK"
        assert c.command("key_evt_amqp.connect") == b"AMQP CONNECT OK"
        start = time.monotonic()
        # B's own reply is B's own state (the module's code): it was not connected.
        assert b.command("key_evt_amqp.disconnect") == ErrorReply(b"AMQP DISCONNECT ERROR: 1")
        for raw in (a, c):
            until(lambda raw=raw: info_of(raw)[b"amqp_state"] == b"disabled",  # type: ignore[misc]
                  message="for the broker connection to close")
            assert info_of(raw)[b"amqp_connections"] == b"1"
        line = f"fleet config: disconnect on B closed the broker connections of A and C after {time.monotonic() - start:.2f} s"
        print(line)
        SUMMARY.append(line)
        assert all(info_of(raw)[b"amqp_enabled"] == b"0" for raw in (a, b, c))

        # A restarted instance starts disconnected: an event does not bring the broker back.
        proxies[2].stop()
        with ProxyProcess(redis_server.url, [*args, "--keymask", "ALL", "--events", "$"]) as again, \
                RawClient(again.port) as raw:
            until(lambda: info_of(raw)[b"source_state"] == b"subscribed", message="for the subscription")
            fresh_redis.set("after-restart", "v")
            until(lambda: info_of(raw)[b"events_accepted"] == b"1", message="for the event")
            time.sleep(0.5)
            assert (info_of(raw)[b"amqp_state"], info_of(raw)[b"amqp_connections"]) == (b"disabled", b"0")

            # connect on B enables the broker everywhere again.
            assert b.command("key_evt_amqp.connect") == b"AMQP CONNECT OK"
            for other in (a, raw):
                until(lambda other=other: info_of(other)[b"amqp_state"] == b"ready",  # type: ignore[misc]
                      message="for the broker connection")


def test_a_failed_connect_still_enables_the_broker_on_every_instance(
        redis_server: RedisServer, fresh_redis: redis.Redis) -> None:
    """``connect`` replies with this instance's attempt (3: unreachable), but the fleet is enabled
    from then on: every instance, this one too, keeps trying in the background."""
    with fleet(redis_server.url, no_broker(), count=2) as proxies, clients(proxies) as (a, b):
        assert a.command("key_evt_amqp.disconnect") == ErrorReply(b"AMQP DISCONNECT ERROR: 1")
        for raw in (a, b):
            until(lambda raw=raw: info_of(raw)[b"amqp_state"] == b"disabled",  # type: ignore[misc]
                  message="for the fleet to disconnect")
        assert b.command("key_evt_amqp.connect") == ErrorReply(b"AMQP CONNECT ERROR: 3")
        for raw in (a, b):
            until(lambda raw=raw: info_of(raw)[b"amqp_state"] in (b"connecting", b"backoff"),  # type: ignore[misc]
                  message="for the instance to retry in the background")
            assert info_of(raw)[b"amqp_enabled"] == b"1"


def test_concurrent_changes_on_two_instances_converge(
        redis_server: RedisServer, fresh_redis: redis.Redis) -> None:
    changes = 20
    with fleet(redis_server.url, no_broker()) as proxies, clients(proxies) as raws:
        errors: list[BaseException] = []

        def add(port: int, prefix: str) -> None:
            try:
                with RawClient(port) as raw:
                    for i in range(changes):
                        assert raw.command("key_evt_amqp.keymask_add", f"{prefix}{i}") == b"OK"
                        assert raw.command("key_evt_amqp.config_set", "127.0.0.1", "1", "u", "p", "30",
                                           "amq.direct", f"rk-{prefix}{i}") == b"OK"
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=add, args=(p.port, prefix)) for p, prefix in zip(proxies[:2], "ab")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        expected = {f"{prefix}{i}".encode() for prefix in "ab" for i in range(changes)}
        assert fresh_redis.hget(KEY, "version") == str(4 * changes).encode()  # every change counted once

        def agreed() -> bool:
            views = [{k: v for k, v in config_of(raw).items() if k not in (b"listen_port", b"origins")}
                     for raw in raws]
            return all(view == views[0] for view in views) and set(views[0][b"keymasks"]) == expected
        until(agreed, timeout=5, message="for the three instances to agree")
        assert config_of(raws[2])[b"routing_key"] in (f"rk-a{changes - 1}".encode(), f"rk-b{changes - 1}".encode())


def test_a_field_that_cannot_be_read_is_logged_and_ignored(
        redis_server: RedisServer, fresh_redis: redis.Redis) -> None:
    with fleet(redis_server.url, no_broker()) as proxies, clients(proxies) as raws:
        # Written by hand (no PUBLISH): the instances find it on their periodic read.
        fresh_redis.hset(KEY, mapping={"heartbeat": "abc", "future_setting": "on", "routing_key": "rk-by-hand",
                                       "keymasks": "3:ab", "amqp_password": "hand-secret", "version": "x"})
        for raw in raws:
            until(lambda raw=raw: config_of(raw)[b"routing_key"] == b"rk-by-hand",  # type: ignore[misc]
                  timeout=5, message="for the periodic read")
            config = config_of(raw)
            assert (config[b"heartbeat"], config[b"keymasks"]) == (b"30", [])  # start values kept
            assert config[b"origins"][b"routing_key"] == config[b"origins"][b"amqp_password"] == b"command"
            assert config[b"origins"][b"heartbeat"] == b"default"
        for proxy in proxies:
            log = proxy.log_text()
            assert "invalid heartbeat 'abc': expected whole seconds" in log, log[-2000:]
            assert "unknown setting 'future_setting'" in log
            assert "invalid keymasks '3:ab'" in log
            assert "invalid version 'x'" in log
            assert "hand-secret" not in log
        # The next command repairs the version and keeps the rest as it is.
        assert raws[0].command("key_evt_amqp.fallback_storage_size_set", "9") == b"OK"
        assert fresh_redis.hget(KEY, "version") == b"1"
        assert fresh_redis.hget(KEY, "heartbeat") == b"abc"

        # Not a hash at all: the settings in force stay, commands say why they fail.
        fresh_redis.delete(KEY)
        fresh_redis.set(KEY, "not a hash")
        reply = raws[1].command("key_evt_amqp.keymask_add", "x")
        assert isinstance(reply, ErrorReply) and b"WRONGTYPE" in reply, reply
        time.sleep(2.5)  # a periodic read or two
        for proxy, raw in zip(proxies, raws, strict=True):
            assert proxy.is_running()
            assert info_of(raw)[b"shared_config_state"] == b"retrying"
        fresh_redis.delete(KEY)
        for raw in raws:
            until(lambda raw=raw: info_of(raw)[b"shared_config_state"] == b"watching",  # type: ignore[misc]
                  timeout=5, message="for the hash to be readable again")
            assert config_of(raw)[b"routing_key"] == b"redis_keyspace_events"


def test_a_change_redis_refuses_changes_nothing(redis_server: RedisServer, fresh_redis: redis.Redis) -> None:
    with fleet(redis_server.url, no_broker(), count=2) as proxies, clients(proxies) as (a, b):
        assert a.command("key_evt_amqp.keymask_set", "before") == b"OK"
        fresh_redis.config_set("min-replicas-to-write", 1)  # every write refused: NOREPLICAS
        try:
            reply = a.command("key_evt_amqp.keymask_set", "refused")
            assert isinstance(reply, ErrorReply) and b"NOREPLICAS" in reply, reply
            reply = b.command("key_evt_amqp.disconnect")
            assert isinstance(reply, ErrorReply) and b"NOREPLICAS" in reply, reply
            time.sleep(0.3)
            for raw in (a, b):
                assert config_of(raw)[b"keymasks"] == [b"before"]
                assert info_of(raw)[b"amqp_enabled"] == b"1"
        finally:
            fresh_redis.config_set("min-replicas-to-write", 0)
        assert b.command("key_evt_amqp.keymask_set", "after") == b"OK"
        until(lambda: config_of(a)[b"keymasks"] == [b"after"], timeout=PROPAGATION_LIMIT)


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_an_instance_cut_off_from_redis_catches_up(redis_server: RedisServer, fresh_redis: redis.Redis,
                                                   fault: str) -> None:
    """The change's message is missed; once Redis answers again the instance reads the hash. A
    black hole (a partition: nothing arrives, nothing is refused) lasts longer than the silence
    after which the subscription is replaced (7 s > SUBSCRIPTION_SILENCE)."""
    with FaultRelay(redis_server.port) as relay, \
            ProxyProcess(redis_server.url, no_broker()) as a, \
            ProxyProcess(f"redis://127.0.0.1:{relay.port}/", no_broker()) as cut_off, RawClient(a.port) as raw_a:
        with RawClient(cut_off.port) as raw:
            until(lambda: info_of(raw)[b"shared_config_state"] == b"watching", message="for the watcher")
        getattr(relay, fault)()
        assert raw_a.command("key_evt_amqp.keymask_set", "while-away") == b"OK"
        time.sleep(0.5 if fault == "cut" else 7)
        relay.restore()
        start = time.monotonic()
        with RawClient(cut_off.port) as raw:
            until(lambda: config_of(raw)[b"keymasks"] == [b"while-away"], timeout=20,
                  message="for the instance to catch up")
            took = time.monotonic() - start
            until(lambda: info_of(raw)[b"shared_config_state"] == b"watching", timeout=20,
                  message="for the subscription")
        line = f"fleet config: an instance cut off from Redis ({fault}) caught up {took:.2f} s after it came back"
        print(line)
        SUMMARY.append(line)


def test_cluster_the_hash_lives_on_one_slot() -> None:
    started = time.monotonic()
    with RedisCluster() as cluster, fleet(cluster.seed_url, no_broker()) as proxies, \
            clients(proxies) as (a, b, c):
        assert a.command("key_evt_amqp.keymask_set", "cluster:") == b"OK"
        for raw in (b, c):
            until(lambda raw=raw: config_of(raw)[b"keymasks"] == [b"cluster:"],  # type: ignore[misc]
                  timeout=PROPAGATION_LIMIT, message="for the mask on another instance")
        owner = cluster.owner_of(key_slot(KEY))
        with owner.client() as direct:
            assert direct.hget(KEY, "keymasks") == b"8:cluster:,"
        assert c.command("key_evt_amqp.config_reset") == b"OK"
        for raw in (a, b):
            until(lambda raw=raw: config_of(raw)[b"keymasks"] == [],  # type: ignore[misc]
                  timeout=PROPAGATION_LIMIT, message="for the reset")
    SUMMARY.append(f"fleet config: the cluster check took {time.monotonic() - started:.1f} s")
