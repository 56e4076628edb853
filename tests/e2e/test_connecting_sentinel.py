"""Redis Sentinel (issue 12): ``redis+sentinel://`` finds the master and follows a failover.

Real sentinels (tests/sentinel.py): 1 master, 1 replica, 3 sentinels, ``down-after-milliseconds``
1000. A writer SETs through the proxy, in a script that returns Redis's ``TIME`` (the execution
time of every acknowledged write); when its connection is closed it connects again. Once for
``SENTINEL FAILOVER`` and once for ``kill -9`` of the master:

- the proxy closes the clients of the old master without a reply (as Redis does), they connect
  again and their writes land on the new master;
- ``notify-keyspace-events`` was set on the replica before it was promoted;
- every acknowledged SET that produced no event lies inside a gap marker (events are lost only
  inside the marker), and there is a marker for the switch.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from harness import HOST, REPO_ROOT, ProxyProcess, RawClient, free_port, unreachable_amqp_url, wait_for
from rabbit import Message, RabbitQueue
from sentinel import MASTER_NAME, SentinelGroup

TIMED_SET = "local t = redis.call('TIME'); redis.call('SET', KEYS[1], ARGV[1]); return t"


def info(client: redis.Redis) -> dict[str, str]:
    text = client.execute_command("key_evt_amqp.info").decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class ProxyWriter(threading.Thread):
    """SETs ``w<n>`` through the proxy in a loop; records ``(key, execution ms)`` of each
    acknowledged one, and the closed connections (each is followed by a new one)."""

    def __init__(self, proxy: ProxyProcess) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        self.acked: list[tuple[bytes, int]] = []
        self.failures = 0
        self._halt = threading.Event()

    def run(self) -> None:
        n = 0
        client: redis.Redis | None = None
        while not self._halt.is_set():
            try:
                if client is None:
                    client = self.proxy.client(socket_timeout=3, socket_connect_timeout=1)
                key = b"w%d" % n
                n += 1
                seconds, micros = client.eval(TIMED_SET, 1, key, "v")
                self.acked.append((key, int(seconds) * 1000 + int(micros) // 1000))
            except redis.RedisError:
                self.failures += 1
                if client is not None:
                    client.close()
                client = None
                time.sleep(0.01)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def settled(client: redis.Redis) -> bool:
    i = info(client)
    return i["events_in_flight"] == "0" and i["fallback_length"] == "0" and i["pipeline_mode"] == "direct"


def gaps_and_keys(messages: list[Message]) -> tuple[list[tuple[int, int]], set[bytes]]:
    gaps = [(m.headers["gap_start_ms"], m.headers["gap_end_ms"]) for m in messages if m.type == "key_evt_amqp.gap"]
    keys = {m.body.split(b"\n", 2)[2] for m in messages if m.type == "set"}
    return gaps, keys


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    with SentinelGroup() as g:
        yield g


@pytest.fixture
def queue() -> Iterator[RabbitQueue]:
    with RabbitQueue() as q:
        yield q


def fail_over(group: SentinelGroup, how: str) -> tuple[int, int]:
    if how == "SENTINEL FAILOVER":
        return group.failover()
    old = group.master()
    old.kill()  # kill -9
    return old.port, group.wait_switched(old.port)


@pytest.mark.parametrize("how", ["SENTINEL FAILOVER", "kill -9"])
def test_failover(group: SentinelGroup, queue: RabbitQueue, how: str) -> None:
    args = ["--amqp", "amqp://guest:guest@127.0.0.1:5672/", "--routing-key", queue.routing_key,
            "--events", "$", "--keymask", "ALL", "--connect-timeout", "2"]
    with ProxyProcess(group.url, args) as proxy, proxy.client() as admin:
        first = group.master()
        wait_for(lambda: info(admin)["source_state"] == "subscribed", 15)
        assert info(admin)["sentinel_master"] == f"{HOST}:{first.port}"
        # notify-keyspace-events on the replica, in advance
        replica = group.replica()
        with replica.client() as direct:
            wait_for(lambda: "$" in direct.config_get("notify-keyspace-events")["notify-keyspace-events"], 15)
        idle = RawClient(proxy.port)
        assert idle.command("PING") == b"PONG"
        writer = ProxyWriter(proxy)
        writer.start()
        try:
            wait_for(lambda: len(writer.acked) > 300, 15)
            started = time.monotonic()
            old, new = fail_over(group, how)
            assert new == replica.port
            # the idle client of the old master is closed without a word, as Redis closes it
            idle.sock.settimeout(15)
            assert idle.sock.recv(1024) == b""
            idle.close()
            count = len(writer.acked)
            wait_for(lambda: len(writer.acked) > count + 1000, 30, message="writes after the switch")
            switch_seconds = time.monotonic() - started
        finally:
            writer.stop()
        with group.master().client() as direct:  # the writes after the switch are on the new master
            assert direct.get(writer.acked[-1][0]) == b"v"
        wait_for(lambda: settled(admin), 30)
        state = info(admin)
        messages = queue.drain(idle=1.5)
        log = proxy.log_text()
    assert state["sentinel_master"] == f"{HOST}:{new}" and state["sentinel_switches"] == "1", state
    assert f"master '{MASTER_NAME}' moved from {HOST}:{old} to {HOST}:{new}" in log
    gaps, seen = gaps_and_keys(messages)
    unseen = [(key, at) for key, at in writer.acked if key not in seen]
    outside = [(key, at) for key, at in unseen if not any(start <= at <= end for start, end in gaps)]
    widths = [end - start for start, end in gaps]
    print(f"\n{how}: {len(writer.acked)} acknowledged SETs, {len(unseen)} without an event, "
          f"{writer.failures} failed, gaps (ms) {widths}, switch and 1000 writes in {switch_seconds:.1f}s")
    assert gaps, log[-3000:]
    assert not outside, f"{len(outside)} acknowledged SETs without an event outside every gap: {outside[:5]}, gaps {gaps}"
    assert max(widths) < 20_000, gaps


def test_no_master_stops_the_start() -> None:
    """Nothing answers at the sentinels' addresses: one line naming each, exit 1."""
    ports = [free_port(), free_port()]
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--listen", f"{HOST}:{free_port()}", "--amqp", unreachable_amqp_url(),
         "--connect-timeout", "1", "--upstream", f"redis+sentinel://{HOST}:{ports[0]},{HOST}:{ports[1]}/mymaster"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"key-evt-amqp: cannot find the master via Sentinel: no sentinel gave the master 'mymaster': "
        f"{HOST}:{ports[0]}: Connection refused; {HOST}:{ports[1]}: Connection refused")
