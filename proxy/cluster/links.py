"""One client's connection to one cluster node, and the bookkeeping of what is in flight on it.

A :class:`Place` is one client command's place in that client's reply order; a :class:`Sent` is
one command written to one node and owed a reply there. Replies come back on each node in the
order commands were written, so each :class:`NodeLink` keeps its ``Sent`` in a FIFO and gives
every frame to the head one. What to do with a reply is the client's business (:mod:`.relay`).
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from protocol import NEED_DATA
from protocol.reply_scan import Frame, ReplyError, ReplyScanner
from proxy.upstream import RedisSide

if TYPE_CHECKING:
    from proxy.cluster.relay import ClusterClientConnection
    from proxy.cluster.topology import Address

Merge = Callable[[list[bytes]], bytes]


class Tx(enum.Enum):
    """Where a transaction stands, and so where the next commands go."""

    NONE = "none"
    WATCHING = "watching"  # WATCH pinned a node, no MULTI yet
    QUEUED = "queued"  # MULTI seen, no key yet: commands are held until one names a slot
    PINNED = "pinned"  # inside MULTI, on ``tx_link``


class Resend(enum.Enum):
    """What may be done with a command whose node connection was lost before its reply (or that
    Redis refused unrun: ``TRYAGAIN``, ``CLUSTERDOWN``). Decided when the command is routed."""

    NEVER = "never"  # bound to that node or its state (transaction, fanned part, replay): fails
    IF_UNSENT = "if-unsent"  # may have an effect: resent only when Redis cannot have received it
    ALWAYS = "always"  # read-only (:data:`protocol.commands.READ_ONLY`): resent either way


class Place:
    """A client command's place in the reply order: done once ``reply`` is set.

    A split command fills ``parts`` and ``merge`` makes the reply of them. A pub/sub place is a
    ``stream``: it takes every later frame of its node and never ends (``stream_bytes`` held; the
    relay pauses the node above ``buffer_limit``).
    """

    __slots__ = ("reply", "parts", "missing", "merge", "close_after", "stream", "stream_bytes")

    def __init__(self, reply: bytes | None = None) -> None:
        self.reply = reply
        self.parts: list[bytes] | None = None
        self.missing = 0
        self.merge: Merge | None = None
        self.close_after = False
        self.stream: list[bytes] | None = None
        self.stream_bytes = 0

    def split(self, count: int, merge: Merge) -> None:
        self.parts = [b""] * count
        self.missing = count
        self.merge = merge

    def stream_in(self, raw: bytes) -> int:
        """Hold one more pub/sub frame; returns the bytes now held."""
        self.stream.append(raw)  # type: ignore[union-attr]  # streaming mode: stream is set
        self.stream_bytes += len(raw)
        return self.stream_bytes

    def stream_out(self) -> list[bytes]:
        """The frames held, in order; the place holds none after."""
        out, self.stream = self.stream or [], []
        self.stream_bytes = 0
        return out

    def fill(self, part: int, raw: bytes) -> None:
        if part < 0:
            self.reply = raw
            return
        assert self.parts is not None and self.merge is not None
        self.parts[part] = raw
        self.missing -= 1
        if self.missing == 0:
            self.reply = self.merge(self.parts)


class Sent:
    """A command written to a node: its bytes (to resend after MOVED/ASK) and where its reply goes.

    ``callback`` replaces ``place`` for the relay's own commands (ASKING, replays, probes).
    ``resend`` says whether it may be sent again elsewhere (:class:`Resend`); ``retries`` and
    ``failed_at`` (loop time of its first failure) bound how often and how long.
    """

    __slots__ = ("data", "place", "part", "slot", "redirects", "callback", "follow", "resend",
                 "retries", "failed_at")

    def __init__(self, data: bytes, place: Place | None, part: int = -1, slot: int = -1,
                 callback: Callable[[Frame], None] | None = None, follow: bool = True,
                 resend: Resend = Resend.NEVER) -> None:
        self.data = data
        self.place = place
        self.part = part
        self.slot = slot  # the key slot it was routed by; -1 for keyless (the home node)
        self.redirects = 0
        self.callback = callback
        self.follow = follow  # False inside MULTI: MOVED/ASK reach the client
        self.resend = resend
        self.retries = 0
        self.failed_at = 0.0


class NodeLink(RedisSide):
    """The connection from one client's relay to one node. Writes are buffered until connected:
    above ``buffer_limit`` bytes the client is paused (as by a full transport) until it opens."""

    def __init__(self, client: ClusterClientConnection, address: Address) -> None:
        self.client = client
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.inflight: deque[Sent] = deque()
        self.streaming: Place | None = None  # pub/sub: every frame goes to this place
        self._scanner = ReplyScanner()
        self._early: list[bytes] = []  # written, not yet drained (or the connection not open yet)
        self._waiting = 0  # bytes written before the connection opened
        #: how many ``Sent`` at the end of ``inflight`` are still in ``_early``: Redis cannot
        #: have received them, so any of them may be resent if this connection is lost
        self.unsent = 0
        self.closed = False

    @property
    def name(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def send(self, sent: Sent) -> None:
        self.inflight.append(sent)
        self.unsent += 1
        self.write(sent.data)

    def write(self, data: bytes) -> None:
        """Queue ``data``; it goes out at :meth:`drain` (the client drains after each batch, so a
        pipeline costs one write per node, not one per command)."""
        if not self._early:
            self.client.dirty.append(self)
        self._early.append(data)
        if self.transport is None:
            # Connected, _early is drained after each client read; not yet, it must be bounded.
            self._waiting += len(data)
            if self._waiting > self.client.server_state.buffer_limit:
                self.client.link_full(self, True)

    def drain(self) -> None:
        transport = self.transport
        # Closing (reset, EOF): connection_lost comes next turn; what waits stays unsent.
        if transport is not None and self._early and not transport.is_closing():
            transport.write(b"".join(self._early))
            self._early = []
            self.unsent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream protocol: create_server/create_connection
        limit = self.client.server_state.buffer_limit
        self.transport.set_write_buffer_limits(high=limit)
        if self._waiting > limit:
            self.client.link_full(self, False)  # before the write below, which may pause it again
        self._waiting = 0
        if self._early:
            self.transport.write(b"".join(self._early))
            self._early = []
            self.unsent = 0
        if self.client.writes_paused:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        scanner = self._scanner
        scanner.feed(data)
        client = self.client
        try:
            while (frame := scanner.next_frame()) is not NEED_DATA:
                if self.streaming is not None:
                    client.streamed(self, frame.raw)
                elif frame.push:
                    client.pushed(frame.raw)
                elif self.inflight:
                    client.answered(self, self.inflight.popleft(), frame)
                # else: a reply to nothing (never from a sound Redis): dropped
        except ReplyError as exc:
            # What was sent may have caused it (a reply above the limit): resend nothing sent.
            client.link_failed(self, str(exc), resend_sent=False)
            return
        client.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed:
            self.closed = True
            self.client.link_failed(self, "connection lost")

    def pause_writing(self) -> None:
        self.client.link_full(self, True)

    def resume_writing(self) -> None:
        self.client.link_full(self, False)

    def close(self) -> None:
        self.closed = True
        super().close()
