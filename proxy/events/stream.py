"""Positions in an event stream that every instance of a fleet agrees on (no I/O here).

Every subscriber of one Redis receives the same pub/sub stream in the same order. The forwarder
PUBLISHes **checkpoint markers** on :data:`MARKER_CHANNEL`, which every instance also subscribes
to on the connection that reads the keyspace events, so a marker lands at the same place in every
instance's copy of the stream. That gives everyone the same names for stream positions:

- a marker's id is ``<salt>.<k>`` (``salt`` random per forwarder term, ``k`` its marker count);
- the n-th keyspace message after a marker (every message counts, filtered or not, so instances
  whose filters differ for a moment still agree) gets the message id ``<tag><marker id>-<n>``,
  where ``tag`` names the stream in cluster mode (``""`` for a single Redis);
- before an instance has seen its first marker it cannot know the shared names: its events get
  ``p<instance>-<n>`` (:class:`Cursor`), unique but its own.

Markers are ordered by ``(token, k)``: ``token`` is the fencing token of the lease the forwarder
held when it sent the marker (it only grows), ``k`` counts within a term. A marker also carries
the latest *done* marker of each stream: every event before it is confirmed by the broker or
stored in the fallback list. A standby keeps the events since the done marker in a
:class:`StandbyBuffer` and, on takeover, publishes exactly those (``docs/fleet.md``).
"""

from __future__ import annotations

from collections import deque

from proxy.events.message import Event

__all__ = ["MARKER_CHANNEL", "MARKER_DB", "Cursor", "Marker", "Order", "StandbyBuffer", "Takeover"]

#: The channel of checkpoint markers: an exact channel, so that tools subscribed to
#: ``__keyevent@*__:*`` next to us never see them.
MARKER_CHANNEL = b"key_evt_amqp:checkpoint"
#: The ``db`` a source reports for a marker (the payload comes as the key)
MARKER_DB = -2
_MAGIC = b"KEAM1"

Order = tuple[int, int]  # (token, k)


class Marker:
    """One checkpoint marker as sent (:meth:`encode`) and as read (:meth:`parse`)."""

    __slots__ = ("token", "k", "salt", "ms", "handover", "done")

    def __init__(self, token: int, k: int, salt: bytes, ms: int, handover: bool = False,
                 done: dict[bytes, Order] | None = None) -> None:
        self.token = token
        self.k = k
        self.salt = salt
        self.ms = ms
        self.handover = handover
        self.done = done if done is not None else {}

    @property
    def order(self) -> Order:
        return self.token, self.k

    @property
    def id(self) -> bytes:
        return b"%b.%x" % (self.salt, self.k)

    def encode(self) -> bytes:
        done = b" ".join(b"%b=%d.%d" % (tag or b"-", t, k) for tag, (t, k) in self.done.items())
        return b"%b %d %d %b %d %b %b" % (_MAGIC, self.token, self.k, self.salt, self.ms,
                                          b"h" if self.handover else b"-", done)

    @classmethod
    def parse(cls, payload: bytes) -> Marker | None:
        """The marker in ``payload``, or None when it is not one (someone else's PUBLISH)."""
        fields = payload.split(b" ")
        if len(fields) < 6 or fields[0] != _MAGIC:
            return None
        try:
            token, k, ms = int(fields[1]), int(fields[2]), int(fields[4])
            done: dict[bytes, Order] = {}
            for item in fields[6:]:
                if not item:
                    continue
                tag, _, order = item.rpartition(b"=")
                t, _, kk = order.partition(b".")
                done[b"" if tag == b"-" else tag] = (int(t), int(kk))
        except ValueError:
            return None
        salt = fields[3]
        if not salt or len(salt) > 32 or not salt.isalnum():
            return None
        return cls(token, k, salt, ms, fields[5] == b"h", done)

    def __repr__(self) -> str:
        return f"Marker({self.token}, {self.k}, {self.salt!r}{', handover' if self.handover else ''})"


class Cursor:
    """Where an instance stands in one stream: the last marker seen and the messages since."""

    __slots__ = ("tag", "mark", "n", "last")

    def __init__(self, tag: bytes, provisional: bytes) -> None:
        self.tag = tag
        self.mark = tag + provisional  # the id prefix of the next messages
        self.n = 0
        self.last: Marker | None = None  # the last marker seen in this stream

    def at(self, marker: Marker) -> None:
        self.mark = self.tag + marker.id
        self.n = 0
        self.last = marker

    def message_id(self) -> bytes:
        """The id of the message just counted (``n`` was incremented for it)."""
        return b"%b-%x" % (self.mark, self.n)


class Takeover:
    """What a new forwarder publishes for one stream: ``events`` in order, after a gap marker
    covering ``gap`` (``(start_ms, end_ms)``) when the buffer cannot prove it holds everything
    since the done marker."""

    __slots__ = ("events", "gap", "found")

    def __init__(self, events: list[Event], gap: tuple[int, int] | None, found: bool) -> None:
        self.events = events
        self.gap = gap
        self.found = found


class StandbyBuffer:
    """A standby's copy of one stream since the last done marker, bounded.

    Entries are events and markers in stream order. A done marker seen in a later marker
    (:meth:`trim`) drops everything before it. Past ``limit`` events the oldest are dropped
    (counted in :attr:`dropped`), and the buffer remembers that it has a hole from
    :attr:`hole` ``(start_ms, end_ms)``: should this instance take over before a done marker
    beyond the hole arrives, the hole becomes a gap marker.
    """

    __slots__ = ("limit", "entries", "events", "dropped", "hole")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: deque[Event | Marker] = deque()
        self.events = 0
        self.dropped = 0
        self.hole: tuple[int, int] | None = None

    def add(self, event: Event) -> None:
        entries = self.entries
        entries.append(event)
        self.events += 1
        while self.events > self.limit:
            first = entries.popleft()
            if isinstance(first, Marker):
                continue
            self.events -= 1
            self.dropped += 1
            start = self.hole[0] if self.hole is not None else first.timestamp_ms
            self.hole = (start, first.timestamp_ms)

    def add_marker(self, marker: Marker) -> None:
        self.entries.append(marker)

    def trim(self, done: Order) -> None:
        """Everything up to the marker ``done`` is safe: drop it (and a hole before it)."""
        entries = self.entries
        last = -1
        for index, entry in enumerate(entries):
            if isinstance(entry, Marker):
                if entry.order == done:
                    last = index
                    break
                if entry.order > done:
                    break
        if last < 0:
            return  # not here (yet, or dropped with the hole: then the hole still matters)
        for _ in range(last):  # the done marker itself stays: a takeover starts after it
            if not isinstance(entries.popleft(), Marker):
                self.events -= 1
        self.hole = None  # it was before the done marker

    def last_marker(self) -> Marker | None:
        for entry in reversed(self.entries):
            if isinstance(entry, Marker):
                return entry
        return None

    def takeover(self, done: Order | None, done_ms: int, now_ms: int) -> Takeover:
        """What to publish when this instance becomes the forwarder and the stream's done marker
        is ``done`` (None: no forwarder ever recorded one; ``done_ms`` its time)."""
        entries = list(self.entries)
        start = 0
        found = False
        if done is not None:
            for index, entry in enumerate(entries):
                if isinstance(entry, Marker) and entry.order == done:
                    start, found = index + 1, True
                    break
        events = [e for e in entries[start:] if isinstance(e, Event)]
        gap: tuple[int, int] | None = None
        # Found: nothing after the done marker was dropped (drops take the oldest). Not found,
        # with a done marker (this buffer began after it, or lost it with a hole) or a hole: the
        # events between it and the first one kept are unknown.
        if not found and (done is not None or self.hole is not None):
            begins = ([done_ms] if done is not None else []) + ([self.hole[0]] if self.hole else [])
            begin = min(begins)
            end = events[0].timestamp_ms if events else now_ms
            gap = (begin, max(begin, end))
        self.entries.clear()
        self.events = 0
        self.hole = None
        return Takeover(events, gap, found)


