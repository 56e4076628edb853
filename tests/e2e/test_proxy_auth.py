"""AUTH through the proxy, and who may run the admin commands.

The Redis here has a password and ACL users. The proxy's upstream URL carries the default user's
password for the proxy's own use (asking Redis what a user may do); it must never authenticate a
client's connection with it.

Rule under test: with auth on Redis, an admin command is allowed only on a connection whose Redis user
may run ``CONFIG SET``; otherwise ``-NOPERM``; before any AUTH, ``-NOAUTH`` as Redis would say.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from harness import ErrorReply, ProxyProcess, RawClient, RedisServer, unreachable_amqp_url

ADMIN_PASSWORD = "admin-pw"
USERS = {
    # name: (password, rules)
    "ops": ("ops-pw", ["+@all"]),
    "cfg": ("cfg-pw", ["+get", "+set", "+config|set"]),
    "app": ("app-pw", ["+@all", "-@admin", "-@dangerous"]),
    "limited": ("limited-pw", ["+get", "+set", "+ping"]),
}
ADMIN = ("key_evt_amqp.keymask_add", "x")


@pytest.fixture(scope="module")
def auth_redis() -> Iterator[RedisServer]:
    with RedisServer(["--requirepass", ADMIN_PASSWORD]) as server:
        with server.client() as admin:
            for name, (password, rules) in USERS.items():
                admin.acl_setuser(name, enabled=True, passwords=[f"+{password}"], keys=["~*"],
                                  channels=["&*"], commands=rules, reset=True)
        yield server


@pytest.fixture(scope="module")
def auth_proxy(auth_redis: RedisServer) -> Iterator[ProxyProcess]:
    upstream = f"redis://default:{ADMIN_PASSWORD}@{auth_redis.host}:{auth_redis.port}/"
    with ProxyProcess(upstream, ["--amqp", unreachable_amqp_url()]) as process:
        yield process


def as_user(proxy: ProxyProcess, user: str) -> RawClient:
    raw = RawClient(proxy.port)
    assert raw.command("AUTH", user, USERS[user][0]) == b"OK"
    return raw


def test_unauthenticated_client_gets_noauth(auth_proxy: ProxyProcess) -> None:
    with RawClient(auth_proxy.port) as raw:
        reply = raw.command("GET", "k")
        assert isinstance(reply, ErrorReply) and reply.startswith(b"NOAUTH"), reply
        reply = raw.command(*ADMIN)
        assert isinstance(reply, ErrorReply) and reply.startswith(b"NOAUTH"), reply
        reply = raw.command("key_evt_amqp.config_get")
        assert isinstance(reply, ErrorReply) and reply.startswith(b"NOAUTH"), reply
        # The proxy's own upstream password never leaks into a client's session.
        assert raw.command("AUTH", "wrong").startswith(b"WRONGPASS")
        assert raw.command("GET", "k").startswith(b"NOAUTH")


def test_requirepass(auth_proxy: ProxyProcess, auth_redis: RedisServer) -> None:
    with RawClient(auth_proxy.port) as raw:
        assert raw.command("AUTH", ADMIN_PASSWORD) == b"OK"
        assert raw.command("SET", "auth:k", "v") == b"OK"
        assert raw.command("GET", "auth:k") == b"v"
        assert raw.command(*ADMIN) == b"OK"
    with auth_proxy.client(password=ADMIN_PASSWORD) as client:
        assert client.get("auth:k") == b"v"
        assert client.execute_command("key_evt_amqp.config_get")
    with auth_redis.client() as direct:
        assert direct.get("auth:k") == b"v"


def test_redis_py_without_password_fails(auth_proxy: ProxyProcess) -> None:
    with auth_proxy.client() as client:
        with pytest.raises(redis.AuthenticationError):
            client.get("k")


def test_acl_user(auth_proxy: ProxyProcess) -> None:
    with auth_proxy.client(username="limited", password=USERS["limited"][0]) as client:
        assert client.set("acl:k", "v")
        assert client.get("acl:k") == b"v"
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.lpush("acl:l", "x")
    with auth_proxy.client(username="limited", password="nope") as client:
        with pytest.raises(redis.AuthenticationError):
            client.get("acl:k")


@pytest.mark.parametrize("user", ["app", "limited"])
def test_admin_command_refused_without_config_set(auth_proxy: ProxyProcess, user: str) -> None:
    with as_user(auth_proxy, user) as raw:
        for command in (ADMIN, ("key_evt_amqp.config_get",), ("key_evt_amqp.keymask_clean",)):
            reply = raw.command(*command)
            assert isinstance(reply, ErrorReply) and reply.startswith(b"NOPERM"), (command, reply)
        # The connection stays usable.
        assert raw.command("PING") == b"PONG"


@pytest.mark.parametrize("user", ["ops", "cfg"])
def test_admin_command_allowed_with_config_set(auth_proxy: ProxyProcess, user: str) -> None:
    with as_user(auth_proxy, user) as raw:
        assert raw.command(*ADMIN) == b"OK"
        assert not isinstance(raw.command("key_evt_amqp.config_get"), ErrorReply)


def test_authority_follows_a_second_auth(auth_proxy: ProxyProcess) -> None:
    with as_user(auth_proxy, "ops") as raw:
        assert raw.command(*ADMIN) == b"OK"
        assert raw.command("AUTH", "app", USERS["app"][0]) == b"OK"
        assert raw.command(*ADMIN).startswith(b"NOPERM")
        assert raw.command("AUTH", "cfg", USERS["cfg"][0]) == b"OK"
        assert raw.command(*ADMIN) == b"OK"
        # A failed AUTH leaves the connection as the previous user (Redis's rule).
        assert raw.command("AUTH", "ops", "wrong").startswith(b"WRONGPASS")
        assert raw.command(*ADMIN) == b"OK"


def test_hello_with_auth(auth_proxy: ProxyProcess) -> None:
    with RawClient(auth_proxy.port) as raw:
        hello = raw.command("HELLO", "3", "AUTH", "limited", USERS["limited"][0])
        assert isinstance(hello, dict) and hello[b"proto"] == 3, hello
        assert raw.command(*ADMIN).startswith(b"NOPERM")
    with RawClient(auth_proxy.port) as raw:
        hello = raw.command("HELLO", "2", "AUTH", "ops", USERS["ops"][0])
        assert isinstance(hello, list), hello
        assert raw.command(*ADMIN) == b"OK"


def test_authority_follows_acl_changes(auth_proxy: ProxyProcess, auth_redis: RedisServer) -> None:
    """Redis checks permissions on every command; a permission revoked after AUTH must count."""
    with auth_redis.client() as admin:
        admin.acl_setuser("shifting", enabled=True, passwords=["+shift-pw"], keys=["~*"],
                          commands=["+@all"], reset=True)
        with RawClient(auth_proxy.port) as raw:
            assert raw.command("AUTH", "shifting", "shift-pw") == b"OK"
            assert raw.command(*ADMIN) == b"OK"
            admin.acl_setuser("shifting", commands=["-config|set"])
            assert raw.command(*ADMIN).startswith(b"NOPERM")
            admin.acl_setuser("shifting", commands=["+config|set"])
            assert raw.command(*ADMIN) == b"OK"
