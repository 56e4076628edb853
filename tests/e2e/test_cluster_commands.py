"""redis-py's plain (non-cluster) client through the proxy, in front of a real 6-node cluster."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from cluster import SUMMARY, RedisCluster
from harness import HOST, ErrorReply, ProxyProcess, RawClient, RedisServer, unreachable_amqp_url, wait_for
from protocol.commands import READ_ONLY
from protocol.slots import key_slot


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as started:
        yield started


@pytest.fixture(scope="module")
def cproxy(cluster: RedisCluster) -> Iterator[ProxyProcess]:
    with ProxyProcess(cluster.seed_url, ["--amqp", unreachable_amqp_url()]) as process:
        yield process
        if not process.is_running():
            pytest.fail(f"the proxy died:\n{process.log_text()[-4000:]}")


@pytest.fixture
def client(cproxy: ProxyProcess, cluster: RedisCluster) -> Iterator[redis.Redis]:
    cluster.flushall()
    with cproxy.client() as c:
        yield c


def test_reads_and_writes_over_all_slots(client: redis.Redis, cluster: RedisCluster) -> None:
    keys = [f"key:{i}" for i in range(2000)]
    assert {key_slot(k.encode()) * 3 // 16384 for k in keys} == {0, 1, 2}
    pipe = client.pipeline(transaction=False)
    for i, key in enumerate(keys):
        pipe.set(key, i)
    assert all(pipe.execute())
    for i, key in enumerate(keys[:300]):
        assert client.get(key) == str(i).encode()
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.incr(key)
    assert pipe.execute() == [i + 1 for i in range(2000)]
    # the proxy's DBSIZE is the sum over the masters (the fleet's own keys included)
    wait_for(lambda: client.dbsize() == cluster.total_keys())
    assert cluster.total_keys(user_only=True) == 2000
    for master in cluster.masters():
        with master.client() as direct:
            assert direct.dbsize() > 500  # every master took its share


def test_info_says_not_a_cluster(client: redis.Redis) -> None:
    info = client.info()
    assert info["cluster_enabled"] == 0
    assert info["proxy_mode"] == "cluster" and info["cluster_masters"] == 3
    assert client.info("server")["redis_version"]


def test_hash_tags_and_multikey_in_one_slot(client: redis.Redis) -> None:
    assert client.mset({"{user:1}:a": "1", "{user:1}:b": "2"})
    assert client.rename("{user:1}:a", "{user:1}:c")
    assert client.sadd("{t}s1", "x", "y") == 2 and client.sadd("{t}s2", "y", "z") == 2
    assert client.sinter("{t}s1", "{t}s2") == {b"y"}
    assert client.eval("return redis.call('GET', KEYS[1])", 1, "{user:1}:c") == b"1"


def test_mget_mset_del_exists_across_slots(client: redis.Redis, cluster: RedisCluster) -> None:
    mapping = {f"m{i}": str(i) for i in range(50)}
    assert len({key_slot(k.encode()) for k in mapping}) > 40
    assert client.mset(mapping)
    names = list(mapping) + ["missing"]
    assert client.mget(names) == [str(i).encode() for i in range(50)] + [None]
    assert client.exists(*names, "m0") == 51
    assert client.touch(*names) == 50
    assert client.delete(*names[:25]) == 25
    assert client.unlink(*names) == 25
    assert cluster.total_keys(user_only=True) == 0


def test_crossslot_where_due(client: redis.Redis) -> None:
    a, b = "a", "b"
    assert key_slot(a.encode()) != key_slot(b.encode())
    # redis-py turns `-CROSSSLOT ...` into ClusterCrossSlotError.
    with pytest.raises(redis.exceptions.ClusterCrossSlotError):
        client.rename(a, b)
    with pytest.raises(redis.exceptions.ClusterCrossSlotError):
        client.sunion(a, b)
    with pytest.raises(redis.exceptions.ClusterCrossSlotError):
        client.execute_command("EVAL", "return 1", 2, a, b)
    assert client.ping()  # the connection stays


def test_multi_on_one_slot(client: redis.Redis) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.set("{acct}x", 5).incrby("{acct}x", 3).get("{acct}x").ping()
    assert pipe.execute() == [True, 8, b"8", True]
    with pytest.raises(redis.ResponseError):  # CROSSSLOT for the command, EXECABORT for EXEC
        pipe = client.pipeline(transaction=True)
        pipe.set("{acct}x", 1).set("{other}y", 2)
        pipe.execute(raise_on_error=False)
    assert client.get("{acct}x") == b"8"  # nothing of the aborted transaction ran


def test_watch_multi_exec(client: redis.Redis) -> None:
    client.set("{w}n", 1)
    with client.pipeline(transaction=True) as pipe:
        pipe.watch("{w}n")
        value = int(pipe.get("{w}n"))
        pipe.multi()
        pipe.set("{w}n", value + 1)
        assert pipe.execute() == [True]
    with client.pipeline(transaction=True) as pipe:
        pipe.watch("{w}n")
        client.set("{w}n", 100)  # another connection changes it
        pipe.multi()
        pipe.set("{w}n", 0)
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert client.get("{w}n") == b"100"


def test_raw_transaction_replies(cproxy: ProxyProcess) -> None:
    with RawClient(cproxy.port) as raw:
        assert raw.command("MULTI") == b"OK"
        assert raw.command("PING") == b"QUEUED"
        assert raw.command("SET", "{q}a", "1") == b"QUEUED"
        assert raw.command("GET", "{q}a") == b"QUEUED"
        assert raw.command("EXEC") == [b"PONG", b"OK", b"1"]
        assert raw.command("MULTI") == b"OK"
        assert raw.command("SET", "{q}a", "2") == b"QUEUED"
        assert isinstance(raw.command("SET", "{z}b", "2"), ErrorReply)
        reply = raw.command("EXEC")
        assert isinstance(reply, ErrorReply) and reply.startswith(b"EXECABORT")
        assert raw.command("GET", "{q}a") == b"1"


def test_blpop_woken_by_another_client(client: redis.Redis, cproxy: ProxyProcess) -> None:
    result: list[object] = []
    waiter = threading.Thread(target=lambda: result.append(client.blpop(["queue:x"], timeout=10)))
    waiter.start()
    time.sleep(0.3)
    with cproxy.client() as other:
        other.rpush("queue:x", "job")
    waiter.join(timeout=10)
    assert result == [(b"queue:x", b"job")]
    assert client.set("after", "1") and client.get("after") == b"1"


def test_pubsub(cproxy: ProxyProcess, cluster: RedisCluster) -> None:
    with cproxy.client() as sub_client, cproxy.client() as pub:
        pubsub = sub_client.pubsub()
        pubsub.subscribe("news")
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        # A publisher on any node reaches us: Redis Cluster propagates PUBLISH.
        for server in cluster.masters():
            with server.client() as direct:
                direct.publish("news", f"from {server.port}")
        assert pub.publish("news", "via proxy") >= 0
        seen = [pubsub.get_message(timeout=5) for _ in range(4)]
        assert [m["data"] for m in seen if m] == [
            *(f"from {s.port}".encode() for s in cluster.masters()), b"via proxy"]
        pubsub.close()


def test_dbsize_keys_scan_flush_over_all_masters(client: redis.Redis, cluster: RedisCluster) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(300):
        pipe.set(f"s:{i}", i)
    pipe.set("other", 1)
    pipe.execute()
    wait_for(lambda: client.dbsize() == cluster.total_keys())
    assert cluster.total_keys(user_only=True) == 301
    assert sorted(client.keys("s:*")) == sorted(f"s:{i}".encode() for i in range(300))
    scanned = list(client.scan_iter(match="s:*", count=37))
    assert sorted(scanned) == sorted(f"s:{i}".encode() for i in range(300))
    assert client.flushall()
    assert cluster.total_keys(user_only=True) == 0


def test_unsupported_keeps_the_connection(cproxy: ProxyProcess) -> None:
    with RawClient(cproxy.port) as raw:
        reply = raw.command("CLUSTER", "NODES")
        assert reply == b"ERR CLUSTER not supported by key-evt-amqp in cluster mode"
        assert raw.command("MONITOR").endswith(b"not supported by key-evt-amqp in cluster mode")
        assert raw.command("PING") == b"PONG"
        assert raw.command("NOSUCHCMD", "x").startswith(b"ERR unknown command")
        assert raw.command("ECHO", "hi") == b"hi"


def test_own_commands_and_auth_replay(cproxy: ProxyProcess) -> None:
    with RawClient(cproxy.port) as raw:
        assert raw.command("CLIENT", "SETNAME", "me") == b"OK"
        assert raw.command("HELLO", "3")[b"proto"] == 3
        assert isinstance(raw.command("key_evt_amqp.config_get"), dict)  # RESP3 map
        assert raw.command("key_evt_amqp.keymask_add", "x") == b"OK"
        # Every node this client reaches knows its name (replayed on each new link).
        for i in range(20):
            assert raw.command("SET", f"n{i}", "v") == b"OK"
            assert raw.command("CLIENT", "GETNAME") == b"me"
        bad = raw.command("key_evt_amqp.nope")
        assert isinstance(bad, ErrorReply) and bad.startswith(b"ERR unknown command")


def test_migration_while_writing(client: redis.Redis, cproxy: ProxyProcess, cluster: RedisCluster) -> None:
    tag = "mig"
    slot = key_slot(tag.encode())
    source = cluster.owner_of(slot)
    target = next(s for s in cluster.masters() if s.port != source.port)
    errors: list[BaseException] = []
    written: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        with cproxy.client() as c:
            i = 0
            while not stop.is_set():
                try:
                    c.set(f"{{{tag}}}:{i}", i)
                    assert c.get(f"{{{tag}}}:{i}") == str(i).encode()
                    assert c.mget(f"{{{tag}}}:{i}", f"{{{tag}}}:0")[0] == str(i).encode()
                    written.append(i)
                except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                    errors.append(exc)
                    return
                i += 1

    threads = [threading.Thread(target=writer) for _ in range(1)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(written) > 200)
    with source.client() as src, target.client() as dst:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", cluster.node_id(source))
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", cluster.node_id(target))
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 50):
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
            time.sleep(0.02)  # let the writers hit the ASK window
        for node in cluster.masters():
            with node.client() as each:
                each.execute_command("CLUSTER", "SETSLOT", slot, "NODE", cluster.node_id(target))
    mark = len(written)
    wait_for(lambda: len(written) > mark + 200)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    assert client.get(f"{{{tag}}}:{written[-1]}") is not None
    with target.client() as dst:
        assert dst.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) >= len(written) - 1


def test_redis_benchmark_through_the_proxy(cproxy: ProxyProcess, cluster: RedisCluster) -> None:
    benchmark = shutil.which("redis-benchmark")
    assert benchmark is not None, "redis-benchmark not on PATH"
    result = subprocess.run(
        [benchmark, "-h", cproxy.host, "-p", str(cproxy.port), "-t", "set,get", "-q", "-n", "20000"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    out = result.stdout + result.stderr
    print(out)
    assert result.returncode == 0, out
    assert "SET:" in out and "GET:" in out and "rror" not in out


def test_read_only_table_is_the_servers(cluster: RedisCluster) -> None:
    """protocol.commands.READ_ONLY (what the relay may resend after a lost connection) is exactly
    what the server flags ``readonly`` (whole command, or every subcommand but HELP), plus three
    commands with no effect at all."""
    with cluster.servers[0].client() as direct:
        table = direct.execute_command("COMMAND")
    flagged = {name for name, info in table.items() if "readonly" in info["flags"]}
    flagged |= {name for name, info in table.items() if info["subcommands"] and all(
        b"readonly" in sub[2] or sub[0].endswith(b"|help") for sub in info["subcommands"])}
    assert {n.decode() for n in READ_ONLY} == flagged | {"ping", "echo", "time"}


def _proxy_link_on(node: RedisServer, name: str) -> dict[str, str] | None:
    """The proxy's connection to ``node`` for the client named ``name`` (names are replayed on
    every node link), from ``CLIENT LIST`` on the node."""
    with node.client() as direct:
        return next((e for e in direct.client_list() if e["name"] == name), None)


def test_node_connection_killed_reads_resent_write_failed(cproxy: ProxyProcess, cluster: RedisCluster) -> None:
    """A node connection killed with a SET and GETs in flight on it: the GETs are resent and
    answer right; the SET, which Redis received, gets the lost-connection error and is not resent."""
    keys = [f"kill:{i}" for i in range(300)]
    write_key = "kill:write"
    victim = cluster.owner_of(key_slot(write_key.encode()))
    on_victim = [k for k in keys if cluster.owner_of(key_slot(k.encode())).port == victim.port]
    assert 50 < len(on_victim) < 250
    with cproxy.client() as c, victim.client() as direct:
        c.client_setname("kill-me")
        c.mset({k: k for k in keys})  # opens (and names) a link to every master
        direct.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")  # the SET waits in Redis
        results: list[object] = []
        try:
            pipe = c.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
            pipe.set(write_key, "1")
            for key in keys:
                pipe.get(key)  # those on the victim wait behind the SET
            runner = threading.Thread(target=lambda: results.extend(pipe.execute(raise_on_error=False)))
            runner.start()
            link = wait_for(lambda: (e := _proxy_link_on(victim, "kill-me")) and e["cmd"] == "set" and e,
                            message="for the SET to wait on the victim")
            assert direct.execute_command("CLIENT", "KILL", "ID", link["id"]) == 1
        finally:
            direct.execute_command("CLIENT", "UNPAUSE")
        runner.join(timeout=30)
        assert not runner.is_alive()
        error = results[len(keys)]
        assert isinstance(error, redis.ResponseError), error
        assert str(error).startswith(f"key-evt-amqp: lost the connection to Redis node {HOST}:{victim.port}")
        assert results[:len(keys)] + results[len(keys) + 1:] == [k.encode() for k in keys] * 2
        assert c.get(write_key) is None  # Redis never ran it, and the proxy did not resend it
        assert c.get(keys[0]) == keys[0].encode()


def _role(server: RedisServer) -> list:
    with server.client(socket_timeout=2) as direct:
        return direct.execute_command("ROLE")


def _in_sync(master: RedisServer) -> bool:
    """``master`` has a replica, and every replica has acknowledged all it was sent."""
    _, offset, replicas = _role(master)
    return bool(replicas) and all(int(r[2]) == offset for r in replicas)


def test_master_killed_reads_wait_for_the_failover() -> None:
    """kill -9 of a master while a client pipelines GETs over every slot: no GET fails; those of
    the dead master's slots are resent (with backoff) until its replica has taken over."""
    with RedisCluster() as own, ProxyProcess(own.seed_url, ["--amqp", unreachable_amqp_url()]) as proxy:
        keys = [f"fo:{i}" for i in range(300)]
        with proxy.client() as c:
            c.mset({k: k for k in keys})
        victim = own.owner_of(key_slot(keys[0].encode()))
        heir = next(s for s in own.servers if s is not victim and _role(s)[0] == b"slave"
                    and int(_role(s)[2]) == victim.port)
        # A replica's first full sync starts repl-diskless-sync-delay (5 s) after it connects.
        wait_for(lambda: all(_in_sync(m) for m in own.masters()), timeout=30,
                 message="for the replicas to have every key")
        failures: list[object] = []
        rounds: list[float] = []
        stop = threading.Event()

        def reader() -> None:
            with proxy.client(socket_timeout=30) as r:
                while not stop.is_set():
                    pipe = r.pipeline(transaction=False)
                    for key in keys:
                        pipe.get(key)
                    try:
                        got = pipe.execute(raise_on_error=False)
                    except redis.RedisError as exc:
                        failures.append(exc)
                        return
                    failures.extend(g for g, k in zip(got, keys) if g != k.encode())
                    rounds.append(time.monotonic())

        runner = threading.Thread(target=reader)
        runner.start()
        try:
            wait_for(lambda: len(rounds) > 5)
            victim.kill()
            killed = time.monotonic()
            wait_for(lambda: _role(heir)[0] == b"master", timeout=30, message="for the failover")
            promoted = time.monotonic()
            wait_for(lambda: len([t for t in rounds if t > promoted]) > 5 or not runner.is_alive(), timeout=20)
        finally:
            stop.set()
            runner.join(timeout=30)
        assert failures == [], (sorted({str(f) for f in failures}), proxy.log_text()[-3000:])
        assert len([t for t in rounds if t > promoted]) > 5
        SUMMARY.append(f"commands, kill -9: replica promoted {promoted - killed:.2f}s after the kill; "
                       f"longest GET pipeline round {max(b - a for a, b in zip(rounds, rounds[1:])):.2f}s")
