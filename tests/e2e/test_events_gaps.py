"""Gap markers must cover every write whose event was lost (issue #8, item 7).

A writer SETs continuously, straight to a private Redis, while the Redis is restarted. Each SET runs
in a script that also returns Redis's own ``TIME``, so every acknowledged write has its execution
time on Redis's clock. After the run, every acknowledged SET that produced no event must lie inside
a gap marker's ``[gap_start_ms, gap_end_ms]``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from harness import ProxyProcess, RedisServer, wait_for
from rabbit import Message, RabbitQueue

#: SET the key and return the time Redis executed it (seconds, microseconds).
TIMED_SET = "local t = redis.call('TIME'); redis.call('SET', KEYS[1], ARGV[1]); return t"


@pytest.fixture
def queue() -> Iterator[RabbitQueue]:
    with RabbitQueue() as q:
        yield q


class TimedWriter(threading.Thread):
    """SETs ``w<n>`` in a loop and records ``(key, execution ms)`` of each acknowledged one."""

    def __init__(self, server: RedisServer) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.acked: list[tuple[bytes, int]] = []
        self.failures = 0
        self._halt = threading.Event()

    def run(self) -> None:
        n = 0
        client: redis.Redis | None = None
        while not self._halt.is_set():
            try:
                if client is None:
                    client = self.server.client(socket_timeout=2, socket_connect_timeout=0.5)
                key = b"w%d" % n
                n += 1
                seconds, micros = client.eval(TIMED_SET, 1, key, "v")
                self.acked.append((key, int(seconds) * 1000 + int(micros) // 1000))
            except redis.RedisError:
                self.failures += 1
                if client is not None:
                    client.close()
                client = None
                time.sleep(0.0005)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def settled(client: redis.Redis) -> bool:
    text = client.execute_command("key_evt_amqp.info").decode()
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return info["events_in_flight"] == "0" and info["fallback_length"] == "0" and info["pipeline_mode"] == "direct"


def gaps_and_keys(messages: list[Message]) -> tuple[list[tuple[int, int]], set[bytes]]:
    gaps = [(m.headers["gap_start_ms"], m.headers["gap_end_ms"]) for m in messages
            if m.type == "key_evt_amqp.gap"]
    keys = {m.body.split(b"\n", 2)[2] for m in messages if m.type == "set"}
    return gaps, keys


def test_every_unseen_write_lies_inside_a_gap(queue: RabbitQueue) -> None:
    args = ["--amqp", "amqp://guest:guest@127.0.0.1:5672/", "--routing-key", queue.routing_key,
            "--events", "$", "--keymask", "ALL"]
    with RedisServer() as rs, ProxyProcess(rs.url, args) as proxy:
        direct = rs.client()
        wait_for(lambda: "$" in direct.config_get("notify-keyspace-events")["notify-keyspace-events"])
        writer = TimedWriter(rs)
        writer.start()
        try:
            wait_for(lambda: len(writer.acked) > 500)
            for _ in range(2):
                rs.kill()
                rs.start()  # notify-keyspace-events is empty again: the proxy must set it anew
                wait_for(lambda: "$" in rs.client().config_get("notify-keyspace-events")["notify-keyspace-events"])
                count = len(writer.acked)
                wait_for(lambda: len(writer.acked) > count + 2000, 20)
        finally:
            writer.stop()
        acked = writer.acked
        with proxy.client() as admin:
            wait_for(lambda: settled(admin), 30)
        messages = queue.drain(idle=1.5)
        log = proxy.log_text()
    gaps, seen = gaps_and_keys(messages)
    unseen = [(key, at) for key, at in acked if key not in seen]
    outside = [(key, at) for key, at in unseen if not any(start <= at <= end for start, end in gaps)]
    print(f"\n{len(acked)} acknowledged SETs, {len(unseen)} without an event, gaps {gaps}")
    assert len(gaps) >= 2, log[-3000:]
    assert not outside, f"{len(outside)} acknowledged SETs without an event outside every gap: " \
                        f"{outside[:10]}, gaps {gaps}"
