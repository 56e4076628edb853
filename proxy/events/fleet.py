"""Several instances, one forwarder: the lease, the checkpoints and the takeover.

Every instance in front of one Redis (or cluster) subscribes to the keyspace events; exactly one,
the **forwarder**, publishes them. The others are **standbys**: they keep the events the forwarder
has not yet made safe (:class:`~proxy.events.stream.StandbyBuffer`), so that whoever takes over
publishes exactly what the old forwarder had not got confirmed. ``docs/fleet.md`` has the protocol
and the argument for why no event is lost; in short:

- **Lease.** A key beside the fallback list (:class:`FleetKeys`), taken with a script that does
  ``SET NX PX`` and hands out a **fencing token** (``INCR``); renewed every :data:`RENEW_EVERY`
  by compare-and-extend. The forwarder trusts its lease for :data:`TRUST` of the TTL after it
  *sent* the last successful renewal (monotonic clock): before each write to the broker it checks
  that (:meth:`Fleet.may_publish`), so a forwarder that was frozen and lost the lease publishes at
  most the one batch it was writing when it froze. Everything it writes to Redis for the pipeline
  (fallback list, checkpoints, markers) runs in a script that first checks the lease's holder.
- **Checkpoints.** The forwarder PUBLISHes a marker every :data:`CHECKPOINT_EVERY` while events
  flow. It lands at the same place in every instance's stream. Once every event before it is
  confirmed or stored in the list, the marker is *done*: recorded in Redis (fenced) and announced
  in the next marker, and standbys drop what is before it.
- **Takeover.** A standby that takes the lease reads the done markers, waits until its own stream
  has reached them, and publishes its buffer after them (a gap marker first when it cannot prove
  it holds everything since). Message ids are stream positions (``stream.py``), so the events the
  old forwarder had published but not made safe come out again with the same ids.
- **Handover.** On SIGTERM the forwarder sends a handover marker, forwards up to it, makes
  everything before it safe, records it as done and deletes the lease in one script: the standby
  that takes over publishes exactly what follows.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis

from proxy.errors import check_cancelled, stopped
from proxy.events.errors import LinkError
from proxy.events.fencing import Command, fenced
from proxy.events.message import Event, gap_event
from proxy.events.redis_link import LocatedLink
from proxy.events.stream import MARKER_CHANNEL, Cursor, Marker, Order, StandbyBuffer, Takeover

__all__ = ["Fleet", "FleetKeys", "Role", "Stream"]

log = logging.getLogger("key_evt_amqp.fleet")

LEASE_TTL_MS = 3000
RENEW_EVERY = 0.5  # seconds between renewals by the forwarder
ACQUIRE_EVERY = 0.25  # seconds between attempts of a standby
HANDOVER_POLL = 0.02  # seconds between attempts after a handover marker
TRUST = 0.75  # share of the TTL the forwarder trusts its lease after sending a renewal
CHECKPOINT_EVERY = 0.1  # seconds between markers while events flow
DONE_EVERY = 0.02  # seconds between checks for markers whose events are all safe now
IDLE_MARKER_EVERY = 1.0  # seconds between markers when nothing flows
DONE_WAIT = 1.0  # seconds a new forwarder waits for the done markers to reach its own streams
HANDOVER_WAIT = 2.0  # seconds a stopping forwarder waits for its handover marker
MEMBER_EVERY = 1.0  # seconds between heartbeats
MEMBER_ALIVE_MS = 5000  # a member whose heartbeat is older is not shown (nor handed over to)
MEMBER_FORGET_MS = 60_000  # ... and one older than this is deleted
#: A standby that cannot prove it holds everything since the done checkpoints (it started or
#: resubscribed after them) leaves a free lease this long to a standby that can.
UNREADY_GRACE = 1.0
STANDBY_LIMIT = 100_000  # events a standby keeps per stream (the oldest are dropped past it)
OP_TIMEOUT = 5.0

# KEYS: lease, token, done. ARGV: owner, ttl ms, the highest token the caller has seen (the
# counter may have been flushed: tokens must keep growing). Returns {token, done...} or
# {0, holder, pttl}.
_ACQUIRE = b"""
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
end
local t = redis.call('INCR', KEYS[2])
if t <= tonumber(ARGV[3]) then
  t = tonumber(ARGV[3]) + 1
  redis.call('SET', KEYS[2], t)
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. t, 'PX', ARGV[2])
return {t, redis.call('HGETALL', KEYS[3])}
"""
# KEYS: lease, done. {PTTL of the lease (-2: free), number of done records}.
_PEEK = b"return {redis.call('PTTL', KEYS[1]), redis.call('HLEN', KEYS[2])}"
# KEYS: lease. ARGV: holder value, ttl ms. 1 renewed, 0 no lease, -1 someone else's.
_RENEW = b"""
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not v then return 0 end
return -1
"""
class Role(enum.Enum):
    STANDBY = "standby"
    FORWARDER = "forwarder"
    STOPPED = "stopped"


class FleetKeys:
    """The fleet's keys, beside the fallback list (its hash tag in cluster mode)."""

    __slots__ = ("lease", "token", "done", "members")

    def __init__(self, list_key: bytes) -> None:
        start = list_key.find(b"{")
        end = list_key.find(b"}", start + 1) if start >= 0 else -1
        base = list_key[start:end + 1] if start >= 0 and end > start + 1 else list_key
        self.lease = base + b":fleet:lease"
        self.token = base + b":fleet:token"
        self.done = base + b":fleet:done"
        self.members = base + b":fleet:members"


class Stream:
    """One event stream (a single Redis, or one master): the cursor, the standby buffer, the
    checkpoints waiting to be done, and the done marker."""

    __slots__ = ("tag", "cursor", "buffer", "checkpoints", "done", "done_ms", "handover", "ended", "live")

    def __init__(self, tag: bytes, provisional: bytes, limit: int) -> None:
        self.tag = tag
        self.cursor = Cursor(tag, provisional)
        self.buffer = StandbyBuffer(limit)
        self.checkpoints: deque[tuple[Marker, int]] = deque()  # (marker, pipeline seq at it)
        self.done: Order | None = None
        self.done_ms = 0
        self.handover: Marker | None = None  # our handover marker, once seen here
        self.ended = False  # handing over: what follows the handover marker is the next one's
        self.live = True  # False once its source is retired (cluster failover): no markers come

    @property
    def field(self) -> bytes:
        return self.tag or b"-"


class Fleet:
    """The role of this instance, per fleet (one lease for all streams of a Redis or cluster).

    ``link`` reaches the node that holds the fleet's keys (beside the fallback list), on a
    connection of the fleet's own: a renewal never waits behind the list's traffic. ``pipeline`` and ``publisher`` are the service's; ``promote(takeovers)`` and
    ``demote()`` are the service's hooks to start and abandon its pipeline.
    """

    def __init__(self, keys: FleetKeys, list_key: bytes, link: LocatedLink, *, listen: str, version: str,
                 promote: Callable[[list[tuple[Stream, Takeover]]], None], demote: Callable[[], None],
                 safe_seq: Callable[[], int], accepted_seq: Callable[[], int],
                 standby_limit: int = STANDBY_LIMIT) -> None:
        self.keys = keys
        self.list_key = list_key
        self.link = link
        self.listen = listen
        self.version = version
        self.promote = promote
        self.demote_hook = demote
        self.safe_seq = safe_seq
        self.accepted_seq = accepted_seq
        self.standby_limit = standby_limit
        worker = os.environ.get("KEY_EVT_AMQP_WORKER", "")
        self.instance = f"{socket.gethostname()}-{os.getpid()}{'-w' + worker if worker else ''}-{secrets.token_hex(2)}"
        self.provisional = b"p" + secrets.token_hex(4).encode()
        self.role = Role.STANDBY
        self.token = 0
        self.holder = b""
        self.salt = b""
        self.k = 0
        self.trusted_until = 0.0  # time.monotonic() until which the lease is ours for sure
        self.acquired_at = 0.0
        self.takeovers = 0
        self.demotions = 0
        self.markers_sent = 0
        self.lease_holder = ""
        self.lease_pttl = -2
        self.last_takeover_ms = 0  # how long the last takeover took, lease to first publish
        self.last_error = ""
        self.last_error_ms = 0
        self.last_error_current = False
        self.streams: dict[bytes, Stream] = {}
        self.started = time.time()
        self.since_marker = 0
        self._last_marker = 0.0
        self._handover_seen = 0.0  # time.monotonic() a handover marker of another was seen
        self._free_since: float | None = None  # an unready standby saw the lease free since then
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._beat_now = asyncio.Event()  # the role changed: tell the member list at once

    # ---- streams ------------------------------------------------------------------------------

    def stream(self, tag: bytes) -> Stream:
        stream = self.streams.get(tag)
        if stream is None:
            stream = self.streams[tag] = Stream(tag, self.provisional, self.standby_limit)
        return stream

    def drop_stream(self, tag: bytes) -> None:
        self.streams.pop(tag, None)

    @property
    def forwarding(self) -> bool:
        return self.role is Role.FORWARDER

    def may_publish(self) -> bool:
        """True while the lease is surely ours: checked before each write to the broker."""
        return self.role is Role.FORWARDER and time.monotonic() < self.trusted_until

    def fence(self) -> tuple[bytes, bytes] | None:
        """``(lease key, holder)`` for fenced writes while forwarding, else None."""
        return (self.keys.lease, self.holder) if self.role is Role.FORWARDER else None

    # ---- the stream ---------------------------------------------------------------------------

    def on_marker(self, stream: Stream, payload: bytes) -> None:
        """A message on the marker channel, in ``stream`` at its place."""
        marker = Marker.parse(payload)
        if marker is None:
            return
        stream.cursor.at(marker)
        done = marker.done.get(stream.tag)
        if self.role is Role.FORWARDER:
            if marker.token == self.token and marker.handover:
                stream.handover = marker
                stream.ended = True
                self._wake.set()
            else:
                stream.checkpoints.append((marker, self.accepted_seq()))
            return
        buffer = stream.buffer
        buffer.add_marker(marker)
        if done is not None:
            buffer.trim(done)
            if stream.done is None or done > stream.done:
                stream.done, stream.done_ms = done, marker.ms
        if marker.handover:
            self._handover_seen = time.monotonic()
            self._wake.set()

    # ---- life-cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._lease_loop(), name="fleet-lease"),
                       loop.create_task(self._checkpoint_loop(), name="fleet-checkpoints"),
                       loop.create_task(self._member_loop(), name="fleet-members")]

    async def stop_tasks(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await stopped(self._tasks)
        self._tasks = []

    async def begin_handover(self) -> bool:
        """SIGTERM while forwarding: send the handover marker and wait until every stream has
        reached it (events after it are left to the next forwarder). False when there is nobody
        to hand over to, or the marker could not be sent: stop as a lone instance then."""
        if self.role is not Role.FORWARDER or not self.streams:
            return False
        try:
            if not await self._others_alive():
                return False
            await self._send_marker(handover=True)
        except LinkError as exc:
            log.warning("handover: cannot send the handover marker (%s); stopping without one", exc)
            return False
        deadline = time.monotonic() + HANDOVER_WAIT
        live = [s for s in self.streams.values() if s.live]
        while not all(s.ended for s in live) and time.monotonic() < deadline:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 0.05)
            except asyncio.TimeoutError:
                pass
        if not all(s.ended for s in live):
            log.warning("handover: the handover marker did not come back on every stream in %.1fs",
                        HANDOVER_WAIT)
            for stream in self.streams.values():
                stream.ended = False
            return False
        return True

    async def finish(self, handed_over: bool, all_safe: bool) -> None:
        """The pipeline stopped. Record the handover marker as done (when everything before it is
        safe) and give the lease up, in one fenced script; then leave the member list."""
        await self.stop_tasks()
        commands: list[Command] = []
        if self.role is Role.FORWARDER:
            if handed_over and all_safe:
                for stream in self.streams.values():
                    if stream.handover is not None:
                        commands.append(self._done_command(stream, stream.handover))
            elif all_safe:
                # Nobody takes over at once: everything read is safe, and what comes until the
                # next instance subscribes is lost; its gap marker starts now, not at the last
                # checkpoint (a done marker no one holds, with the time of this stop).
                now = int(time.time() * 1000)
                for stream in self.streams.values():
                    end = Marker(self.token, self.k + 1, self.salt, now)
                    commands.append(self._done_command(stream, end, end=True))
            commands.append((b"DEL", self.keys.lease))
            try:
                await self._fenced(commands)
                log.info("fleet: lease released%s", " after a handover" if handed_over and all_safe else "")
            except LinkError as exc:
                log.warning("fleet: could not release the lease (%s); it lapses in %d ms", exc, LEASE_TTL_MS)
        try:
            await self.link.run([(b"HDEL", self.keys.members, self.instance)], 1.0)
        except (LinkError, asyncio.TimeoutError):
            pass
        self.link.close()
        self.role = Role.STOPPED

    # ---- the lease ----------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        while not self._stopping:
            check_cancelled()
            try:
                if self.role is Role.FORWARDER:
                    await self._renew()
                else:
                    await self._try_acquire()
                self.last_error_current = False
            except LinkError as exc:
                self._note_error(f"fleet lease: {exc}")
            except Exception:  # a bug must not end the fleet's loop
                log.exception("fleet: lease loop failed; retrying")
            if self.role is Role.FORWARDER:
                delay = RENEW_EVERY
            elif time.monotonic() - self._handover_seen < 2 * HANDOVER_WAIT + LEASE_TTL_MS / 1000:
                delay = HANDOVER_POLL
            else:
                delay = ACQUIRE_EVERY
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _request(self, commands: Sequence[Command]) -> list[Any]:
        return await self.link.run(commands, OP_TIMEOUT)

    def _ready(self) -> bool:
        """True when every live stream's buffer starts at its done checkpoint, with no hole: this
        standby can publish exactly what the last forwarder left (stream.py, ``takeover``)."""
        for stream in self.streams.values():
            entries = stream.buffer.entries
            if not stream.live:
                continue
            if (stream.done is None or stream.buffer.hole is not None or not entries
                    or not isinstance(entries[0], Marker) or entries[0].order != stream.done):
                return False
        return True

    async def _try_acquire(self) -> None:
        if not self._ready():
            (peek,) = await self._request([(b"EVAL", _PEEK, 2, self.keys.lease, self.keys.done)])
            if isinstance(peek, hiredis.ReplyError):
                raise LinkError(f"lease script refused: {peek}")
            pttl, records = int(peek[0]), int(peek[1])
            now = time.monotonic()
            if pttl != -2:
                self._free_since = None
                self.lease_pttl = pttl
                return
            if records:  # a fleet ran here: let a standby that holds its checkpoint go first
                if self._free_since is None:
                    self._free_since = now
                if now - self._free_since < UNREADY_GRACE:
                    return
        self._free_since = None
        sent = time.monotonic()
        (reply,) = await self._request([self._acquire_command()])
        if isinstance(reply, hiredis.ReplyError):
            raise LinkError(f"lease script refused: {reply}")
        if not reply[0]:
            self.lease_holder = (reply[1] or b"").decode("utf-8", "replace")
            self.lease_pttl = int(reply[2])
            return
        token = int(reply[0])
        flat = reply[1]
        done = {}
        ended = set()  # streams whose last forwarder stopped alone: nobody will see that marker
        for i in range(0, len(flat) - 1, 2):
            parts = flat[i + 1].split(b".")
            try:
                done[flat[i]] = ((int(parts[0]), int(parts[1])), int(parts[2]))
            except (IndexError, ValueError):
                continue
            if parts[3:] == [b"end"]:
                ended.add(flat[i])
        self.token, self.holder = token, b"%b %d" % (self.instance.encode(), token)
        self.trusted_until = sent + TRUST * LEASE_TTL_MS / 1000
        self.acquired_at = time.monotonic()
        self.lease_holder, self.lease_pttl = self.holder.decode(), LEASE_TTL_MS
        await self._take_over(done, ended)

    def _acquire_command(self) -> Command:
        seen = max([self.token] + [s.cursor.last.token for s in self.streams.values() if s.cursor.last])
        return (b"EVAL", _ACQUIRE, 3, self.keys.lease, self.keys.token, self.keys.done, self.instance,
                LEASE_TTL_MS, seen)

    async def _take_over(self, done: dict[bytes, tuple[Order, int]], ended: set[bytes]) -> None:
        """Wait (bounded) until each stream has reached its done marker, then publish after it."""
        deadline = time.monotonic() + DONE_WAIT
        while time.monotonic() < deadline:
            behind = [s for s in self.streams.values()
                      if s.live and s.field in done and s.field not in ended and (s.cursor.last is None or s.cursor.last.order < done[s.field][0])]
            if not behind:
                break
            await asyncio.sleep(0.01)
        if time.monotonic() - self.acquired_at > RENEW_EVERY:  # the wait took a while: still ours?
            sent = time.monotonic()
            (reply,) = await self._request([(b"EVAL", _RENEW, 1, self.keys.lease, self.holder, LEASE_TTL_MS)])
            if reply != 1:
                log.warning("fleet: the lease was lost while taking over; staying a standby")
                return
            self.trusted_until = sent + TRUST * LEASE_TTL_MS / 1000
        now = int(time.time() * 1000)
        takeovers: list[tuple[Stream, Takeover]] = []
        for stream in self.streams.values():
            order, ms = done.get(stream.field, (None, 0))
            takeover = stream.buffer.takeover(order, ms, now)
            stream.buffer = StandbyBuffer(self.standby_limit)
            stream.checkpoints.clear()
            stream.done, stream.done_ms = order, ms
            takeovers.append((stream, takeover))
        self.salt = secrets.token_hex(4).encode()
        self.k = 0
        self.role = Role.FORWARDER
        self._beat_now.set()
        self.takeovers += 1
        self.promote(takeovers)
        self.last_takeover_ms = int((time.monotonic() - self.acquired_at) * 1000)
        backlog = sum(len(t.events) for _, t in takeovers)
        gaps = sum(1 for _, t in takeovers if t.gap is not None)
        log.info("fleet: this instance (%s) is the forwarder now (token %d); %d buffered event(s) "
                 "published after the done marker%s", self.instance, self.token, backlog,
                 f", {gaps} gap marker(s) for what could not be proven" if gaps else "")
        self._wake.set()

    async def _renew(self) -> None:
        sent = time.monotonic()
        (reply,) = await self._request([(b"EVAL", _RENEW, 1, self.keys.lease, self.holder, LEASE_TTL_MS)])
        if isinstance(reply, hiredis.ReplyError):
            raise LinkError(f"lease script refused: {reply}")
        if reply == 1:
            self.trusted_until = sent + TRUST * LEASE_TTL_MS / 1000
            self.lease_pttl = LEASE_TTL_MS
            return
        if reply == 0:
            # The lease vanished (FLUSHALL, or it lapsed while nobody else wanted it): take it
            # again with a new token; nothing was published by anyone else meanwhile.
            (again,) = await self._request([self._acquire_command()])
            if not isinstance(again, hiredis.ReplyError) and again[0]:
                self.token = int(again[0])
                self.holder = b"%b %d" % (self.instance.encode(), self.token)
                self.trusted_until = sent + TRUST * LEASE_TTL_MS / 1000
                self.lease_holder = self.holder.decode()
                log.warning("fleet: the lease had vanished; taken again (token %d)", self.token)
                return
        self._demote("the lease belongs to another instance now")

    def _demote(self, why: str) -> None:
        if self.role is not Role.FORWARDER:
            return
        log.warning("fleet: no longer the forwarder (%s): stopped publishing; what was not confirmed "
                    "is the new forwarder's to publish", why)
        self.role = Role.STANDBY
        self._beat_now.set()
        self.demotions += 1
        self.trusted_until = 0.0
        for stream in self.streams.values():
            stream.buffer = StandbyBuffer(self.standby_limit)
            stream.checkpoints.clear()
            stream.handover = None
            stream.ended = False
        self.demote_hook()

    # ---- checkpoints ----------------------------------------------------------------------------

    async def _checkpoint_loop(self) -> None:
        """Every :data:`DONE_EVERY`: record the markers whose events are all safe now (so that at
        most the events since the newest marker come twice after a crash); every
        :data:`CHECKPOINT_EVERY` while events flow (:data:`IDLE_MARKER_EVERY` otherwise): send
        the next marker, announcing the done ones to the standbys."""
        while not self._stopping:
            check_cancelled()
            await asyncio.sleep(DONE_EVERY)
            if self.role is not Role.FORWARDER or any(s.ended for s in self.streams.values()):
                continue
            if not self.may_publish():
                continue  # the renewal is late: write nothing until it is back
            now = time.monotonic()
            try:
                if now - self._last_marker >= (CHECKPOINT_EVERY if self.since_marker else IDLE_MARKER_EVERY):
                    await self._send_marker()
                else:
                    done = self._advance_done()
                    if done:
                        await self._fenced(done)
            except LinkError as exc:
                self._note_error(f"fleet checkpoint: {exc}")
                if "FENCED" in str(exc):
                    # the lease is gone (FLUSHALL: then it is taken again) or someone else's:
                    # the lease loop finds out now (one loop does it, never two at once)
                    self._wake.set()

    def _advance_done(self) -> list[Command]:
        safe = self.safe_seq()
        commands: list[Command] = []
        for stream in self.streams.values():
            newest: Marker | None = None
            while stream.checkpoints and stream.checkpoints[0][1] <= safe:
                newest = stream.checkpoints.popleft()[0]
            if newest is not None:
                stream.done, stream.done_ms = newest.order, newest.ms
                commands.append(self._done_command(stream, newest))
        return commands

    def _done_command(self, stream: Stream, marker: Marker, end: bool = False) -> Command:
        value = b"%d.%d.%d" % (marker.token, marker.k, marker.ms)
        return (b"HSET", self.keys.done, stream.field, value + b".end" if end else value)

    async def _send_marker(self, handover: bool = False) -> None:
        commands = self._advance_done()
        self.k += 1
        done = {s.tag: s.done for s in self.streams.values() if s.done is not None}
        marker = Marker(self.token, self.k, self.salt, int(time.time() * 1000), handover, done)
        commands.append((b"PUBLISH", MARKER_CHANNEL, marker.encode()))
        self.since_marker = 0
        self._last_marker = time.monotonic()
        await self._fenced(commands)
        self.markers_sent += 1

    async def _fenced(self, commands: Sequence[Command]) -> list[Any]:
        (reply,) = await self._request([fenced(self.keys.lease, self.holder, [self.keys.done, self.list_key],
                                               commands)])
        if isinstance(reply, hiredis.ReplyError):
            raise LinkError(str(reply))
        return list(reply)

    # ---- members ------------------------------------------------------------------------------

    async def _member_loop(self) -> None:
        beats = 0
        while not self._stopping:
            check_cancelled()
            self._beat_now.clear()  # before reading the role: a change from now on beats again
            try:
                now = int(time.time() * 1000)
                record = (f"role={self.role.value} listen={self.listen} version={self.version} "
                          f"started_ms={int(self.started * 1000)} seen_ms={now}").encode()
                commands: list[Command] = [(b"HSET", self.keys.members, self.instance, record)]
                await self._request(commands)
                beats += 1
                if beats % 30 == 1:
                    await self._forget_old(now)
            except (LinkError, asyncio.TimeoutError):
                pass
            except Exception:
                log.exception("fleet: heartbeat failed")
            try:
                await asyncio.wait_for(self._beat_now.wait(), MEMBER_EVERY)
            except asyncio.TimeoutError:
                pass

    async def members(self) -> list[dict[str, str]]:
        """The live instances, from their heartbeats (the newest first)."""
        (flat,) = await self._request([(b"HGETALL", self.keys.members)])
        now = int(time.time() * 1000)
        out: list[dict[str, str]] = []
        if isinstance(flat, hiredis.ReplyError):
            raise LinkError(str(flat))
        for i in range(0, len(flat) - 1, 2):
            fields = dict(item.split("=", 1) for item in flat[i + 1].decode("utf-8", "replace").split()
                          if "=" in item)
            try:
                seen = int(fields.get("seen_ms", "0"))
            except ValueError:
                continue
            if now - seen <= MEMBER_ALIVE_MS:
                out.append({"id": flat[i].decode("utf-8", "replace"), **fields})
        return out

    async def _others_alive(self) -> bool:
        return any(m["id"] != self.instance and m.get("role") != Role.STOPPED.value
                   for m in await self.members())

    async def _forget_old(self, now: int) -> None:
        (flat,) = await self._request([(b"HGETALL", self.keys.members)])
        if isinstance(flat, hiredis.ReplyError):
            return
        old = []
        for i in range(0, len(flat) - 1, 2):
            seen = flat[i + 1].rpartition(b"seen_ms=")[2]
            if not seen.isdigit() or now - int(seen) > MEMBER_FORGET_MS:
                old.append(flat[i])
        if old:
            await self._request([(b"HDEL", self.keys.members, *old)])

    # ---- visibility -------------------------------------------------------------------------------

    def info(self) -> dict[str, object]:
        now = int(time.time() * 1000)
        streams = self.streams.values()
        dones = [s.done_ms for s in streams if s.done_ms]
        return {
            "fleet_instance": self.instance,
            "fleet_role": self.role.value,
            "fleet_token": self.token if self.role is Role.FORWARDER else 0,
            "fleet_lease_holder": self.lease_holder,
            "fleet_lease_age_ms": int((time.monotonic() - self.acquired_at) * 1000)
            if self.role is Role.FORWARDER else 0,
            "fleet_takeovers": self.takeovers,
            "fleet_demotions": self.demotions,
            "fleet_last_takeover_ms": self.last_takeover_ms,
            "fleet_markers_sent": self.markers_sent,
            "fleet_checkpoint_lag_ms": now - min(dones) if dones else -1,
            "fleet_standby_buffer": sum(s.buffer.events for s in streams),
            "fleet_standby_dropped": sum(s.buffer.dropped for s in streams),
        }

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("%s", message)
        self.last_error, self.last_error_ms, self.last_error_current = message, int(time.time() * 1000), True


def gap_for(takeover: Takeover, source: bytes, headers: tuple[tuple[bytes, bytes], ...],
            message_id: bytes) -> Event | None:
    """The gap marker a takeover starts with, if it needs one."""
    if takeover.gap is None:
        return None
    start, end = takeover.gap
    return gap_event(message_id, int(time.time() * 1000), start, end, source,
                     headers + ((b"reason", b"takeover"),))
