"""The fallback list in Redis: where events wait while the broker cannot take them.

An ordinary list under ``config.fallback_key`` in the upstream's db, written at the tail, read and
removed at the head (FIFO), one element per event in the format of :func:`message.dump_entry`.
Every operation here is one pipelined round trip on a private connection, reconnected on demand;
a dead Redis raises :class:`~proxy.events.errors.LinkError` and the caller retries later.

Size: ``cap > 0`` keeps the newest ``cap`` elements (``LTRIM -cap -1`` right after the push, the
oldest are dropped and counted by the caller), ``cap == 0`` is unlimited. ``cap < 0`` (off) is
handled by the caller: nothing is written then.

**The list vanishing under us.** Anyone can ``FLUSHALL``, ``DEL`` the key, evict it, or restart a
Redis without persistence. Every operation starts with an ``LLEN`` in the same round trip, so the
list's length is checked against what we know we left there before anything else:

- the whole list is gone (length 0): the in-memory copy of its tail (:data:`MIRROR_LIMIT` newest
  events, see :class:`FallbackList`) is written back where it belongs, and whatever was older than
  that copy is *lost*: counted (``metrics.fallback_lost``) and replaced by a gap marker built by
  ``on_lost(count, start_ms, end_ms)``, written in front of what is restored;
- part of it is gone (someone else popped or trimmed it): we cannot tell which elements, so the
  difference is counted as lost, a marker is written at the head, and the copy is dropped;
- either way ``on_reset()`` tells the replayer that the positions it read are void.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any

import hiredis

from proxy.config import RedisAddress
from proxy.events.errors import LinkError
from proxy.events.fencing import fenced
from proxy.events.message import Event, dump_entry, load_entry
from proxy.events.redis_link import LocatedLink
from proxy.metrics import Metrics

__all__ = ["FallbackList"]

log = logging.getLogger("key_evt_amqp.events.fallback")

PUSH_CHUNK = 1000  # elements per RPUSH/LPUSH command
OP_TIMEOUT = 10.0  # seconds for one round trip before the link counts as dead
MIRROR_LIMIT = 200_000  # newest list elements kept in memory: replayed without LRANGE, restored if lost


class FallbackList:
    """List operations; each returns what the caller needs to keep exact counts.

    The list's tail is mirrored in memory (:data:`MIRROR_LIMIT` events): what we just pushed is
    what the replayer reads next, so a read inside the mirror costs one ``LINDEX`` + ``LLEN`` to
    check that the list is still what we wrote (a unique message id at the batch's last position)
    instead of an ``LRANGE`` and a parse per element. The same copy is what is written back when
    the list vanishes (module docstring). A write by someone else, or an error reply, empties the
    mirror (it must be the list's exact tail); a new connection does not (the length check of the
    next operation tells whether the list survived).
    """

    def __init__(self, address: RedisAddress, key: bytes, connect_timeout: float,
                 locate: Callable[[], RedisAddress] | None = None,
                 on_moved: Callable[[str], None] | None = None,
                 on_lost: Callable[[int, int, int], Event | None] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.key = key
        self.connect_timeout = connect_timeout
        #: cluster mode: where the key's slot lives now (asked before each operation), and who
        #: hears about a ``MOVED`` (the topology)
        self.locate = locate
        self.link = LocatedLink(address, connect_timeout, locate)
        self.on_moved = on_moved
        #: the list vanished under us: the marker standing for ``count`` lost events (or None)
        self.on_lost = on_lost
        #: the list changed under us: positions read before are void (called before any repair);
        #: set by the list's one reader, the :class:`~proxy.events.pipeline.Pipeline`
        self.on_reset: Callable[[], None] | None = None
        #: a fleet's forwarder: ``() -> (lease key, holder)``; every list command then runs in a
        #: script that checks the lease first, so a deposed forwarder cannot touch the list
        self.fence: Callable[[], tuple[bytes, bytes] | None] = lambda: None
        self.length = 0  # as of the last operation
        self.cap = 0  # as of the last push (restoring keeps within it)
        self.mirror_reads = 0
        #: counts ``fallback_lost`` (elements that vanished and could not be written back) and
        #: ``fallback_restored`` (events written back after they vanished)
        self.metrics = metrics if metrics is not None else Metrics()
        self.epoch = 0  # +1 whenever the list changed under us
        self._head_ms: int | None = None  # timestamp of the oldest element, when known
        self._repair: tuple[bool, list[Event], int] | None = None  # (at the front?, events, restored)
        self._mirror: deque[Event] = deque()

    @property
    def address(self) -> RedisAddress:
        return self.link.address

    @property
    def last_op(self) -> float:
        """time.monotonic() of the last round trip"""
        return self.link.last_op

    async def run(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[Any]:
        """Send ``commands`` in one write and return their replies (errors as values)."""
        return await self.link.run(commands, OP_TIMEOUT)

    async def _checked(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[Any]:
        fence = self.fence()
        if fence is None:
            replies = await self.run(commands)
        else:
            (reply,) = await self.run([fenced(fence[0], fence[1], [self.key], commands)])
            replies = reply if isinstance(reply, list) else [reply]
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                text = str(reply)
                if text.startswith("FENCED"):  # the script ran nothing: the list is as it was
                    raise LinkError(f"not written: {text} (retried once the lease is back)")
                self._mirror.clear()
                if text.startswith(("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN", "READONLY")):
                    # cluster mode: the slot is elsewhere now; reconnect where the map says
                    self.link.reconnect()
                    if self.on_moved is not None:
                        self.on_moved(text)
                raise LinkError(f"Redis refused a fallback list command: {reply}")
        return replies

    def _now_length(self, length: int, expected: int) -> None:
        """Record the list length after an operation; forget the mirror if it is not as expected."""
        if length != expected:
            self._mirror.clear()
        self.length = length
        if not length:
            self._head_ms = None
        mirror = self._mirror
        while len(mirror) > min(length, MIRROR_LIMIT):
            mirror.popleft()

    # ---- the list vanishing under us -------------------------------------------------------

    def _check(self, found: int, *, front: bool = False) -> None:
        """``found`` is the list's length before this operation (its first ``LLEN``).

        Shorter than we left it: count what is gone, prepare the repair (module docstring) and
        carry on from the length found. ``front``: the operation pushes at the head, so what is
        restored goes behind it.
        """
        believed = self.length
        if found > believed:  # someone else pushed: the mirror is no longer the exact tail
            self._mirror.clear()
        if found >= believed:
            self.length = found
            return
        mirror = self._mirror
        whole = found == 0
        kept = list(mirror) if whole else []
        start = mirror[0].timestamp_ms if len(mirror) == believed and mirror else self._head_ms or 0
        if whole and self.cap > 0 and len(kept) > self.cap - 1:
            kept = kept[len(kept) - max(0, self.cap - 1):]  # room for the marker; the rest is lost
        lost = believed - found if not whole else believed - len(kept)
        mirror.clear()
        self.length = found
        self._head_ms = None
        self.epoch += 1
        if self.on_reset is not None:
            self.on_reset()
        marker = None
        if lost:
            self.metrics.fallback_lost += lost
            end = kept[0].timestamp_ms if kept else int(time.time() * 1000)
            marker = self.on_lost(lost, start, max(start, end)) if self.on_lost is not None else None
        log.log(logging.ERROR if lost else logging.WARNING,
                "the fallback list %r lost %d element(s) under us (deleted, flushed, evicted, or Redis "
                "restarted without persistence): %d restored from memory, %d lost%s", self.key,
                believed - found, len(kept), lost, "; a gap marker takes their place" if marker else "")
        events = ([marker] if marker is not None else []) + kept
        if events:
            self._repair = (not (whole and front), events, len(kept))

    async def _finish_repair(self) -> None:
        """Write back what :meth:`_check` prepared. Raises LinkError (it stays pending then)."""
        if self._repair is None:
            return
        front, events, restored = self._repair
        entries = [dump_entry(e) for e in events]
        if front:
            entries.reverse()  # LPUSH a b c leaves c b a
        verb = b"LPUSH" if front else b"RPUSH"
        before = self.length
        replies = await self._checked(
            [(verb, self.key, *entries[i:i + PUSH_CHUNK]) for i in range(0, len(entries), PUSH_CHUNK)])
        self._repair = None
        self.metrics.fallback_restored += restored
        length = replies[-1]
        expected = before + len(events)
        if length == expected:
            if not front:
                self._mirror.extend(events)
            elif len(self._mirror) == before:  # the mirror covers the whole list: it still does
                self._mirror.extendleft(reversed(events))
        self._now_length(length, expected)

    async def _try_repair(self) -> None:
        """After an operation: write back now if we can, else at the start of the next one."""
        try:
            await self._finish_repair()
        except LinkError as exc:
            log.warning("writing back the lost fallback list failed (retrying): %s", exc)

    # ---- operations ----------------------------------------------------------------------------

    async def push(self, events: Sequence[Event], cap: int, *, front: bool = False) -> int:
        """Append (or, with ``front``, put before the head, keeping their order) and apply the cap.

        Returns how many of the oldest elements the cap dropped.
        """
        if not events:
            return 0
        await self._finish_repair()
        self.cap = cap
        entries = [dump_entry(e) for e in events]
        if front:
            entries.reverse()  # LPUSH a b c leaves c b a: reverse to keep the order
        verb = b"LPUSH" if front else b"RPUSH"
        commands: list[Sequence[bytes | str | int]] = [(b"LLEN", self.key)]
        commands += [(verb, self.key, *entries[i:i + PUSH_CHUNK]) for i in range(0, len(entries), PUSH_CHUNK)]
        trim = cap > 0 and self.length + len(entries) > cap
        if trim:
            commands.append((b"LTRIM", self.key, -cap, -1))
        replies = await self._checked(commands)
        self._check(replies[0], front=front)
        if not self.length:
            self._head_ms = events[0].timestamp_ms
        expected = self.length + len(entries)
        length = replies[len(commands) - 2 if trim else -1]
        if length == expected:
            if not front:
                self._mirror.extend(events)
            elif len(self._mirror) == self.length:
                self._mirror.extendleft(reversed(events))
        dropped = max(0, length - cap) if trim else 0
        self._now_length(length - dropped, expected - dropped)
        await self._try_repair()
        return dropped

    async def read(self, offset: int, count: int, now_ms: int) -> list[Event | None]:
        """Up to ``count`` events starting ``offset`` elements after the head; None stands for an
        element that is not an event (see :func:`message.load_entry`).

        When the list changed under us meanwhile, :attr:`epoch` changes and ``offset`` is void:
        the caller must read again from where it now stands.
        """
        await self._finish_repair()
        mirror = self._mirror
        start = self.length - len(mirror)
        if mirror and offset >= start and offset < self.length:
            first = offset - start
            events = list(islice(mirror, first, first + count))
            last = offset + len(events) - 1
            entry, length = await self._checked([(b"LINDEX", self.key, last), (b"LLEN", self.key)])
            if length == self.length and entry == dump_entry(events[-1]):
                self.mirror_reads += 1
                return list[Event | None](events)
            epoch = self.epoch
            self._check(length)
            if self.epoch != epoch:
                await self._try_repair()
                return []
            self._now_length(length, -1)  # not what we wrote: read it from Redis
        epoch = self.epoch
        length, entries = await self._checked([(b"LLEN", self.key),
                                               (b"LRANGE", self.key, offset, offset + count - 1)])
        self._check(length)
        if self.epoch != epoch:
            await self._try_repair()
            return []
        out = [load_entry(entry, now_ms) for entry in entries]
        if offset == 0 and out and out[0] is not None and not out[0].message_id.startswith(b"legacy-"):
            self._head_ms = out[0].timestamp_ms
        return out

    async def remove(self, count: int) -> None:
        """Drop the ``count`` oldest elements (after the broker confirmed them)."""
        if count <= 0:
            return
        await self._finish_repair()
        found, _, length = await self._checked([(b"LLEN", self.key), (b"LTRIM", self.key, count, -1),
                                                (b"LLEN", self.key)])
        if found < self.length:
            # Something vanished before our LTRIM. The ``count`` confirmed events are not lost
            # whatever happened to them: compare what is left with what should be left.
            mirror = self._mirror
            for _ in range(min(len(mirror), max(0, count - (self.length - len(mirror))))):
                mirror.popleft()
            self.length = max(0, self.length - count)
            self._check(length)
            await self._try_repair()
            return
        self._check(found)
        self._now_length(length, max(0, self.length - count))

    async def refresh_length(self) -> int:
        """The list's length now (and whether it vanished under us: see the module docstring)."""
        await self._finish_repair()
        (length,) = await self._checked([(b"LLEN", self.key)])
        self._check(length)
        self._now_length(length, self.length)
        await self._try_repair()
        return self.length

    def close(self) -> None:
        self.link.close()
