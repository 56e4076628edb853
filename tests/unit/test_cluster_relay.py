"""The cluster relay's per-client state machine, with fake transports and a fake map.

No sockets and no Redis: the test plays the client (``data_received``), the transports (their
pause/resume calls) and the nodes (``NodeLink.data_received`` / ``connection_lost``).
"""

from __future__ import annotations

from protocol.slots import key_slot
from proxy.cluster.links import NodeLink
from proxy.cluster.relay import ClusterClientConnection
from proxy.cluster.topology import Address, SlotMap
from proxy.config import Config

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
        assert not self.closed, "write after close"
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
        self.relay = ClusterClientConnection(self.server)  # type: ignore[arg-type]
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
