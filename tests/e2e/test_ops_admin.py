"""Who may read our commands (``INFO``'s right is enough for ``info`` and ``config_get``), the audit
log of every change (client, user, old -> new, passwords masked), the log formats, and
``key_evt_amqp.info`` while Redis is down."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import pytest
import redis

from harness import ErrorReply, ProxyProcess, RawClient, RedisServer, unreachable_amqp_url, wait_for

USERS = {
    "ops": ("ops-pw", "+@all"),
    "reader": ("reader-pw", "+info +get +ping +hello +client"),  # INFO, no CONFIG
    "nobody": ("nobody-pw", "+get +ping +hello +client"),
}
DEFAULT_PW = "default-pw"
UTC_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        with server.client() as admin:
            for name, (password, rules) in USERS.items():
                admin.execute_command("ACL", "SETUSER", name, "on", ">" + password, "~*", "&*", *rules.split())
            admin.execute_command("ACL", "SETUSER", "default", "resetpass", ">" + DEFAULT_PW)
        yield server


@pytest.fixture(scope="module")
def acl_proxy(acl_redis: RedisServer) -> Iterator[ProxyProcess]:
    upstream = f"redis://default:{DEFAULT_PW}@127.0.0.1:{acl_redis.port}/0"  # the proxy's own user
    with ProxyProcess(upstream, ("--amqp", unreachable_amqp_url())) as proxy:
        yield proxy


def as_user(proxy: ProxyProcess, user: str) -> RawClient:
    raw = RawClient(proxy.port)
    assert raw.command("AUTH", user, USERS[user][0]) == b"OK"
    return raw


def redis_cli(proxy: ProxyProcess, user: str, *args: str) -> str:
    done = subprocess.run(["redis-cli", "-p", str(proxy.port), "--user", user, "--pass", USERS[user][0],
                           "--no-auth-warning", *args], capture_output=True, text=True, timeout=20, check=True)
    return done.stdout.strip()


def test_info_and_config_get_need_only_the_right_to_run_info(acl_proxy: ProxyProcess) -> None:
    with as_user(acl_proxy, "reader") as raw:
        assert raw.command("key_evt_amqp.info").startswith(b"# key_evt_amqp\r\n")
        assert not isinstance(raw.command("key_evt_amqp.config_get"), ErrorReply)
        refused = raw.command("key_evt_amqp.keymask_set", "ALL")
        assert isinstance(refused, ErrorReply) and refused.endswith(b"(it needs the right to run CONFIG SET)")
    with as_user(acl_proxy, "nobody") as raw:
        refused = raw.command("key_evt_amqp.info")
        assert isinstance(refused, ErrorReply)
        assert refused == (b"NOPERM this user has no permissions to run the 'key_evt_amqp.info' command "
                           b"(it needs the right to run INFO or CONFIG SET)")
    with RawClient(acl_proxy.port) as raw:  # not authenticated at all
        assert raw.command("key_evt_amqp.info").startswith(b"NOAUTH")


def test_an_admin_change_is_one_log_line_with_who_and_old_and_new(acl_proxy: ProxyProcess) -> None:
    assert redis_cli(acl_proxy, "ops", "key_evt_amqp.config_set", "127.0.0.1", "5672", "guest",
                     "n3w-s3cret", "30", "amq.direct", "rk-audit") == "OK"
    assert redis_cli(acl_proxy, "ops", "key_evt_amqp.keymask_set", "^audit:") == "OK"
    lines = wait_for(lambda: [line for line in acl_proxy.log_text().splitlines() if "admin: " in line],
                     message="for the audit lines")
    config_set = [line for line in lines if "key_evt_amqp.config_set" in line]
    assert len(config_set) == 1, lines
    line = config_set[0]
    assert UTC_STAMP.match(line), line
    assert re.search(r"INFO key_evt_amqp\.admin: admin: key_evt_amqp\.config_set by 127\.0\.0\.1:\d+ user=ops: ", line)
    assert "amqp_password *** -> ***" in line and "routing_key 'redis_keyspace_events' -> 'rk-audit'" in line
    assert line.endswith("-> OK")
    assert "s3cret" not in acl_proxy.log_text() and "guest:" not in line
    keymask = [line for line in lines if "key_evt_amqp.keymask_set by" in line and "user=ops" in line]
    assert len(keymask) == 1 and "keymasks [] -> ['^audit:']" in keymask[0], lines


def test_nothing_per_connection_at_info(acl_proxy: ProxyProcess) -> None:
    before = acl_proxy.log_text()
    for _ in range(5):
        with acl_proxy.client(username="reader", password=USERS["reader"][0]) as client:
            client.get("x")
    assert acl_proxy.log_text() == before


def test_json_logs_at_debug_show_connections(redis_server: RedisServer) -> None:
    with ProxyProcess(redis_server.url, ("--amqp", unreachable_amqp_url(), "--log-format", "json",
                                         "--log-level", "debug")) as proxy:
        with proxy.client() as client:
            client.execute_command("key_evt_amqp.events_set", "xe")
        entries = wait_for(lambda: [json.loads(line) for line in proxy.log_text().splitlines()]
                           if "disconnected" in proxy.log_text() else None, message="for the disconnect line")
    assert all(set(e) >= {"time", "level", "logger", "message"} for e in entries), entries
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in entries)
    ours = [e for e in entries if e["logger"].startswith("key_evt_amqp")]
    # at DEBUG the libraries speak too (asyncio; aiormq while connecting to the broker at start)
    assert ours and all(e["logger"].split(".")[0] in ("asyncio", "aiormq")
                        for e in entries if e not in ours)
    messages = [e["message"] for e in ours]
    assert any(re.fullmatch(r"client \('127\.0\.0\.1', \d+\) connected", m) for m in messages), messages
    assert any("key_evt_amqp.events_set by 127.0.0.1:" in m and "events 'xe' -> 'xe'" not in m for m in messages)


def test_info_while_redis_is_down_from_this_machine(redis_server: RedisServer) -> None:
    """Redis is gone: a client on 127.0.0.1 may still read ``info`` (and ``config_get``); any
    other command closes the connection without a reply, as before."""
    server = RedisServer().start()
    try:
        with ProxyProcess(server.url, ("--amqp", unreachable_amqp_url())) as proxy:
            server.stop()
            with RawClient(proxy.port) as raw:
                info = raw.command("key_evt_amqp.info")
                assert info.startswith(b"# key_evt_amqp\r\n") and b"source_state:" in info, info
                assert not isinstance(raw.command("key_evt_amqp.config_get"), ErrorReply)
                raw.send(b"*1\r\n$4\r\nPING\r\n")
                assert raw.read_until_closed()[0] == b""
            with proxy.client() as client, pytest.raises(redis.ConnectionError):
                client.execute_command("key_evt_amqp.keymask_set", "ALL")  # changes: not without Redis
    finally:
        server.close()
