"""The cluster relay's per-client state machine, with fake transports and a fake map.

No sockets and no Redis: the test plays the client (``data_received``), the transports (their
pause/resume calls) and the nodes (``NodeLink.data_received`` / ``connection_lost``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from protocol.slots import key_slot
from proxy.cluster import relay as relay_module
from proxy.cluster.links import NodeLink
from proxy.cluster.relay import ClusterClientConnection
from proxy.cluster.topology import Address, SlotMap
from proxy.config import Config
from proxy.metrics import Metrics

A: Address = ("127.0.0.1", 7000)
B: Address = ("127.0.0.1", 7001)
C: Address = ("127.0.0.1", 7002)
CLUSTER_SLOTS = [[0, 5460, [b"127.0.0.1", 7000]], [5461, 10922, [b"127.0.0.1", 7001]],
                 [10923, 16383, [b"127.0.0.1", 7002]]]


def encode(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def key_on(address: Address, prefix: str = "k") -> bytes:
    """A key whose slot ``address`` owns in :data:`CLUSTER_SLOTS`."""
    first = {A: 0, B: 5461, C: 10923}[address]
    last = {A: 5460, B: 10922, C: 16383}[address]
    return next(key for i in range(10_000)
                if first <= key_slot(key := f"{prefix}{i}".encode()) <= last)


class FakeTransport:
    """Records writes; says whether reading is paused; the test calls the protocol's
    pause_writing/resume_writing itself."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.reading = True
        self.closed = False

    @property
    def written(self) -> bytes:
        return b"".join(self.out)

    def write(self, data: bytes) -> None:
        if self.closed:  # as uvloop does once the handle is closed
            raise RuntimeError("unable to perform operation on a closed transport")
        self.out.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int) -> None: ...

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class FakeTopology:
    def __init__(self) -> None:
        self.map: SlotMap | None = SlotMap.from_cluster_slots(CLUSTER_SLOTS)  # type: ignore[arg-type]
        self.seeds = (A,)
        self.refreshes = 0
        self.asked = 0

    def owner(self, slot: int) -> Address | None:
        return self.map.owners[slot] if self.map is not None else None

    def moved(self, slot: int, address: Address) -> None:
        assert self.map is not None
        self.map = self.map.with_owner(slot, address)
        self.asked += 1

    def refresh_soon(self) -> None:
        self.asked += 1


class FakeServer:
    buffer_limit = 64 * 1024
    connect_timeout = 1.0

    def __init__(self) -> None:
        self.topology = FakeTopology()
        self.runtime = None
        self.metrics = Metrics()
        self.clients: set[ClusterClientConnection] = set()

    def admit(self, client: ClusterClientConnection) -> bool:
        self.clients.add(client)
        return True

    def forget(self, client: ClusterClientConnection) -> None:
        self.clients.discard(client)

    def spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        coro.close()  # the test opens node links itself (:meth:`Proxy.connect`)


class Proxy:
    """One client connection of the cluster relay, its transports, and helpers to play the nodes."""

    def __init__(self) -> None:
        self.server = FakeServer()
        self.relay = ClusterClientConnection(self.server, self.server.runtime, self.server.topology)  # type: ignore[arg-type]
        self.client = FakeTransport()
        self.relay.connection_made(self.client)  # type: ignore[arg-type]
        self.nodes: dict[Address, FakeTransport] = {}

    def send(self, *commands: tuple[bytes, ...]) -> None:
        """The client writes ``commands`` in one chunk."""
        self.relay.data_received(b"".join(encode(*c) for c in commands))

    def link(self, address: Address) -> NodeLink:
        return self.relay.links[address]

    def connect(self, address: Address) -> FakeTransport:
        """The connection to ``address`` opens (the link must exist)."""
        transport = self.nodes[address] = FakeTransport()
        self.link(address).connection_made(transport)  # type: ignore[arg-type]
        return transport

    def answer(self, address: Address, data: bytes) -> None:
        self.link(address).data_received(data)

    def refuse(self, address: Address) -> None:
        """The connection to ``address`` cannot be opened (what ``_connect`` reports)."""
        self.relay.link_failed(self.link(address), "cannot connect (Connection refused)")

    def drop(self, address: Address) -> None:
        """The open connection to ``address`` is lost."""
        self.link(address).connection_lost(None)

    async def resent(self, address: Address) -> FakeTransport:
        """Wait for the resend round; the new connection to ``address`` opens."""
        await wait(lambda: address in self.relay.links and not self.relay._parked)
        return self.connect(address)


LOST = b"-ERR key-evt-amqp: lost the connection to Redis node 127.0.0.1:%d (%s)\r\n"


async def wait(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def test_writes_queued_when_the_client_resumes_writing_still_go_out() -> None:
    """resume_writing must not forget the links whose writes wait for the next flush (it used
    to re-create ``dirty``: the node never got them, nor any later command for it)."""
    proxy = Proxy()
    key = key_on(A)
    proxy.send((b"GET", key))
    node = proxy.connect(A)
    proxy.answer(A, bulk(b"1"))
    assert proxy.client.written == bulk(b"1")
    proxy.relay.pause_writing()  # the client stops reading what we write
    before = len(node.written)
    proxy.relay.command([b"GET", key])  # a batch being routed: queued for the next flush...
    proxy.relay.resume_writing()  # ...when the client's transport drains
    proxy.relay.flush()
    assert node.written[before:] == encode(b"GET", key)
    proxy.send((b"GET", key))  # and later commands for that node go out too
    assert node.written[before:] == encode(b"GET", key) * 2
    proxy.answer(A, bulk(b"1") * 2)
    assert proxy.client.written == bulk(b"1") * 3


def test_commands_that_never_left_are_resent_to_the_new_owner() -> None:
    """The connection never opened: Redis cannot have run anything, so even the SET is resent,
    after the pause, to whichever node owns the slot by then (a failover happened meanwhile)."""
    async def scenario() -> None:
        proxy = Proxy()
        key = key_on(A)
        proxy.send((b"SET", key, b"v"), (b"GET", key))
        proxy.refuse(A)
        assert proxy.client.written == b"" and not proxy.client.reading  # later commands wait
        proxy.server.topology.moved(key_slot(key), B)  # the replica took over
        node = await proxy.resent(B)
        assert node.written == encode(b"SET", key, b"v") + encode(b"GET", key)
        assert proxy.client.reading
        proxy.answer(B, b"+OK\r\n" + bulk(b"v"))
        assert proxy.client.written == b"+OK\r\n" + bulk(b"v")
    run(scenario)


def test_a_lost_connection_fails_the_write_and_resends_the_read() -> None:
    """SET and GET reached Redis, no reply: the SET may have run (the error, not resent); the GET
    goes again on a new connection; a MGET part and an unsent INCR too."""
    async def scenario() -> None:
        proxy = Proxy()
        key, other = key_on(A), key_on(B)
        proxy.send((b"GET", key))
        first = proxy.connect(A)
        proxy.answer(A, bulk(b"0"))
        proxy.send((b"SET", key, b"v"), (b"GET", key), (b"MGET", other, key))
        proxy.connect(B)
        proxy.answer(B, b"*1\r\n" + bulk(b"o"))
        proxy.relay.command([b"INCR", key])  # routed, still queued in the proxy
        assert first.written.count(b"INCR") == 0
        proxy.drop(A)
        assert proxy.client.written == bulk(b"0") + LOST % (7000, b"connection lost")
        again = await proxy.resent(A)
        assert again.written == encode(b"GET", key) + encode(b"MGET", key) + encode(b"INCR", key)
        proxy.answer(A, bulk(b"v") + b"*1\r\n" + bulk(b"v") + b":1\r\n")
        assert proxy.client.written == (bulk(b"0") + LOST % (7000, b"connection lost") + bulk(b"v")
                                        + b"*2\r\n" + bulk(b"o") + bulk(b"v") + b":1\r\n")
    run(scenario)


def test_clusterdown_is_resent_until_the_cluster_is_up() -> None:
    async def scenario() -> None:
        proxy = Proxy()
        key = key_on(C)
        proxy.send((b"SET", key, b"v"))
        node = proxy.connect(C)
        proxy.answer(C, b"-CLUSTERDOWN The cluster is down\r\n")
        assert proxy.client.written == b""
        await wait(lambda: node.written.count(b"SET") == 2)
        proxy.answer(C, b"+OK\r\n")
        assert proxy.client.written == b"+OK\r\n"
    run(scenario)


def test_resends_are_bounded_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that never comes back: the GET's reply is the error, within the window."""
    monkeypatch.setattr(relay_module, "RETRY_WINDOW", 0.3)
    monkeypatch.setattr(relay_module, "MAX_RETRY_DELAY", 0.1)

    async def scenario() -> None:
        proxy = Proxy()
        key = key_on(A)
        proxy.send((b"GET", key))
        loop = asyncio.get_running_loop()
        start, attempts = loop.time(), 0
        while not proxy.client.written:
            await wait(lambda: A in proxy.relay.links or proxy.client.written)
            if A in proxy.relay.links:
                attempts += 1
                proxy.refuse(A)
        assert proxy.client.written == LOST % (7000, b"cannot connect (Connection refused)")
        assert loop.time() - start <= 0.3 + 0.05
        assert 3 <= attempts <= 6  # 0.05 + 0.1 + 0.1 (+ 0.1 would pass the window)
        assert proxy.client.reading
    run(scenario)


def test_resends_are_bounded_in_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "MAX_RETRIES", 3)
    monkeypatch.setattr(relay_module, "FIRST_RETRY_DELAY", 0.001)

    async def scenario() -> None:
        proxy = Proxy()
        key = key_on(B)
        proxy.send((b"GET", key))
        node = proxy.connect(B)
        for _ in range(3):
            node.out.clear()
            proxy.answer(B, b"-CLUSTERDOWN The cluster is down\r\n")
            await wait(lambda: node.written == encode(b"GET", key))
        proxy.answer(B, b"-CLUSTERDOWN The cluster is down\r\n")
        assert proxy.client.written == b"-CLUSTERDOWN The cluster is down\r\n"
    run(scenario)


def test_nothing_is_resent_for_a_transaction() -> None:
    async def scenario() -> None:
        proxy = Proxy()
        key = key_on(A)
        proxy.send((b"MULTI",), (b"GET", key))
        proxy.connect(A)
        proxy.drop(A)
        assert proxy.client.written.startswith(b"+OK\r\n-ERR key-evt-amqp: lost the connection")
        assert proxy.client.closed and not proxy.relay._parked
    run(scenario)


def test_a_full_node_link_that_dies_does_not_keep_the_client_paused() -> None:
    async def scenario() -> None:
        proxy = Proxy()
        key = key_on(A)
        proxy.send((b"SET", key, b"v"))
        proxy.connect(A)
        proxy.link(A).pause_writing()  # Redis reads slower than the client writes
        assert not proxy.client.reading
        proxy.drop(A)  # ... and the connection dies before it drains
        assert proxy.client.written.startswith(b"-ERR key-evt-amqp: lost the connection")
        assert proxy.client.reading
    run(scenario)


def _subscribed(proxy: Proxy) -> FakeTransport:
    proxy.send((b"SUBSCRIBE", b"ch"))
    node = proxy.connect(A)  # the home node: first master
    proxy.answer(A, b"*3\r\n" + bulk(b"subscribe") + bulk(b"ch") + b":1\r\n")
    assert proxy.client.written.endswith(b":1\r\n")
    return node


def message(payload: bytes) -> bytes:
    return b"*3\r\n" + bulk(b"message") + bulk(b"ch") + bulk(payload)


def test_a_subscribed_client_that_does_not_read_stops_its_node() -> None:
    """Client writes paused: the node stays paused, whatever the client sends meanwhile."""
    proxy = Proxy()
    node = _subscribed(proxy)
    proxy.relay.pause_writing()
    assert not node.reading
    proxy.send((b"PING",))  # goes down the pipe; must not wake the node's reading
    assert not node.reading
    proxy.relay.resume_writing()
    assert node.reading


def test_a_stream_above_its_limit_stays_paused_when_the_client_drains() -> None:
    """The stream buffer is over buffer_limit while the client is paused: resume_writing writes it
    out before the node is read again (it used to resume every link blindly)."""
    proxy = Proxy()
    node = _subscribed(proxy)
    proxy.relay.pause_writing()
    before = len(proxy.client.written)
    big = message(b"x" * proxy.server.buffer_limit)
    proxy.relay.links[A].resume_reading()  # a frame already on its way when the client paused
    proxy.answer(A, big)
    assert not node.reading
    assert len(proxy.client.written) == before  # held: the client reads nothing now
    proxy.relay.resume_writing()
    assert proxy.client.written[before:] == big and node.reading


def test_replies_wait_while_the_client_does_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies the proxy makes itself (here -ERR for CLUSTER NODES) are held, not written, while
    the client's transport is full: MAX_ORDER then stops reading the client."""
    monkeypatch.setattr(relay_module, "MAX_ORDER", 100)
    proxy = Proxy()
    proxy.relay.pause_writing()
    for _ in range(30):
        proxy.send(*[(b"CLUSTER", b"NODES")] * 10)
        if not proxy.client.reading:
            break
    assert not proxy.client.reading
    assert proxy.client.written == b""
    proxy.relay.resume_writing()
    assert proxy.client.written.count(b"-ERR CLUSTER not supported") > 100
    assert proxy.client.reading


def test_writes_queued_before_the_node_connection_opens_pause_the_client() -> None:
    proxy = Proxy()
    value = b"v" * 10_000
    for i in range(10):  # > buffer_limit bytes, all for a node not connected yet
        proxy.send((b"SET", key_on(A, f"q{i}-"), value))
    assert not proxy.client.reading
    node = proxy.connect(A)
    assert node.written.count(value) == 10
    assert proxy.client.reading


def test_a_subscribed_pipe_to_a_connecting_node_pauses_the_client() -> None:
    """Commands down a pub/sub pipe take no place in the order: only bytes can bound them."""
    proxy = Proxy()
    proxy.send((b"SUBSCRIBE", b"ch"))
    for _ in range(10):
        proxy.send((b"PING", b"p" * 10_000))
    assert not proxy.client.reading


def test_a_transaction_held_before_its_first_key_is_bounded() -> None:
    """Commands after MULTI are held in the proxy until one names a key: over buffer_limit bytes
    the command is refused and the transaction aborted (EXEC answers -EXECABORT)."""
    proxy = Proxy()
    proxy.send((b"MULTI",))
    for _ in range(10):
        proxy.send((b"ECHO", b"e" * 10_000))
    out = proxy.client.written
    assert out.count(b"+QUEUED") < 10
    assert b"-ERR key-evt-amqp: transaction too long before its first key" in out
    assert sum(len(sent.data) for sent in proxy.relay.tx_held) <= proxy.server.buffer_limit
    proxy.send((b"EXEC",))
    assert proxy.client.written.endswith(b"-EXECABORT Transaction discarded because of previous errors.\r\n")


def test_a_command_above_the_size_limit_closes_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """One unfinished command is buffered whole before it is routed: bounded by MAX_COMMAND_BYTES."""
    monkeypatch.setattr(relay_module, "MAX_COMMAND_BYTES", 4096, raising=False)
    proxy = Proxy()
    proxy.relay.data_received(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\n")
    for _ in range(3):
        proxy.relay.data_received(b"x" * 2000)
    assert proxy.client.written.startswith(b"-ERR key-evt-amqp: command larger than 4096 bytes")
    assert proxy.client.closed


def test_a_moved_loop_is_bounded() -> None:
    """Two nodes that send a command to each other: after MAX_REDIRECTS, the client gets MOVED."""
    proxy = Proxy()
    key = key_on(A)
    slot = key_slot(key)
    proxy.send((b"GET", key))
    proxy.connect(A)
    for hop in range(relay_module.MAX_REDIRECTS):
        there, back = (B, A) if hop % 2 == 0 else (A, B)
        proxy.answer(back, b"-MOVED %d 127.0.0.1:%d\r\n" % (slot, there[1]))
        if there not in proxy.nodes or proxy.nodes[there].closed:
            proxy.connect(there)
        assert proxy.client.written == b""
    last = A if relay_module.MAX_REDIRECTS % 2 == 0 else B
    proxy.answer(last, b"-MOVED %d 127.0.0.1:7002\r\n" % slot)
    assert proxy.client.written == b"-MOVED %d 127.0.0.1:7002\r\n" % slot


def test_nothing_is_written_to_a_node_connection_that_is_closing() -> None:
    """Between the transport closing (a reset) and connection_lost (the next loop turn) the link
    still has it: writes there raised in the client's data_received (uvloop) or were silently
    dropped (after EOF). They now stay queued, so the commands count as never sent: resent."""
    async def scenario() -> None:
        proxy = Proxy()
        key = key_on(A)
        proxy.send((b"GET", key))
        node = proxy.connect(A)
        proxy.answer(A, bulk(b"1"))
        node.close()  # reset by the peer: connection_lost is on its way
        proxy.send((b"SET", key, b"2"))
        proxy.drop(A)
        again = await proxy.resent(A)
        assert again.written == encode(b"SET", key, b"2")  # never left: resent, though a write
        proxy.answer(A, b"+OK\r\n")
        assert proxy.client.written == bulk(b"1") + b"+OK\r\n"
    run(scenario)
