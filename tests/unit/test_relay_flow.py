"""Flow control of one client connection, with a transport that behaves as uvloop's does
(tests/fakes.py)."""

from __future__ import annotations

from fakes import FakeServer, FakeTransport
from proxy.relay import ClientConnection, Pause


def test_input_while_connecting_stops_at_the_buffer_limit() -> None:
    server = FakeServer(buffer_limit=64 * 1024)
    client = ClientConnection(server, server.runtime)  # type: ignore[arg-type]
    transport = FakeTransport(started=False)  # as uvloop's: a pause in connection_made is lost
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
    server = FakeServer(buffer_limit=64 * 1024)
    client = ClientConnection(server, server.runtime)  # type: ignore[arg-type]
    transport = FakeTransport()
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
