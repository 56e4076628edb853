"""A RabbitMQ cluster of two "nodes": two TCP relays (:class:`faults.FaultRelay`) in front of the
shared broker. The proxy connects to one (chosen at random), ``key_evt_amqp.info`` names it; cut
during a stream of events, the proxy goes on with the other, the fallback list bridging the switch:
every event arrives, first arrivals in Redis's order, any duplicate under its own message_id."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from faults import FaultRelay
from harness import ProxyProcess, RawClient, RedisServer, wait_for
from rabbit import Message, RabbitQueue

AMQP_PORT = 5672
TOTAL, CHUNK = 24_000, 2_000


@pytest.fixture
def queue() -> Iterator[RabbitQueue]:
    with RabbitQueue() as q:
        yield q


def write_sets(port: int, start: int, stop: int) -> None:
    """SET k<start> .. k<stop-1>, in this order, as one pipelined stream."""
    data = b"".join(b"*3\r\n$3\r\nSET\r\n$%d\r\nk%d\r\n$1\r\nv\r\n" % (len(b"k%d" % i), i)
                    for i in range(start, stop))
    subprocess.run(["redis-cli", "-p", str(port), "--pipe"], input=data, check=True, capture_output=True)


def info(port: int) -> dict[str, str]:
    with RawClient(port) as client:
        text = client.command("key_evt_amqp.info").decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def check_exactly_once(messages: list[Message], total: int) -> int:
    """Every event arrived once per message_id (a redelivery keeps its id); first arrivals in
    order. Returns the number of redeliveries."""
    ids: dict[str, bytes] = {}
    order: list[bytes] = []
    for m in messages:
        assert m.message_id is not None
        key = m.body.split(b"\n", 2)[2]
        if m.message_id in ids:
            assert ids[m.message_id] == key, "one message_id for two events"
            continue
        ids[m.message_id] = key
        order.append(key)
    assert len(ids) == total, f"{total - len(ids)} events lost or given a second message_id"
    assert order == [b"k%d" % i for i in range(total)], "first arrivals out of Redis's order"
    return len(messages) - len(ids)


def test_failover_between_nodes_loses_nothing(redis_server: RedisServer, queue: RabbitQueue) -> None:
    with FaultRelay(AMQP_PORT) as one, FaultRelay(AMQP_PORT) as two:
        relays = {f"127.0.0.1:{r.port}": r for r in (one, two)}
        args = ["--amqp", f"amqp://guest:guest@127.0.0.1:{one.port}/", "--amqp",
                f"amqp://guest:guest@127.0.0.1:{two.port}/", "--routing-key", queue.routing_key,
                "--events", "$", "--keymask", "ALL", "--heartbeat", "2"]
        with ProxyProcess(redis_server.url, args) as proxy:
            first = wait_for(lambda: info(proxy.port)["amqp_node"], 10, message="for a node")
            assert first in relays
            switches = []
            for n, start in enumerate(range(0, TOTAL, CHUNK)):
                if n in (3, 8):  # cut the node in use in the middle of the stream, twice
                    node = wait_for(lambda: info(proxy.port)["amqp_node"], 15, message="for a node")
                    relays[node].cut()
                    for other in relays.values():
                        if other is not relays[node]:
                            other.restore()
                    switches.append(node)
                write_sets(redis_server.port, start, start + CHUNK)
                time.sleep(0.1)
            wait_for(lambda: int(info(proxy.port)["events_confirmed"]) >= TOTAL
                     and info(proxy.port)["fallback_length"] == "0", 60, message="for every confirm")
            fields = info(proxy.port)
            log = proxy.log_text()
        messages = queue.drain(expected=TOTAL, idle=2, timeout=60)
    assert len(set(switches)) == 2, f"the second cut should hit the other node: {switches}"
    assert fields["amqp_node"] == switches[0], "after two cuts, back on the first node cut"
    assert int(fields["amqp_connections"]) >= 3 and int(fields["events_to_fallback"]) > 0
    for node in switches:
        assert f"amqp: connected to {node} (" in log
    redeliveries = check_exactly_once(messages, TOTAL)
    print(f"\nfailover x2: {len(messages)} messages for {TOTAL} events, {redeliveries} redelivered, "
          f"{fields['events_to_fallback']} through the fallback list")
