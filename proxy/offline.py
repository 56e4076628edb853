"""Our read-only commands while Redis is unreachable: :class:`OfflineConnection`.

When a client connects and the proxy cannot reach Redis, it closes the client without a reply (as
if Redis had refused the connection: clients retry on a lost connection, not on an error). A
client on this machine (``127.0.0.0/8``, ``::1``, a unix socket) gets one exception: it may still
ask ``key_evt_amqp.info`` and ``key_evt_amqp.config_get``, the operator's first questions when
Redis is down. Authority cannot be asked of Redis then, so it is decided by where the client is:
whoever can connect from this machine may read them (the other commands change things and
still need Redis's verdict). Any other command closes the connection, without a reply, as before;
so does :data:`IDLE_TIMEOUT` without a command, a protocol error, or an unfinished command over
:data:`INPUT_LIMIT` bytes.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Protocol

import hiredis

from protocol.commands import ADMIN_PREFIX, admin_verb
from proxy import admin
from proxy.runtime import Runtime

__all__ = ["OfflineConnection", "is_local"]

IDLE_TIMEOUT = 2.0  # seconds without a command before the connection is closed
INPUT_LIMIT = 64 * 1024  # bytes of an unfinished command

_NEED_DATA = object()


class Owner(Protocol):
    """The client connection that gave up on Redis (proxy/relay.py's ClientConnection)."""

    def connection_lost(self, exc: Exception | None) -> None: ...


def is_local(transport: asyncio.BaseTransport) -> bool:
    """Whether the peer is on this machine: loopback address or unix socket."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        try:
            address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        return bool((mapped or address).is_loopback)
    return isinstance(peer, (str, bytes))  # a unix socket's peer is a path (often empty)


class OfflineConnection(asyncio.Protocol):
    """Takes over a client's transport: answers our read-only commands, closes on anything else."""

    def __init__(self, owner: Owner, runtime: Runtime, transport: asyncio.Transport) -> None:
        self.owner = owner
        self.runtime = runtime
        self.transport = transport
        self._reader = hiredis.Reader(notEnoughData=_NEED_DATA)
        self._timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._close)

    def start(self, held: list[bytes]) -> None:
        """Become the transport's protocol, handle what was read already, read on."""
        self.transport.set_protocol(self)
        for data in held:
            self.data_received(data)
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        reader = self._reader
        reader.feed(data)
        try:
            while (command := reader.gets()) is not _NEED_DATA:
                if not self._answer(command):
                    self._close()
                    return
        except hiredis.ProtocolError:  # inline commands, garbage
            self._close()
            return
        if reader.len() > INPUT_LIMIT:
            self._close()
        self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._close)

    def _answer(self, command: object) -> bool:
        if not isinstance(command, list) or not command or not isinstance(command[0], bytes):
            return False
        name = command[0]
        if name[:len(ADMIN_PREFIX)].lower() != ADMIN_PREFIX or admin_verb(name) not in admin.READ_VERBS:
            return False
        reply = admin.run(self.runtime, command, resp3=False,
                          client=admin.describe_client(self.transport) + " (Redis unreachable)")
        assert isinstance(reply, bytes)  # the read-only handlers answer at once
        self.transport.write(reply)
        return True

    def _close(self) -> None:
        self._timer.cancel()
        if not self.transport.is_closing():
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # close once the client has ended its input

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self.owner.connection_lost(exc)
