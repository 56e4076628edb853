"""Flow control of one client connection, with a transport that behaves as uvloop's does."""

from __future__ import annotations

from proxy.config import Config
from proxy.relay import ClientConnection, Pause


class UvloopLikeTransport:
    """uvloop starts reading only after ``connection_made`` returns, so a pause asked for inside it
    is lost; afterwards pause_reading() takes effect."""

    def __init__(self) -> None:
        self.reading = False
        self.started = False
        self.out: list[bytes] = []

    def start(self) -> None:
        self.started = self.reading = True

    def pause_reading(self) -> None:
        if self.started:
            self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int) -> None: ...

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None: ...


class FakeServer:
    buffer_limit = 64 * 1024

    def __init__(self) -> None:
        self.runtime = type("R", (), {"config": Config()})()

    def admit(self, client: ClientConnection) -> bool:
        return True

    def spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        coro.close()  # the upstream connection never opens: the client stays paused


def test_input_while_connecting_stops_at_the_buffer_limit() -> None:
    server = FakeServer()
    client = ClientConnection(server, server.runtime)  # type: ignore[arg-type]
    transport = UvloopLikeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    transport.start()
    assert Pause.CONNECTING in client._pauses
    chunk = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n" * 1000
    delivered = 0
    while transport.reading and delivered < 100 * server.buffer_limit:
        client.data_received(chunk)
        delivered += len(chunk)
    assert not transport.reading, f"still reading after {delivered} bytes"
    assert delivered <= server.buffer_limit + len(chunk)


class StrictUpstream:
    """An upstream transport that raises on a write after write_eof(), as uvloop's does."""

    def __init__(self) -> None:
        self.eof = False
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        if self.eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        self.out.append(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True


def test_nothing_is_written_upstream_after_the_end_of_input() -> None:
    server = FakeServer()
    client = ClientConnection(server, server.runtime)  # type: ignore[arg-type]
    transport = UvloopLikeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    upstream = StrictUpstream()
    client.upstream = type("U", (), {"transport": upstream, "keep_spare": lambda self: None})()  # type: ignore[assignment]
    client._up_write = upstream.write
    client._pauses.clear()
    client.data_received(b"*3\r\n$5\r\nBLPOP\r\n$1\r\nk\r\n$1\r\n0\r\n")
    assert client.eof_received() is True
    assert upstream.eof
    client.shut_down()  # SIGTERM: no drain barrier on a closed write side (it raised before)
    client.data_received(b"*1\r\n$4\r\nPING\r\n")  # nothing more reaches Redis either
    assert b"".join(upstream.out) == b"*3\r\n$5\r\nBLPOP\r\n$1\r\nk\r\n$1\r\n0\r\n"
