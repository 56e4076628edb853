"""The proxy's own connections to Redis nodes, seen from the Redis side.

:class:`RedisSide` is what every such connection shares (pause, resume, close): the single-node
upstream below and the cluster's node links (:class:`proxy.cluster.links.NodeLink`) both derive
from it. :class:`UpstreamConnection` is one client's private connection to the Redis behind the
proxy (:mod:`proxy.relay`): every reply chunk goes to the client as it arrives, unparsed, and the
client hears when Redis is gone or full. Both are opened by :func:`proxy.connect.open_redis`.
"""

from __future__ import annotations

import asyncio
import os
from typing import Protocol, cast

__all__ = ["Client", "RedisSide", "UpstreamConnection"]


class Client(Protocol):
    """What an :class:`UpstreamConnection` tells the client connection it serves
    (:class:`proxy.relay.ClientConnection`)."""

    def reply_data(self, data: bytes) -> None:
        """Bytes from Redis, in order: write them to the client (or to the waiting barrier)."""

    def upstream_lost(self) -> None:
        """Redis closed the connection: pass on what it sent, then close the client the same way."""

    def upstream_full(self, full: bool) -> None:
        """Redis reads slower than the client writes (True): stop reading the client; False: go on."""


class RedisSide(asyncio.Protocol):
    """A connection the proxy opened to a Redis node: the pause/resume/close every kind shares."""

    transport: asyncio.Transport | None = None

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class UpstreamConnection(RedisSide):
    """The Redis side of one client: hands every event to its client connection."""

    def __init__(self, client: Client, buffer_limit: int) -> None:
        self.client = client
        self.buffer_limit = buffer_limit
        self.transport: asyncio.Transport | None = None
        self._spare = -1  # a duplicate of the socket's descriptor, once keep_spare() was called
        # Bound straight to the client: one Python call less per reply chunk on the hot path.
        self.data_received = client.reply_data  # type: ignore[method-assign]  # an instance attribute on purpose: one call less per reply chunk

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = self.transport = cast(asyncio.Transport, transport)  # a stream protocol: create_server/create_connection
        stream.set_write_buffer_limits(high=self.buffer_limit)

    def keep_spare(self) -> None:
        """Keep a second descriptor of this socket from now on (one more fd for this client).

        When Redis closes a connection it had unread input on (it refused a protocol error),
        the kernel answers our next write with a reset, and uvloop closes the socket on that
        write error without reading what Redis had sent before: its error reply. The spare
        descriptor keeps the socket, and those bytes, readable (Linux keeps data queued before a
        reset), so :meth:`connection_lost` can still pass them on. Taken where Redis judges
        protocol errors (the exact parser's path), not for every connection."""
        if self._spare >= 0 or self.transport is None:
            return
        if self.transport.get_extra_info("sslcontext") is not None:
            return  # TLS: the socket holds ciphertext; what TLS had decrypted was delivered already
        sock = self.transport.get_extra_info("socket")
        try:
            self._spare = os.dup(sock.fileno())
        except (OSError, AttributeError):
            self._spare = -1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._spare >= 0:
            if exc is not None:
                self._drain_spare()
            os.close(self._spare)
            self._spare = -1
        self.client.upstream_lost()  # the client then drops its reference to us (no cycle left)

    def _drain_spare(self) -> None:
        """What Redis sent before the reset, read through the spare descriptor (bounded by the
        socket's receive buffer), reaches the client before its close."""
        while True:
            try:
                data = os.read(self._spare, 256 * 1024)
            except OSError:  # nothing more (EAGAIN), or the reset itself once the data is read
                return
            if not data:
                return
            self.data_received(data)

    def eof_received(self) -> bool:
        return False  # Redis ended its side: close ours too (connection_lost follows)

    def pause_writing(self) -> None:
        self.client.upstream_full(True)

    def resume_writing(self) -> None:
        self.client.upstream_full(False)
