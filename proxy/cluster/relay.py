"""A client that believes it talks to one Redis, in front of a Redis Cluster.

Each client command is parsed (hiredis), routed by the slot of its keys to the master owning it,
over this client's own connection to that node (:class:`~.links.NodeLink`, opened on first use;
the AUTH / HELLO / CLIENT SETNAME the client sent are replayed on it first). Replies are framed
per node (:mod:`protocol.reply_scan`) and written to the client in command order: every command
gets a :class:`~.links.Place` in ``_order``, and the head of it goes out as soon as it is done.

Redirections never reach the client: ``MOVED`` patches the map, asks for a refresh and resends;
``ASK`` sends ``ASKING`` and the command to the node named (at most ``MAX_REDIRECTS`` per command).
Inside ``MULTI`` they are passed on: the transaction is pinned to one node, and Redis aborts it,
as it would for a cluster client.

Resending (:class:`~.links.Resend`, decided by :mod:`.routes`): a command refused unrun
(``TRYAGAIN`` during a migration, ``CLUSTERDOWN`` during a failover), or whose node connection was
lost before its reply, is resent to the current owner of its slot when that cannot run it twice:
it is read-only, or Redis never received it (still queued in the proxy, or the connection never
opened). Any other command gets ``-ERR key-evt-amqp: lost the connection to Redis node host:port
(reason)`` (it may or may not have run). Resends wait ``FIRST_RETRY_DELAY``, doubling up to
``MAX_RETRY_DELAY``, so a failover has time to show in the map; at most ``MAX_RETRIES`` times and
not later than ``RETRY_WINDOW`` after the first failure, after which the last error is the reply.
While commands wait for a resend the client is not read, so its later commands cannot overtake
them.

Which command goes where is :mod:`.routes`; this module is the per-client state machine.

Limits: at most ``MAX_ORDER`` commands waiting for their reply (client reading pauses above it,
resumes at half; while the client's transport is full, finished replies wait there too); a
pub/sub stream holds at most ``buffer_limit`` bytes before the node's reading pauses; every
node link pauses the client when its write buffer is full, or, not connected yet, when more than
``buffer_limit`` bytes wait for it; commands held after ``MULTI`` until a key names the node: at
most ``buffer_limit`` bytes (above: refused, the transaction aborted); one unparsed client command:
at most ``MAX_COMMAND_BYTES`` (above: error and close). Commands waiting for a resend are among
those in flight (so within ``MAX_ORDER``); the client is paused meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import hiredis

from protocol import NEED_DATA, ProtocolError, RequestParser, replies
from protocol.commands import encode_command
from protocol.reply_scan import Frame
from proxy.cluster import routes
from proxy.cluster.links import NodeLink, Place, Resend, Sent, Tx
from proxy.cluster.topology import Address, parse_address
from proxy.config import SECONDS
from proxy.connect import open_redis

if TYPE_CHECKING:
    from proxy.cluster.topology import Topology
    from proxy.runtime import Runtime
    from proxy.state import ServerState

log = logging.getLogger("key_evt_amqp.cluster")

MAX_ORDER = 10_000
MAX_REDIRECTS = 5
#: One client command is parsed whole before it is routed: above this (Redis's default
#: client-query-buffer-limit) unparsed, the client gets an error and is closed, as Redis closes it.
MAX_COMMAND_BYTES = 1024 * 1024 * 1024
#: Resends of one command (after a lost connection, TRYAGAIN or CLUSTERDOWN), and for how long
#: after its first failure: a kill -9 failover with cluster-node-timeout 2 s takes 3-5 s.
MAX_RETRIES = 20
RETRY_WINDOW = 10 * SECONDS
FIRST_RETRY_DELAY = 0.05 * SECONDS
MAX_RETRY_DELAY = 1 * SECONDS


class ClusterClientConnection(asyncio.Protocol):
    """One client in front of the cluster that ``topology`` maps; otherwise as
    :class:`proxy.relay.ClientConnection` (``server_state`` shared, ``runtime`` for our commands)."""

    def __init__(self, server_state: ServerState, runtime: Runtime, topology: Topology) -> None:
        self.server_state = server_state
        self.runtime = runtime
        self.topology = topology
        self.transport: asyncio.Transport | None = None
        self.links: dict[Address, NodeLink] = {}
        self.session: dict[bytes, bytes] = {}  # AUTH, HELLO, CLIENT SETNAME...: replayed per link
        self.resp3 = False
        self.tx = Tx.NONE
        self.tx_slot = -1
        self.tx_link: NodeLink | None = None
        self.tx_held: list[Sent] = []  # MULTI and what followed it, until a key names the node
        self.tx_held_bytes = 0
        self.tx_aborted = False
        self.streaming: NodeLink | None = None  # subscribed: everything goes to this node
        self.writes_paused = False
        self.dirty: list[NodeLink] = []  # links with writes queued: drained by flush()
        self.closing = False
        self._order: deque[Place] = deque()
        self._commands = hiredis.Reader(notEnoughData=NEED_DATA)
        self._inline: RequestParser | None = None
        self._seen_input = False
        self._full_links: set[NodeLink] = set()
        self._reading = True
        self._shutting = False
        self._parked: list[Sent] = []  # waiting for a resend, in the order they failed
        self._retry_timer: asyncio.TimerHandle | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = self.transport = cast(asyncio.Transport, transport)  # a stream protocol: create_server/create_connection
        stream.set_write_buffer_limits(high=self.server_state.buffer_limit)
        if not self.server_state.admit(self):
            self._close_with("ERR max number of clients reached")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server_state.forget(self)
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        for link in list(self.links.values()):
            link.close()
        self.links.clear()

    def shut_down(self) -> None:
        """Read no more; close once every reply owed is written (the server bounds the wait)."""
        self._shutting = True
        self._set_reading()
        if not self._order:
            self._close_with(None)

    def _close_with(self, message: str | None) -> None:
        self.closing = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if message is not None:
                transport.write(replies.error(message))
            transport.close()

    # -- client -> nodes -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.server_state.metrics.client_bytes_in += len(data)
        if self._inline is not None or (not self._seen_input and data[:1] != b"*"):
            self._inline_received(data)
            return
        self._seen_input = True
        reader = self._commands
        reader.feed(data)
        try:
            while (command := reader.gets()) is not NEED_DATA:
                if command.__class__ is list and command and command[0].__class__ is bytes:
                    self.command(command)
                elif command is not None and command != []:
                    raise hiredis.ProtocolError("not a multibulk of bulk strings")
                if self.closing:
                    return
        except hiredis.ProtocolError:
            self._order_local(replies.error("ERR Protocol error: invalid multibulk request")).close_after = True
        if reader.len() > MAX_COMMAND_BYTES:
            log.debug("client command above %d bytes: closed", MAX_COMMAND_BYTES)
            self._close_with(f"ERR key-evt-amqp: command larger than {MAX_COMMAND_BYTES} bytes")
            return
        self.flush()

    def _inline_received(self, data: bytes) -> None:
        """Inline commands (telnet): the exact parser, for the rest of the connection."""
        self._seen_input = True
        if self._inline is None:
            self._inline = RequestParser()
        self._inline.feed(data)
        try:
            while (request := self._inline.next_request()) is not NEED_DATA and not self.closing:
                self.command(list(request.args))
        except ProtocolError as exc:
            self._order_local(exc.reply).close_after = True
        self.flush()

    def command(self, args: list[bytes]) -> None:
        """Route one client command (``args[0]`` its name, as sent)."""
        self.server_state.metrics.commands_relayed += 1
        if self.streaming is not None:
            self.streaming.write(encode_command(*args))  # subscribed: a plain pipe to that node
            return
        routes.dispatch(self, args)

    # -- the places where replies go -----------------------------------------------------------

    def place(self) -> Place:
        place = Place()
        self._order.append(place)
        if len(self._order) > MAX_ORDER:
            self._set_reading()
        return place

    def _order_local(self, reply: bytes) -> Place:
        place = self.place()
        place.reply = reply
        return place

    def reply_local(self, reply: bytes) -> None:
        self._order_local(reply)

    def close_after_last(self) -> None:
        """Close the connection once the last reply placed so far is written (QUIT)."""
        self._order[-1].close_after = True

    def flush(self) -> None:
        """Send what is queued for the nodes; write every finished reply at the head of the order."""
        if self.dirty:
            dirty, self.dirty = self.dirty, []
            for link in dirty:
                link.drain()
        if self.writes_paused:
            # The client reads nothing now: finished replies wait in _order (MAX_ORDER stops
            # reading the client), the stream in its place (its node pauses). resume_writing flushes.
            return
        order = self._order
        if not order or order[0].reply is None and order[0].stream is None:
            return
        out = []
        close = False
        while order:
            head = order[0]
            if head.stream is not None:
                out += head.stream_out()
                if self.streaming is not None:
                    self.streaming.resume_reading()
                break
            if head.reply is None:
                break
            out.append(head.reply)
            order.popleft()
            if head.close_after:
                close = True
                break
        transport = self.transport
        if transport is not None and not transport.is_closing():
            data = b"".join(out)
            self.server_state.metrics.client_bytes_out += len(data)
            transport.write(data)
        if close or (self._shutting and not order):
            self._close_with(None)
        elif not self._reading and len(order) <= MAX_ORDER // 2:
            self._set_reading()

    # -- nodes -> client -----------------------------------------------------------------------

    def answered(self, link: NodeLink, sent: Sent, frame: Frame) -> None:
        """A node's reply to ``sent``: follow a redirection, or put it in its place."""
        if frame.error and sent.follow:
            text = frame.error_text
            if text[:6] == b"MOVED " or text[:4] == b"ASK ":
                if sent.redirects < MAX_REDIRECTS and self._redirect(sent, text):
                    return
            elif text[:9] == b"TRYAGAIN " or text[:12] == b"CLUSTERDOWN ":
                # Refused before it ran: any command may go again.
                if sent.resend is not Resend.NEVER and self._resend_later(sent):
                    return
        if sent.callback is not None:
            sent.callback(frame)
        elif sent.place is not None:
            sent.place.fill(sent.part, frame.raw)

    def _redirect(self, sent: Sent, text: bytes) -> bool:
        sent.redirects += 1
        parts = text.split(b" ")
        if len(parts) != 3:
            return False
        try:
            slot, address = int(parts[1]), parse_address(parts[2])
        except ValueError:
            return False
        if parts[0] == b"MOVED":
            self.topology.moved(slot, address)
            self.link(address).send(sent)
        else:
            target = self.link(address)
            target.send(Sent(routes.ASKING, None, callback=_ignore))
            target.send(sent)
        return True

    def _resend_later(self, sent: Sent) -> bool:
        """Park ``sent`` for the next resend round; False when its budget is spent."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if sent.retries == 0:
            sent.failed_at = now
        delay = min(FIRST_RETRY_DELAY * 2 ** sent.retries, MAX_RETRY_DELAY)
        if sent.retries >= MAX_RETRIES or now + delay - sent.failed_at > RETRY_WINDOW:
            return False
        sent.retries += 1
        self._parked.append(sent)
        if self._retry_timer is None:
            self._retry_timer = loop.call_later(delay, self._resend_parked)
            self._set_reading()
        return True

    def _resend_parked(self) -> None:
        """Each parked command to the current owner of its slot (keyless: the home node)."""
        self._retry_timer = None
        parked, self._parked = self._parked, []
        if self.closing:
            return
        for sent in parked:
            address = self.topology.owner(sent.slot) if sent.slot >= 0 else None
            self.link(address or self.home()).send(sent)
        self._set_reading()
        self.flush()

    def pushed(self, raw: bytes) -> None:
        """A RESP3 push outside pub/sub (tracking, ...): out of band, written at once."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(raw)

    def streamed(self, link: NodeLink, raw: bytes) -> None:
        place = link.streaming
        assert place is not None and place.stream is not None
        if place.stream_in(raw) > self.server_state.buffer_limit:
            link.pause_reading()  # resumed by flush() once the stream is written out

    # -- node links ----------------------------------------------------------------------------

    def home(self) -> Address:
        """Where keyless commands go: the first master (or the seed, before any map)."""
        slot_map = self.topology.map
        return slot_map.masters[0] if slot_map is not None else self.topology.seeds[0]

    def masters(self) -> tuple[Address, ...]:
        slot_map = self.topology.map
        return slot_map.masters if slot_map is not None else self.topology.seeds

    def link(self, address: Address) -> NodeLink:
        link = self.links.get(address)
        if link is None:
            link = self.links[address] = NodeLink(self, address)
            for command in self.session.values():
                link.send(Sent(command, None, callback=_ignore))
            self.server_state.spawn(self._connect(link))
        return link

    def link_for_slot(self, slot: int) -> NodeLink:
        return self.link(self.topology.owner(slot) or self.home())

    async def _connect(self, link: NodeLink) -> None:
        try:
            await open_redis(self.server_state.upstream.at(link.address), lambda: link,
                             timeout=self.server_state.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
            self.link_failed(link, f"cannot connect ({reason})")
            return
        if self.closing:
            link.close()

    def link_failed(self, link: NodeLink, reason: str, *, resend_sent: bool = True) -> None:
        """The node connection is gone: what was in flight there is resent where that is safe
        (:class:`~.links.Resend`; ``resend_sent=False``: only what never left), the rest fails
        (the client stays), the map is checked."""
        if self.links.get(link.address) is link:
            del self.links[link.address]
        link.close()
        if self.closing:
            return
        # It may have died full (no resume_writing comes after connection_lost): forget that.
        self._full_links.discard(link)
        self._set_reading()
        log.debug("node %s: %s", link.name, reason)
        self.topology.refresh_soon()
        error = replies.error(f"ERR key-evt-amqp: lost the connection to Redis node {link.name} ({reason})")
        inflight, link.inflight = link.inflight, deque()
        # A subscription or a transaction died with the connection: nothing of it is resent.
        stateless = link is not self.streaming and link is not self.tx_link
        first_unsent = len(inflight) - link.unsent
        for index, sent in enumerate(inflight):
            resend = sent.resend
            if stateless and resend is not Resend.NEVER and (
                    index >= first_unsent or (resend is Resend.ALWAYS and resend_sent)):
                if self._resend_later(sent):
                    continue
            self.answered(link, sent, Frame(error, error=True))
        if not stateless:
            # Its state (subscriptions, MULTI, WATCH) died with it: so does the client's.
            self._order_local(error).close_after = True
        self.flush()

    # -- flow control --------------------------------------------------------------------------

    def _set_reading(self) -> None:
        want = not (self._shutting or self._full_links or self._parked or len(self._order) > MAX_ORDER)
        transport = self.transport
        if transport is None or transport.is_closing() or want == self._reading:
            return
        self._reading = want
        if want:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def link_full(self, link: NodeLink, full: bool) -> None:
        if full:
            self._full_links.add(link)
        else:
            self._full_links.discard(link)
        self._set_reading()

    def pause_writing(self) -> None:
        self.writes_paused = True
        for link in self.links.values():
            link.pause_reading()

    def resume_writing(self) -> None:
        self.writes_paused = False
        limit = self.server_state.buffer_limit
        for link in self.links.values():
            if link.streaming is None or link.streaming.stream_bytes <= limit:
                link.resume_reading()
        self.flush()  # what waited; a stream above its limit resumes its node once written

    # -- transactions --------------------------------------------------------------------------

    def tx_reset(self) -> None:
        self.tx, self.tx_slot, self.tx_link, self.tx_held, self.tx_aborted = Tx.NONE, -1, None, [], False
        self.tx_held_bytes = 0

    def hold(self, sent: Sent) -> bool:
        """Keep a command of a transaction that has no node yet (:meth:`pin` sends it). Above
        ``buffer_limit`` bytes held: False, the transaction is aborted (EXEC will answer
        -EXECABORT) and only its MULTI is kept."""
        size = len(sent.data)
        if self.tx_held and self.tx_held_bytes + size > self.server_state.buffer_limit:
            log.debug("transaction above %d bytes before its first key: aborted", self.server_state.buffer_limit)
            del self.tx_held[1:]
            self.tx_held_bytes = len(self.tx_held[0].data)
            self.tx_aborted = True
            return False
        self.tx_held.append(sent)
        self.tx_held_bytes += size
        return True

    def pin(self, slot: int) -> NodeLink:
        """The transaction's node, from its first key: held commands go out first."""
        link = self.tx_link = self.link_for_slot(slot) if slot >= 0 else self.link(self.home())
        self.tx_slot = slot
        for sent in self.tx_held:
            link.send(sent)
        self.tx_held, self.tx_held_bytes = [], 0
        return link


def _ignore(frame: Frame) -> None:
    """The reply to one of the relay's own commands (ASKING, a replayed AUTH): not the client's."""

