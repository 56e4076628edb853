"""The proxy's own ``key_evt_amqp.*`` commands, seen from clients: in pipelines, in transactions, in
subscribed mode, and never reaching Redis.

Documented behaviour tested here (``proxy/admin.py``): inside ``MULTI`` an admin command is refused
with an ``-ERR`` reply at its place, and ``EXEC`` then fails with ``-EXECABORT``, exactly as Redis
treats any command it refuses while queueing.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis

from harness import (TEST_AMQP_PASSWORD, ErrorReply, ProxyProcess, RawClient, RedisServer, TcpTap,
                     encode_command, free_port, unreachable_amqp_url, wait_for)

ADMIN_SLOTS = 100  # one admin command every this many commands in the long pipeline


def flatten(reply: Any) -> bytes:
    """Every string in a reply (nested arrays and maps included), joined: to search for a value."""
    if isinstance(reply, bytes):
        return reply
    if isinstance(reply, str):
        return reply.encode()
    if isinstance(reply, dict):
        return b"\n".join(flatten(k) + b"\n" + flatten(v) for k, v in reply.items())
    if isinstance(reply, list | tuple):
        return b"\n".join(flatten(item) for item in reply)
    return str(reply).encode()


def test_config_get_masks_the_amqp_password(proxy_client: redis.Redis) -> None:
    reply = proxy_client.execute_command("key_evt_amqp.config_get")
    text = flatten(reply)
    assert b"***" in text, reply
    assert TEST_AMQP_PASSWORD.encode() not in text, reply


def test_config_get_in_resp2_and_resp3(proxy: ProxyProcess) -> None:
    """Our replies follow the connection's protocol: a flat array in RESP2, a map after HELLO 3."""
    with RawClient(proxy.port) as raw:
        resp2 = raw.command("key_evt_amqp.config_get")
        assert isinstance(resp2, list) and len(resp2) % 2 == 0, resp2
        as_dict = dict(zip(resp2[::2], resp2[1::2], strict=True))
        assert raw.command("HELLO", "3")[b"proto"] == 3
        resp3 = raw.command("key_evt_amqp.config_get")
        assert isinstance(resp3, dict), resp3
        assert set(resp3) == set(as_dict)
        assert b"***" in resp3.values()
        assert raw.command("key_evt_amqp.keymask_add", "x") == b"OK"
        error = raw.command("key_evt_amqp.keymask_add")
        assert isinstance(error, ErrorReply), error


def test_config_get_shows_the_live_configuration(proxy: ProxyProcess, proxy_client: redis.Redis) -> None:
    mask = f"mask-{uuid.uuid4().hex}"
    assert proxy_client.execute_command("key_evt_amqp.keymask_add", mask) == b"OK"
    assert mask.encode() in flatten(proxy_client.execute_command("key_evt_amqp.config_get"))
    # A second connection sees the same live configuration.
    with proxy.client() as other:
        assert mask.encode() in flatten(other.execute_command("KEY_EVT_AMQP.CONFIG_GET"))


def test_admin_commands_are_case_insensitive(proxy_client: redis.Redis) -> None:
    assert proxy_client.execute_command("KEY_EVT_AMQP.KEYMASK_ADD", "x") == b"OK"
    assert proxy_client.execute_command("Key_Evt_Amqp.Keymask_Add", "x") == b"OK"


def test_admin_commands_never_reach_redis(redis_server: RedisServer) -> None:
    with TcpTap(redis_server.port) as tap, \
            ProxyProcess(tap.url, ["--amqp", unreachable_amqp_url()]) as tapped:
        with tapped.client() as client:
            for _ in range(20):
                assert client.execute_command("key_evt_amqp.keymask_add", "x") == b"OK"
                assert client.execute_command("KEY_EVT_AMQP.CONFIG_GET")
            pipe = client.pipeline(transaction=True)
            pipe.set("never:k", "1").execute_command("key_evt_amqp.config_get").get("never:k")
            with pytest.raises(redis.ResponseError):  # refused inside MULTI (see the test below)
                pipe.execute()
            assert client.set("never:last", "1")
        sent = tap.sent_bytes()
        assert b"never:last" in sent
        for verb in (b"key_evt_amqp.keymask_add", b"key_evt_amqp.config_get"):
            assert verb not in sent.lower(), sent[-2000:]


def test_pipeline_of_10000_commands_with_admin_commands_interleaved(
        proxy_client: redis.Redis, fresh_redis: redis.Redis) -> None:
    expected: list[Any] = []
    pipe = proxy_client.pipeline(transaction=False)
    counter = 0
    for i in range(10_000):
        if i % ADMIN_SLOTS == 50:
            pipe.execute_command("key_evt_amqp.config_get")
            expected.append("config")
        elif i % ADMIN_SLOTS == 99:
            pipe.execute_command("key_evt_amqp.keymask_add", "x")
            expected.append(b"OK")
        elif i % 3 == 0:
            pipe.set(f"p:{i}", i)
            expected.append(True)
        elif i % 3 == 1:
            pipe.get(f"p:{i - 1}")
            expected.append(str(i - 1).encode() if (i - 1) % ADMIN_SLOTS not in (50, 99) else None)
        else:
            counter += 1
            pipe.incr("p:counter")
            expected.append(counter)
    replies = pipe.execute()
    assert len(replies) == len(expected) == 10_000
    for position, (got, want) in enumerate(zip(replies, expected, strict=True)):
        if want == "config":
            text = flatten(got)
            assert b"***" in text and TEST_AMQP_PASSWORD.encode() not in text, (position, got)
        else:
            assert got == want, f"reply {position}: {got!r} != {want!r}"
    assert fresh_redis.get("p:counter") == str(counter).encode()


def test_raw_pipeline_in_one_send_gets_three_replies_in_order(proxy: ProxyProcess) -> None:
    key = f"raw:{uuid.uuid4().hex}"
    with RawClient(proxy.port) as raw:
        raw.send(encode_command("SET", key, "1") + encode_command("key_evt_amqp.keymask_add", "x")
                 + encode_command("GET", key))
        assert raw.read_replies(3) == [b"OK", b"OK", b"1"]
        # Nothing more arrives: exactly three replies.
        raw.send(encode_command("PING"))
        assert raw.read_reply() == b"PONG"


def test_raw_admin_replies_between_many_forwarded_replies(proxy: ProxyProcess) -> None:
    """The admin reply must wait for the forwarded replies queued before it, however many."""
    key = f"raw:{uuid.uuid4().hex}"
    batch = (encode_command("INCR", key) * 300 + encode_command("key_evt_amqp.keymask_add", "x")
             + encode_command("INCR", key) * 300 + encode_command("key_evt_amqp.config_get")
             + encode_command("GET", key))
    with RawClient(proxy.port) as raw:
        raw.send(batch)
        replies = raw.read_replies(603)
    assert replies[:300] == list(range(1, 301))
    assert replies[300] == b"OK"
    assert replies[301:601] == list(range(301, 601))
    assert b"***" in flatten(replies[601])
    assert replies[602] == b"600"


def test_admin_command_inside_multi_is_refused_and_exec_aborts(
        proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    with RawClient(proxy.port) as raw:
        raw.send(encode_command("MULTI") + encode_command("SET", "tx:k", "1")
                 + encode_command("key_evt_amqp.keymask_add", "x") + encode_command("INCR", "tx:k")
                 + encode_command("EXEC"))
        replies = raw.read_replies(5)
        assert replies[:2] == [b"OK", b"QUEUED"]
        assert isinstance(replies[2], ErrorReply) and replies[2].startswith(b"ERR"), replies
        assert replies[3] == b"QUEUED"
        assert isinstance(replies[4], ErrorReply) and replies[4].startswith(b"EXECABORT"), replies
        # The connection is out of MULTI and usable; admin commands work again.
        assert raw.command("GET", "tx:k") is None
        assert raw.command("key_evt_amqp.keymask_add", "x") == b"OK"
        assert raw.command("MULTI") == b"OK"
        assert raw.command("INCR", "tx:k") == b"QUEUED"
        assert raw.command("EXEC") == [1]
    assert fresh_redis.get("tx:k") == b"1"


def test_admin_command_inside_multi_after_discard_and_watch(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as raw:
        assert raw.command("MULTI") == b"OK"
        assert raw.command("DISCARD") == b"OK"
        assert raw.command("key_evt_amqp.keymask_add", "x") == b"OK"  # no longer in MULTI
        assert raw.command("WATCH", "tx:w") == b"OK"
        assert raw.command("key_evt_amqp.keymask_add", "x") == b"OK"  # WATCH alone is not MULTI
        assert raw.command("MULTI") == b"OK"
        assert raw.command("SET", "tx:w", "1") == b"QUEUED"
        assert raw.command("EXEC") == [b"OK"]


def test_admin_command_inside_multi_with_redis_py(proxy_client: redis.Redis, fresh_redis: redis.Redis) -> None:
    pipe = proxy_client.pipeline(transaction=True)
    pipe.set("tx2:k", "a")
    pipe.execute_command("key_evt_amqp.config_get")
    pipe.get("tx2:k")
    with pytest.raises(redis.ResponseError, match="not allowed inside MULTI"):
        pipe.execute()
    assert fresh_redis.exists("tx2:k") == 0
    assert proxy_client.ping()


def test_admin_command_in_subscribed_mode_gets_an_error_and_the_subscription_lives(
        proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    channel = f"ch:{uuid.uuid4().hex}"
    with RawClient(proxy.port) as raw:
        assert raw.command("SUBSCRIBE", channel) == [b"subscribe", channel.encode(), 1]
        reply = raw.command("key_evt_amqp.config_get")
        assert isinstance(reply, ErrorReply), reply
        assert fresh_redis.publish(channel, b"after") == 1
        assert raw.read_reply() == [b"message", channel.encode(), b"after"]


def test_unknown_admin_command(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as raw:
        raw.send(encode_command("key_evt_amqp.nosuch"))
        raw.sock.settimeout(10)
        assert raw.sock.recv(1000) == b"-ERR unknown command 'key_evt_amqp.nosuch', with args beginning with: \r\n"
        assert raw.command("PING") == b"PONG"


def test_admin_arity_errors_use_the_module_texts(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as raw:
        for name in ("keymask_add", "keymask_set", "config_set", "fallback_storage_size_set"):
            reply = raw.command(f"key_evt_amqp.{name}")
            assert reply == ErrorReply(f"ERR wrong number of arguments for 'key_evt_amqp.{name}' command".encode())
        reply = raw.command("key_evt_amqp.keymask_clean", "extra")
        assert reply == ErrorReply(b"ERR wrong number of arguments for 'key_evt_amqp.keymask_clean' command")
        assert raw.command("PING") == b"PONG"


def test_configuration_commands_reply_ok(proxy: ProxyProcess) -> None:
    """Where the module sent no reply at all, we reply +OK (module-behaviour.md, section 10)."""
    first, second, third = (f"m{n}-{uuid.uuid4().hex}".encode() for n in range(3))
    with RawClient(proxy.port) as raw:
        assert raw.command("key_evt_amqp.keymask_set", first, second) == b"OK"
        assert raw.command("key_evt_amqp.keymask_add", third) == b"OK"
        masks = flatten(raw.command("key_evt_amqp.config_get"))
        assert first in masks and second in masks and third in masks
        assert raw.command("key_evt_amqp.keymask_clean") == b"OK"
        assert first not in flatten(raw.command("key_evt_amqp.config_get"))
        assert raw.command("key_evt_amqp.fallback_storage_size_set", "4321") == b"OK"
        assert b"4321" in flatten(raw.command("key_evt_amqp.config_get"))


def test_connect_and_disconnect_reply_clearly(proxy: ProxyProcess) -> None:
    """Before the publisher lands these are errors; after, the module's ``AMQP ...`` replies.

    The fixture's broker address has nothing listening, so a real connect must fail, not succeed.
    """
    with RawClient(proxy.port) as raw:
        connect = raw.command("key_evt_amqp.connect")
        assert isinstance(connect, ErrorReply), connect
        assert connect.startswith((b"AMQP", b"ERR")), connect
        disconnect = raw.command("key_evt_amqp.disconnect")
        assert disconnect.startswith((b"AMQP", b"ERR")), disconnect
        assert raw.command("PING") == b"PONG"


def test_admin_reply_waits_for_a_blocked_command_before_it(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    queue = f"q:{uuid.uuid4().hex}"
    with RawClient(proxy.port) as raw:
        raw.send(encode_command("BLPOP", queue, "10") + encode_command("key_evt_amqp.keymask_add", "x")
                 + encode_command("PING"))
        wait_for(lambda: fresh_redis.info("clients")["blocked_clients"] >= 1, message="for BLPOP to block")
        fresh_redis.rpush(queue, "item")
        assert raw.read_replies(3) == [[queue.encode(), b"item"], b"OK", b"PONG"]


def test_admin_reply_follows_hello_in_the_same_send(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as raw:
        raw.send(encode_command("HELLO", "3") + encode_command("key_evt_amqp.config_get"))
        hello, config = raw.read_replies(2)
        assert hello[b"proto"] == 3
        assert isinstance(config, dict), config


def test_failed_hello_keeps_resp2(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as raw:
        raw.send(encode_command("HELLO", "4") + encode_command("key_evt_amqp.config_get"))
        hello, config = raw.read_replies(2)
        assert isinstance(hello, ErrorReply) and hello.startswith(b"NOPROTO"), hello
        assert isinstance(config, list), config
        raw.send(encode_command("HELLO", "3", "AUTH", "nosuchuser", "wrong-password")
                 + encode_command("key_evt_amqp.config_get"))
        hello, config = raw.read_replies(2)
        assert isinstance(hello, ErrorReply), hello
        assert isinstance(config, list), config


def test_reset_goes_back_to_resp2(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as raw:
        assert raw.command("HELLO", "3")[b"proto"] == 3
        assert raw.command("RESET") == b"RESET"
        assert isinstance(raw.command("key_evt_amqp.config_get"), list)


def test_admin_command_right_after_subscribe_in_one_send(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    channel = f"ch:{uuid.uuid4().hex}"
    with RawClient(proxy.port) as raw:
        raw.send(encode_command("SUBSCRIBE", channel) + encode_command("key_evt_amqp.keymask_add", "x"))
        assert raw.read_reply() == [b"subscribe", channel.encode(), 1]
        assert isinstance(raw.read_reply(), ErrorReply)
        assert fresh_redis.publish(channel, b"m") == 1
        assert raw.read_reply() == [b"message", channel.encode(), b"m"]


def test_admin_only_pipeline(proxy: ProxyProcess) -> None:
    count = 500
    with RawClient(proxy.port, timeout=60) as raw:
        raw.send(encode_command("key_evt_amqp.keymask_add", "x") * count + encode_command("PING"))
        assert raw.read_replies(count + 1) == [b"OK"] * count + [b"PONG"]


def test_inline_admin_argument_with_quotes(proxy: ProxyProcess) -> None:
    mask = f"a b {uuid.uuid4().hex}"
    with RawClient(proxy.port) as raw:
        raw.send(f'key_evt_amqp.keymask_add "{mask}"\r\n'.encode())
        assert raw.read_reply() == b"OK"
        assert mask.encode() in flatten(raw.command("key_evt_amqp.config_get"))


def config_of(raw: RawClient) -> dict[bytes, Any]:
    reply = raw.command("key_evt_amqp.config_get")
    assert isinstance(reply, list), reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def info_of(raw: RawClient) -> dict[bytes, bytes]:
    text = raw.command("key_evt_amqp.info")
    assert isinstance(text, bytes) and not isinstance(text, ErrorReply), text
    return dict(line.split(b":", 1) for line in text.split(b"\r\n") if line and not line.startswith(b"#"))


NOT_AN_INTEGER = ErrorReply(b"ERR value is not an integer or out of range")
#: Refused by Redis's string2ll, which every integer argument and setting follows.
BAD_INTEGERS = ("999999999999999999999999999999", "9223372036854775808", "-9223372036854775809",
                " 5", "5 ", "1_000", "+5", "05", "-0", "00", "", "-", "0x10", "1e3", "5.0",
                "\u0663", "\uff15")


def test_fallback_size_set_takes_integers_as_redis_does(proxy: ProxyProcess) -> None:
    """Issue #8: the command once took `999999999999999999999999999999`, ` 5` and `1_000`."""
    with RawClient(proxy.port) as raw:
        assert raw.command("key_evt_amqp.fallback_storage_size_set", "4321") == b"OK"
        for text in BAD_INTEGERS:
            reply = raw.command("key_evt_amqp.fallback_storage_size_set", text.encode())
            assert reply == NOT_AN_INTEGER, (text, reply)
            assert config_of(raw)[b"fallback_size"] == b"4321", text
        for text in ("0", "-1", "9223372036854775807", "-9223372036854775808"):
            assert raw.command("key_evt_amqp.fallback_storage_size_set", text) == b"OK", text
            assert config_of(raw)[b"fallback_size"] == text.encode()


@pytest.mark.parametrize("position", [1, 4, 7, 8], ids=["port", "heartbeat", "delivery_mode", "fallback_size"])
def test_config_set_takes_integers_as_redis_does(proxy: ProxyProcess, position: int) -> None:
    """The same rule as fallback_storage_size_set, then the setting's own range."""
    # Nothing listens at the address: a value wrongly accepted must not reach a real broker.
    args = ["127.0.0.1", str(free_port()), "u", "p", "30", "amq.direct", "rk", "1", "1000"]
    with RawClient(proxy.port) as raw:
        assert raw.command("key_evt_amqp.config_set", *args) == b"OK"
        before = config_of(raw)
        for text in (*BAD_INTEGERS, "01"):
            given = list(args)
            given[position] = text
            for name in ("key_evt_amqp.config_set", "key_evt_amqp.connect"):
                reply = raw.command(name, *given)
                assert isinstance(reply, ErrorReply) and reply.startswith(b"ERR invalid "), (name, text, reply)
                assert config_of(raw) == before, (name, text)
LONGER_NAMES = ("key_evt_amqp.config_getxx", "key_evt_amqp.infox", "key_evt_amqp.INFOx",
                "KEY_EVT_AMQP.INFO_", "key_evt_amqp.info ", "key_evt_amqp.info\x00",
                "key_evt_amqp.config_set2", "key_evt_amqp.", "key_evt_amqp.connectconnect")


@pytest.mark.parametrize("name", LONGER_NAMES)
def test_names_longer_than_ours_are_unknown_commands(proxy: ProxyProcess, name: str) -> None:
    """A name that merely starts like one of ours runs nothing: Redis's unknown-command text,
    whether the command comes as a multibulk or inline."""
    with RawClient(proxy.port) as raw:
        assert raw.command("key_evt_amqp.fallback_storage_size_set", "777") == b"OK"
        reply = raw.command(name, "1", "2")
        shown = name.split("\x00")[0]  # Redis prints C strings: the name ends at a NUL
        assert reply == ErrorReply(f"ERR unknown command '{shown}', with args beginning with: '1' '2' ".encode())
        if name.strip() == name and "\x00" not in name:
            raw.send(f"{name} 3\r\n".encode())
            inline = raw.read_reply()
            assert inline == ErrorReply(f"ERR unknown command '{name}', with args beginning with: '3' ".encode())
        assert config_of(raw)[b"fallback_size"] == b"777"
        assert raw.command("PING") == b"PONG"


def test_our_names_in_any_case_multibulk_and_inline(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as raw:
        for name in ("KEY_EVT_AMQP.INFO", "key_evt_amqp.INFO", "Key_Evt_Amqp.Info"):
            assert raw.command(name).startswith(b"# key_evt_amqp\r\n"), name
            raw.send(f"{name}\r\n".encode())
            assert raw.read_reply().startswith(b"# key_evt_amqp\r\n"), name


def test_unknown_admin_command_quotes_args_as_redis_does(proxy: ProxyProcess, redis_server: RedisServer) -> None:
    """Redis shows the arguments up to about 128 bytes in all, each as a C string (up to a NUL)."""
    cases = [
        [b"a" * 50] * 6,
        [b"x" * 200, b"y"],
        [b"a\x00b", b"c"],
        [b"a\r\nb"],
        [b""],
    ]
    with RawClient(proxy.port) as via_proxy, RawClient(redis_server.port) as direct:
        for args in cases:
            expected = direct.command(b"key_evt_amqp_nosuch", *args)
            assert isinstance(expected, ErrorReply), expected
            expected = ErrorReply(expected.replace(b"key_evt_amqp_nosuch", b"key_evt_amqp.nosuch"))
            assert via_proxy.command(b"key_evt_amqp.nosuch", *args) == expected, args


def test_events_set_empty_selects_no_class(proxy: ProxyProcess, fresh_redis: redis.Redis) -> None:
    """`events_set ""` means what an empty FLAGS means on the module's load line: no class, so
    nothing is forwarded (as after keymask_clean); config_get shows it and events_set puts it back."""
    key = f"k:{uuid.uuid4().hex}"
    with RawClient(proxy.port) as raw:
        assert raw.command("key_evt_amqp.keymask_set", "ALL") == b"OK"
        assert raw.command("key_evt_amqp.events_set", "") == b"OK"
        assert config_of(raw)[b"events"] == b""
        fresh_redis.config_set("notify-keyspace-events", "KEA")
        try:
            before = info_of(raw)
            fresh_redis.set(key, "v")
            wait_for(lambda: int(info_of(raw)[b"events_seen"]) > int(before[b"events_seen"]),
                     message="for the SET event")
            after = info_of(raw)
            assert after[b"events_accepted"] == before[b"events_accepted"], after
            assert int(after[b"events_filtered"]) > int(before[b"events_filtered"]), after
        finally:
            assert raw.command("key_evt_amqp.events_set", "xe") == b"OK"
            assert raw.command("key_evt_amqp.keymask_clean") == b"OK"
            fresh_redis.config_set("notify-keyspace-events", "xeE")


def test_info_last_error_says_when_and_whether_it_still_holds() -> None:
    """Issue #8: `last_error` stayed after recovery with nothing to tell it was over. It stays,
    with the time it last happened (Unix ms) and `last_error_current` (1 until that part works
    again). Here the part is the keyspace subscription, refused by an ACL and then allowed again."""
    with RedisServer() as server, \
            ProxyProcess(server.url, ("--amqp", unreachable_amqp_url(), "--amqp-connect", "lazy")) as proxy, \
            server.client() as admin, RawClient(proxy.port) as raw:
        # No broker: the gap marker of the outage must not bring a broker error of its own.
        assert raw.command("key_evt_amqp.disconnect") == ErrorReply(b"AMQP DISCONNECT ERROR: 1")
        wait_for(lambda: info_of(raw)[b"source_state"] == b"subscribed", message="for the subscription")
        info = info_of(raw)
        assert (info[b"last_error"], info[b"last_error_time_ms"], info[b"last_error_current"]) == (b"", b"0", b"0")
        refused_at = time.time() * 1000
        admin.execute_command("ACL", "SETUSER", "default", "resetchannels")
        admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        wait_for(lambda: info_of(raw)[b"last_error_current"] == b"1", message="for the error")
        info = info_of(raw)
        assert b"subscription" in info[b"last_error"], info
        when = int(info[b"last_error_time_ms"])
        assert refused_at - 1000 <= when <= time.time() * 1000 + 1000, (refused_at, when)
        admin.execute_command("ACL", "SETUSER", "default", "allchannels")
        wait_for(lambda: info_of(raw)[b"last_error_current"] == b"0", timeout=30, message="for the recovery")
        info = info_of(raw)
        assert info[b"source_state"] == b"subscribed", info
        assert b"subscription" in info[b"last_error"] and int(info[b"last_error_time_ms"]) >= when, info


def test_config_get_gives_each_mask_as_it_is(proxy: ProxyProcess) -> None:
    """Masks joined by spaces were ambiguous (`a b` + `c` read like `a` + `b c`) and non-UTF-8
    bytes came back escaped: each mask is now its own bulk string, byte for byte."""
    masks = [b"a b", b"c", b"\xff\x00\r\n", b"\\xff"]
    with RawClient(proxy.port) as raw:
        assert raw.command("key_evt_amqp.keymask_set", *masks) == b"OK"
        try:
            assert config_of(raw)[b"keymasks"] == masks
            assert raw.command("HELLO", "3")[b"proto"] == 3
            assert raw.command("key_evt_amqp.config_get")[b"keymasks"] == masks
        finally:
            assert raw.command("key_evt_amqp.keymask_clean") == b"OK"
        assert raw.command("key_evt_amqp.config_get")[b"keymasks"] == []
