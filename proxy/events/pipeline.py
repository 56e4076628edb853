"""Routing between the source, the broker and the fallback list, in Redis's order.

One rule keeps the order: **while the fallback list may hold events, the replayer is the only
publisher**. Three modes (one at a time, see :class:`Mode`):

- ``DIRECT``: the list is empty; each accepted event is published at once.
- ``SPILLING``: the list is (or may be) in use; new events queue behind it (``spill`` buffer,
  written to the list tail by the pump); the pump replays the list head in batches and removes
  a batch only after the broker confirmed every event in it.
- ``HOLDING``: the list is about to be empty (the replayer reached its tail, or nothing is stored
  and the broker is still connecting): new events wait in memory and are published as soon as
  the last replay batch is confirmed (or the broker is up), then the mode is ``DIRECT``.

Failures: a direct event that fails (nack, return, timeout, lost connection) is older than all
that is stored, so it is put back at the list *head*, once no direct event is in flight any more
(the pump waits for that before it replays). A failed replay batch stays in the list, except its
confirmed prefix; replay resumes after a backoff.

Limits and overflow (each with its counter):
- ``spill``: at most :data:`SPILL_LIMIT` events waiting to be written to the list; past it new
  events are dropped (``dropped_overflow``). It only fills when Redis itself cannot take writes.
- ``hold``: at most ``publish_window`` events; past it they go to ``spill`` (mode ``SPILLING``).
- the list: ``fallback_size`` (> 0 drops the oldest: ``dropped_cap``; < 0 stores nothing:
  ``dropped_off``).
- in flight: ``publish_window`` (:class:`~proxy.events.publisher.AmqpPublisher`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from itertools import islice

from proxy.errors import check_cancelled, stopped
from proxy.events.errors import LinkError
from proxy.events.fallback import FallbackList
from proxy.events.message import Event
from proxy.events.publisher import AmqpPublisher, BrokerState, InFlight
from proxy.live import LiveConfig
from proxy.metrics import Metrics
from proxy.ratelog import RateLimitedLog

__all__ = ["Mode", "Pipeline"]

log = logging.getLogger("key_evt_amqp.events.pipeline")

SPILL_LIMIT = 200_000  # events waiting to be written to the list
SPILL_CHUNK = 5000  # events per list write
REPLAY_BATCH = 1000  # list elements per replay batch (also capped by half the window)
REPLAY_BATCHES = 2  # replay batches in flight at once
RETRY_MIN = 0.5  # seconds before replaying again after a failed batch
RETRY_MAX = 10.0
TICK = 1.0  # the pump wakes at least this often
LIST_CHECK = 1.0  # seconds without a list operation before its length is checked (it may vanish)


class Mode(enum.Enum):
    DIRECT = "direct"
    HOLDING = "holding"
    SPILLING = "spilling"


class ReplayBatch:
    """Elements read from the list head (``n`` of them, ``events[i]`` None for skipped ones)."""

    __slots__ = ("n", "trimmed", "ok", "outstanding", "failed", "abandoned", "published")

    def __init__(self, n: int) -> None:
        self.n = n
        self.trimmed = 0  # how many of its elements the cap removed meanwhile
        self.ok = [True] * n  # per element: confirmed (or skipped); False until the ack
        self.outstanding = 0
        self.failed = False
        self.abandoned = False
        self.published = 0

    @property
    def done(self) -> bool:
        return self.failed or self.outstanding == 0

    def confirmed_prefix(self) -> int:
        for i, ok in enumerate(self.ok):
            if not ok:
                return i
        return self.n


def now_ms() -> int:
    return int(time.time() * 1000)


class Pipeline:
    """Accepts events (:meth:`accept`, never blocks) and delivers them; run :meth:`start` first."""

    def __init__(self, live: LiveConfig, publisher: AmqpPublisher, fallback: FallbackList,
                 metrics: Metrics | None = None) -> None:
        self.live = live
        self.metrics = metrics if metrics is not None else Metrics()
        self.publisher = publisher
        self.fallback = fallback
        self.mode = Mode.SPILLING  # until the pump has seen the list empty
        self.spill: deque[Event] = deque()
        self.hold: deque[Event] = deque()
        self.failed_direct: list[Event] = []
        self.direct_in_flight = 0
        self.batches: deque[ReplayBatch] = deque()
        self.abandoned_outstanding = 0
        self.list_known_empty = False
        self.last_error = ""
        self.last_error_ms = 0  # when it last happened (Unix ms)
        self.last_error_current = False  # until the fallback list answers again
        self._rlog = RateLimitedLog(log)
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._retry_delay = RETRY_MIN
        self.seq = 0  # events accepted so far (each event keeps its number: see safe_seq)
        self._replay_run: tuple[float, int] | None = None  # since when (monotonic), events_replayed then
        fallback.on_reset = self._list_reset

    # ---- hot path ---------------------------------------------------------------------------

    def accept(self, event: Event) -> None:
        """Take one event from the source; never blocks, never raises."""
        self.seq = event.seq = self.seq + 1
        mode = self.mode
        if mode is Mode.DIRECT:
            if self.publisher.room():
                self.publisher.publish(event)
                self.direct_in_flight += 1
                self.metrics.published_direct += 1
                return
            self._start_spilling()
        elif mode is Mode.HOLDING:
            if len(self.hold) < self.live.current.publish_window:
                self.hold.append(event)
                self.publisher.ensure_connected()
                return
            self._start_spilling()
        self._spill(event)

    def _spill(self, event: Event) -> None:
        if self.live.current.fallback_size < 0:
            self.metrics.dropped_fallback_off += 1
            self._rlog.warn("off", "event dropped: the broker cannot take it and the fallback is off")
            return
        if len(self.spill) >= SPILL_LIMIT:
            self.metrics.dropped_overflow += 1
            self._rlog.warn("overflow", "event dropped: %d events already wait for the fallback list "
                            "(is Redis refusing writes?)", SPILL_LIMIT)
            return
        if not self.spill:
            self._wake.set()
        self.spill.append(event)

    def _start_spilling(self, connect: bool = True) -> None:
        self.mode = Mode.SPILLING
        self.list_known_empty = False
        if self.hold:
            hold, self.hold = self.hold, deque()
            for event in hold:
                self._spill(event)
        if connect:
            self.publisher.ensure_connected()
        self._wake.set()

    def safe_seq(self) -> int:
        """Every event accepted up to this number is confirmed by the broker or stored in the
        fallback list (the fleet's checkpoints: ``proxy/events/fleet.py``)."""
        low = self.seq
        for waiting in (self.hold, self.spill, self.failed_direct):
            if waiting:
                low = min(low, waiting[0].seq - 1)
        first = self.publisher.first_direct_seq() if self.direct_in_flight else 0
        if first:
            low = min(low, first - 1)
        return low

    # ---- outcomes from the publisher ------------------------------------------------------

    def on_ready(self) -> None:
        self._retry_at = 0.0
        self._try_direct()
        self._wake.set()

    def on_settled(self, confirmed: list[InFlight], failed: list[InFlight]) -> None:
        wake = False
        for event, batch, index in confirmed:
            if batch is None:
                self.direct_in_flight -= 1
                self.metrics.confirmed_direct += 1
                # the replayer (or the way back to DIRECT) waits for the last direct confirm
                wake = wake or (self.direct_in_flight == 0 and self.mode is Mode.SPILLING)
            elif batch.abandoned:
                self.abandoned_outstanding -= 1
            else:
                batch.outstanding -= 1
                batch.ok[index] = True
                wake = wake or batch.outstanding == 0
        for event, batch, index in failed:
            if batch is None:
                self.direct_in_flight -= 1
                if self.live.current.fallback_size < 0:
                    self.metrics.dropped_fallback_off += 1
                    self._rlog.warn("off", "event dropped: the broker refused it and the fallback is off")
                else:
                    self.failed_direct.append(event)
                    if self.mode is not Mode.SPILLING:
                        self._start_spilling()
            elif batch.abandoned:
                self.abandoned_outstanding -= 1
            else:
                batch.outstanding -= 1
                batch.failed = True
            wake = True
        if wake:
            self._wake.set()

    # ---- the pump ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._pump(), name="fallback-pump")

    def abandon(self) -> None:
        """This instance stopped being the forwarder: forget everything in memory (the new
        forwarder publishes it from its own copy of the stream) and stop the pump."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.mode = Mode.SPILLING
        self.spill.clear()
        self.hold.clear()
        self.failed_direct = []
        self.direct_in_flight = 0
        self.batches.clear()
        self.abandoned_outstanding = 0
        self.list_known_empty = False
        self._retry_at = 0.0

    async def _pump(self) -> None:
        delay = RETRY_MIN
        while not self._stopping and self.mode is Mode.SPILLING and not self.list_known_empty:
            # Start: is there a backlog? Replay it now; otherwise wait for the first event (lazy).
            try:
                if await self.fallback.refresh_length() == 0 and not self.spill and not self.failed_direct:
                    self._list_empty()
                else:
                    self.publisher.ensure_connected()
                self.last_error_current = False
                break
            except LinkError as exc:
                self._note_error(f"fallback list unavailable: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        while not self._stopping:
            check_cancelled()
            try:
                await asyncio.wait_for(self._wake.wait(), TICK)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                break
            try:
                await self._step(replay=True)
                delay = RETRY_MIN
                self.last_error_current = False
            except LinkError as exc:
                self._note_error(f"fallback list unavailable: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                self._wake.set()
            except Exception:  # a bug must not stop delivery for good: log it and go on
                log.exception("fallback pump failed; retrying")
                await asyncio.sleep(RETRY_MAX)
                self._wake.set()

    async def _step(self, replay: bool) -> None:
        if self.mode is Mode.HOLDING and self.publisher.state in (BrokerState.BACKOFF, BrokerState.DISABLED):
            # The connection attempt failed: held events are safer in the list than in memory.
            self._start_spilling(connect=False)
        fallback = self.fallback
        if fallback.length and time.monotonic() - fallback.last_op >= LIST_CHECK:
            # nothing touched the list for a while (broker down): is it still there? (fallback.py)
            await fallback.refresh_length()
        await self._settle_batches()
        await self._store()
        if replay:
            await self._replay()

    async def _store(self) -> None:
        """Write what waits in memory: failed direct events at the head, spilled ones at the tail."""
        cap = self.live.current.fallback_size
        if self.failed_direct and self.direct_in_flight == 0:
            events = self.failed_direct
            if cap < 0:
                self.metrics.dropped_fallback_off += len(events)
            else:
                self._trimmed(await self.fallback.push(events, cap, front=True))
                self.metrics.events_to_fallback += len(events)
            self.failed_direct = []
        while self.spill:
            chunk = list(islice(self.spill, SPILL_CHUNK))
            if cap < 0:
                self.metrics.dropped_fallback_off += len(chunk)
            else:
                self._trimmed(await self.fallback.push(chunk, cap))
                self.metrics.events_to_fallback += len(chunk)
            for _ in range(len(chunk)):
                self.spill.popleft()

    def _trimmed(self, count: int) -> None:
        """The cap removed ``count`` elements from the head: account them to the batches reading there."""
        if not count:
            return
        self.metrics.dropped_fallback_full += count
        self._rlog.warn("cap", "fallback list full (%d): dropped the %d oldest event(s)",
                        self.live.current.fallback_size, count)
        for batch in self.batches:
            taken = min(count, batch.n - batch.trimmed)
            batch.trimmed += taken
            count -= taken
            if not count:
                break

    async def _settle_batches(self) -> None:
        """Remove confirmed batches from the list head; on a failed one, stop and retry later."""
        while self.batches and self.batches[0].done:
            batch = self.batches.popleft()
            if not batch.failed:
                await self.fallback.remove(batch.n - batch.trimmed)
                self.metrics.events_replayed += batch.published
                self._retry_delay = RETRY_MIN
                continue
            await self.fallback.remove(batch.confirmed_prefix() - batch.trimmed)
            self.metrics.replay_failures += 1
            for other in (batch, *self.batches):
                other.abandoned = True
                self.abandoned_outstanding += other.outstanding
            self.batches.clear()
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
            if self.mode is Mode.HOLDING:
                self._start_spilling()
        self._try_direct()

    async def _replay(self) -> None:
        publisher = self.publisher
        if self.mode is not Mode.SPILLING or self.failed_direct or self.direct_in_flight:
            return
        if publisher.state is not BrokerState.READY:
            if self.fallback.length:
                publisher.ensure_connected()
            return
        if self.abandoned_outstanding or time.monotonic() < self._retry_at:
            return
        while len(self.batches) < REPLAY_BATCHES and not self._stopping:
            room = publisher.room()
            size = max(1, min(REPLAY_BATCH, self.live.current.publish_window // REPLAY_BATCHES))
            if room < size:
                return
            offset = sum(b.n - b.trimmed for b in self.batches)
            count = size
            epoch = self.fallback.epoch
            entries = await self.fallback.read(offset, count, now_ms())
            if self.fallback.epoch != epoch:
                self._wake.set()  # the list changed under us: ``offset`` was void, start over
                return
            if publisher.state is not BrokerState.READY or self.mode is not Mode.SPILLING:
                return  # the broker went away meanwhile: read again later
            if not entries:
                if not self.batches and not self.spill:
                    self._list_empty()
                return
            self._publish_batch(entries)
            if len(entries) < count and not self.spill:
                self.mode = Mode.HOLDING  # the replayer reached the tail
                return

    def _publish_batch(self, entries: list[Event | None]) -> None:
        if self._replay_run is None:
            self._replay_run = (time.monotonic(), self.metrics.events_replayed)
            log.info("replaying the fallback list (%d events)", self.fallback.length)
        batch = ReplayBatch(len(entries))
        for index, event in enumerate(entries):
            if event is None:
                self.metrics.fallback_skipped_entries += 1
                self._rlog.warn("skip", "a fallback list element is not an event: skipped")
                continue
            batch.ok[index] = False
            batch.outstanding += 1
            batch.published += 1
            self.publisher.publish(event, batch, index)
        self.batches.append(batch)
        if not batch.outstanding:
            self._wake.set()

    def _list_reset(self) -> None:
        """The list changed under us (deleted, flushed, ...): the batches read from it are void.

        Their confirms are ignored from now on (as after a failed batch); what the list copy
        restores is replayed again, with the same ids (duplicates, never a loss).
        """
        for batch in self.batches:
            batch.abandoned = True
            self.abandoned_outstanding += batch.outstanding
        self.batches.clear()
        if self.mode is not Mode.SPILLING:
            self._start_spilling(connect=False)
        self._wake.set()

    def _replay_done(self) -> None:
        """The list is empty: the replay (if one ran) is over."""
        if self._replay_run is not None:
            started, before = self._replay_run
            self._replay_run = None
            log.info("replayed %d events in %.1f s", self.metrics.events_replayed - before,
                     time.monotonic() - started)

    def _list_empty(self) -> None:
        self._replay_done()
        self.list_known_empty = True
        self.mode = Mode.HOLDING
        self._try_direct()

    def _try_direct(self) -> None:
        """HOLDING -> DIRECT once nothing older waits: publish the held events, in order."""
        if (self.mode is not Mode.HOLDING or self.batches or self.abandoned_outstanding
                or self.spill or self.failed_direct):
            return
        publisher = self.publisher
        if publisher.room() < max(1, len(self.hold)):
            return
        hold, self.hold = self.hold, deque()
        for event in hold:
            publisher.publish(event)
        self.direct_in_flight += len(hold)
        self.metrics.published_direct += len(hold)
        self.mode = Mode.DIRECT
        self._replay_done()

    # ---- shutdown ---------------------------------------------------------------------------

    def hold_for_shutdown(self) -> None:
        """The broker is going away on purpose: from now on every event goes to the list."""
        if self.mode is not Mode.SPILLING:
            self._start_spilling(connect=False)

    async def stop(self, timeout: float) -> bool:
        """Stop the pump and write everything not confirmed to the list (bounded by ``timeout``).
        True when nothing accepted is left unsafe."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await stopped([self._task])
        if self.hold:
            self.spill.extend(self.hold)
            self.hold.clear()
        try:
            await asyncio.wait_for(self._step(replay=False), timeout)
        except (LinkError, asyncio.TimeoutError) as exc:
            lost = len(self.spill) + len(self.failed_direct)
            log.error("shutdown: could not store %d event(s) in the fallback list: %s", lost, exc)
            return False
        return not (self.spill or self.failed_direct or self.direct_in_flight)

    def _note_error(self, message: str) -> None:
        self.last_error, self.last_error_ms, self.last_error_current = message, now_ms(), True
        self._rlog.warn("pump", "%s", message)
