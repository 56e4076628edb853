"""Redis Sentinel: which server is the master named in ``redis+sentinel://``, and when that changes.

:class:`SentinelWatch` is built at start when the upstream is a Sentinel URL. It

1. **finds the master**: asks the sentinels in the URL's order ``SENTINEL GET-MASTER-ADDR-BY-NAME``
   and takes the first answer whose ``ROLE`` (with the upstream's credentials) says ``master``. At
   start, none is a :class:`~proxy.errors.SentinelError` (each sentinel's reason in one line);
2. **is where connections go**: it registers with :func:`proxy.connect.set_locator`, so every
   :func:`~proxy.connect.open_redis` of the upstream (client relays, the event subscription, the
   fallback list, the fleet) reaches the current master;
3. **follows failovers**: it subscribes to every sentinel (each with its own reconnecting task) and
   on ``+switch-master`` for our master checks ``ROLE`` on the new one, makes it current and tells
   its :attr:`~SentinelWatch.listeners` ``(old, new, since_ms)``: the server closes every client
   (as Sentinel has the old master close its clients: a plain close), the event service moves its
   subscription. After a sentinel connection comes back it asks again (a switch may have been
   missed);
4. **keeps a bound on when the failover began** (``since_ms``): the earliest failover message about
   our master (``+sdown``/``+odown`` of the master, ``+try-failover``, ``+selected-slave``,
   ``+promoted-slave``, ...) since the last switch. The leader publishes these before it sends
   ``REPLICAOF NO ONE``, so no write can reach the new master before ``since_ms``: the event
   service's gap marker starts there at the latest. While a sentinel connection is down (and for
   :data:`BLIND_MEMORY` after), the moment it went down counts too: a message may have been missed;
5. **lists the replicas** every :data:`REPLICAS_INTERVAL` and after each switch, for
   :attr:`~SentinelWatch.on_replicas` (the event service sets ``notify-keyspace-events`` on them
   in advance, so a promoted replica publishes what we select from its first write on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis

from protocol.commands import encode_command
from proxy.cluster.topology import Address, query
from proxy.config import RedisAddress
from proxy.connect import open_redis_streams, set_locator, tls_reason
from proxy.errors import SentinelError, check_cancelled, stopped

__all__ = ["SentinelWatch"]

log = logging.getLogger("proxy.sentinel")

#: Messages about our master that mean a failover may be under way (the gap bound, rule 4).
PRECURSORS = frozenset({
    "+sdown", "+odown", "+try-failover", "+elected-leader", "+failover-state-select-slave",
    "+selected-slave", "+failover-state-send-slaveof-noone", "+failover-state-wait-promotion",
    "+promoted-slave", "+failover-state-reconf-slaves", "+failover-end", "-role-change",
    "+switch-master",
})
RECOVERED = frozenset({"-sdown", "-odown"})  # the master is back without a failover
CHANNELS = tuple(sorted(PRECURSORS | RECOVERED))
RECONNECT_MIN = 0.1  # seconds before a lost sentinel connection is tried again, doubling...
RECONNECT_MAX = 2.0  # ...up to this
PING_INTERVAL = 2.0  # seconds of silence before a sentinel connection is PINGed
PING_TIMEOUT = 6.0  # seconds without a byte before it counts as dead
REPLICAS_INTERVAL = 10.0  # seconds between replica listings
ROLE_WAIT = 3.0  # seconds a new master named by +switch-master has to say ROLE master
BLIND_MEMORY = 60.0  # seconds a sentinel connection's outage still bounds the next gap
MAX_MESSAGE = 64 * 1024  # bytes of one unfinished sentinel message (a security limit: close)

#: ``(old master, new master, since_ms)``: called at each switch, in order
Switch = Callable[[RedisAddress, RedisAddress, int], None]


def _name(node: Address) -> str:
    host, port = node
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _reason(exc: BaseException) -> str:
    return "timed out" if isinstance(exc, asyncio.TimeoutError) else tls_reason(exc)


class SentinelWatch:
    """``await start()`` once (raises SentinelError), ``await stop()`` once."""

    def __init__(self, upstream: RedisAddress, timeout: float) -> None:
        assert upstream.sentinel is not None
        self.upstream = upstream
        self.sentinels = upstream.sentinel
        self.timeout = timeout
        #: how the sentinels themselves are reached (their login, the upstream's TLS)
        self.auth = RedisAddress(username=self.sentinels.username, password=self.sentinels.password,
                                 tls=upstream.tls)
        self.master: RedisAddress | None = None
        self.replicas: tuple[RedisAddress, ...] = ()
        self.listeners: list[Switch] = []
        self.on_replicas: Callable[[tuple[RedisAddress, ...]], Awaitable[None]] | None = None
        self.switches = 0
        self.last_switch = ""
        self.subscribed: set[Address] = set()
        self._precursor_ms: int | None = None
        self._down: dict[Address, int] = {}  # sentinel -> when its connection went down (ms)
        self._blind_ms: int | None = None  # when the latest outage (of any of them) began
        self._all_up_ms = 0  # when the last one came back
        self._jobs: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._replicas_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # ---- life-cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Find the master, then follow it. Raises SentinelError when no sentinel names one that
        ``ROLE`` confirms (the message lists every sentinel's reason)."""
        node, reasons = await self._find()
        if node is None:
            raise SentinelError(f"no sentinel gave the master {self.sentinels.master!r}: " + "; ".join(reasons))
        self.master = self.upstream.located(node)
        log.info("master %r is %s (Sentinel)", self.sentinels.master, _name(node))
        set_locator(self.sentinels, self.locate)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen(s), name=f"sentinel-{s[1]}") for s in self.sentinels.nodes]
        self._tasks.append(loop.create_task(self._replicas_loop(), name="sentinel-replicas"))
        self._replicas_wanted.set()  # list them now, not in REPLICAS_INTERVAL

    async def stop(self) -> None:
        set_locator(self.sentinels, None)
        tasks = [*self._tasks, *self._jobs]
        for task in tasks:
            task.cancel()
        await stopped(tasks)

    async def locate(self, timeout: float) -> RedisAddress:
        """The current master (for :func:`proxy.connect.open_redis`)."""
        assert self.master is not None  # start() found one before registering
        return self.master

    def info(self) -> dict[str, object]:
        master = self.master
        return {
            "sentinel_master": master.name if master is not None else "",
            "sentinel_switches": self.switches,
            "sentinel_last_switch": self.last_switch,
            "sentinel_connections": f"{len(self.subscribed)}/{len(self.sentinels.nodes)}",
            "sentinel_replicas": ",".join(r.name for r in self.replicas),
        }

    # ---- finding the master -------------------------------------------------------------------------

    async def _find(self) -> tuple[Address | None, list[str]]:
        reasons: list[str] = []
        name = self.sentinels.master
        for sentinel in self.sentinels.nodes:
            try:
                (reply,) = await query(sentinel, ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name),
                                       auth=self.auth, timeout=self.timeout)
            except (OSError, asyncio.TimeoutError, hiredis.HiredisError) as exc:
                reasons.append(f"{_name(sentinel)}: {_reason(exc)}")
                continue
            if isinstance(reply, hiredis.ReplyError):
                reasons.append(f"{_name(sentinel)}: {reply}")
                continue
            if not isinstance(reply, list) or len(reply) != 2:
                reasons.append(f"{_name(sentinel)}: no master named {name!r}")
                continue
            node = (reply[0].decode(), int(reply[1]))
            problem = await self._role_problem(node)
            if problem:
                reasons.append(f"{_name(sentinel)} names {_name(node)}, but {problem}")
                continue
            return node, reasons
        return None, reasons

    async def _role_problem(self, node: Address) -> str:
        """'' when ``node`` says it is a master, else why not (for messages)."""
        try:
            (role,) = await query(node, ("ROLE",), auth=self.upstream, timeout=self.timeout)
        except (OSError, asyncio.TimeoutError, hiredis.HiredisError) as exc:
            return f"it does not answer ({_reason(exc)})"
        if isinstance(role, hiredis.ReplyError):
            return f"ROLE was refused: {role}"
        if not isinstance(role, list) or not role or role[0] != b"master":
            said = role[0].decode() if isinstance(role, list) and role and isinstance(role[0], bytes) else role
            return f"ROLE says {said}"
        return ""

    async def _switch_to(self, node: Address | None) -> None:
        """Make ``node`` (None: whatever the sentinels name now) the master, once ROLE agrees."""
        async with self._lock:
            if node is None:
                node, _ = await self._find()
                if node is None:
                    return
            current = self.master
            if current is not None and (current.host, current.port) == node:
                return
            deadline = time.monotonic() + ROLE_WAIT
            while problem := await self._role_problem(node):
                if time.monotonic() > deadline:
                    log.warning("Sentinel names %s the master of %r, but %s: not switching", _name(node),
                                self.sentinels.master, problem)
                    return
                await asyncio.sleep(0.1)
            since = self._since()
            old, self.master = current, self.upstream.located(node)
            self._precursor_ms = None
            self._blind_ms = _now_ms() if self._down else None
            self.switches += 1
            self.last_switch = f"{old.name if old else '?'}->{self.master.name}@{_now_ms()}"
            log.warning("master %r moved from %s to %s (Sentinel): clients are closed and reconnect "
                        "to the new master; the event subscription follows (gap from %d)",
                        self.sentinels.master, old.name if old else "?", self.master.name, since)
            for listener in self.listeners:
                if old is not None:
                    listener(old, self.master, since)
            self._replicas_wanted.set()

    def _since(self) -> int:
        """Rule 4: the earliest moment the failover may have begun, as far as we can tell."""
        now = _now_ms()
        bounds = [now]
        if self._precursor_ms is not None:
            bounds.append(self._precursor_ms)
        if self._blind_ms is not None and (self._down or now - self._all_up_ms < BLIND_MEMORY * 1000):
            bounds.append(self._blind_ms)
        return min(bounds)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    # ---- following the sentinels -----------------------------------------------------------------------

    async def _listen(self, sentinel: Address) -> None:
        delay = RECONNECT_MIN
        while True:
            check_cancelled()
            try:
                await self._subscription(sentinel)
            except (OSError, asyncio.TimeoutError, hiredis.HiredisError, SentinelError) as exc:
                if sentinel not in self._down:
                    log.warning("sentinel %s: %s", _name(sentinel), _reason(exc))
                    now = _now_ms()
                    if not self._down and (self._blind_ms is None or now - self._all_up_ms >= BLIND_MEMORY * 1000):
                        self._blind_ms = now
                    self._down[sentinel] = now
                self.subscribed.discard(sentinel)
            if sentinel in self._down and delay < RECONNECT_MAX:
                delay = min(delay * 2, RECONNECT_MAX)
            await asyncio.sleep(delay)

    async def _subscription(self, sentinel: Address) -> None:
        """One connection: subscribe, then handle messages until it fails (raises)."""
        reader, writer = await open_redis_streams(self.auth.at(sentinel), timeout=self.timeout)
        try:
            commands: list[tuple[Any, ...]] = []
            if self.auth.password is not None:
                commands.append(("AUTH", self.auth.username, self.auth.password) if self.auth.username
                                else ("AUTH", self.auth.password))
            commands.append(("SUBSCRIBE", *CHANNELS))
            writer.write(b"".join(encode_command(*c) for c in commands))
            parser = hiredis.Reader()
            idle = 0.0
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(MAX_MESSAGE), PING_INTERVAL)
                except asyncio.TimeoutError:
                    idle += PING_INTERVAL
                    if idle >= PING_TIMEOUT:
                        raise
                    writer.write(encode_command("PING"))
                    continue
                if not data:
                    raise ConnectionResetError("the sentinel closed the connection")
                idle = 0.0
                parser.feed(data)
                while (message := parser.gets()) is not False:
                    self._received(sentinel, message)
                if parser.len() > MAX_MESSAGE:
                    raise ConnectionAbortedError("a sentinel message above MAX_MESSAGE bytes")
        finally:
            writer.close()

    def _received(self, sentinel: Address, message: Any) -> None:
        if isinstance(message, hiredis.ReplyError):
            raise SentinelError(f"refused: {message}")
        if not isinstance(message, list) or len(message) < 3:
            return  # +OK of AUTH, a PONG
        kind = message[0]
        if kind == b"subscribe" and message[2] == len(CHANNELS):
            self._subscribed(sentinel)
        elif kind == b"message":
            self._event(message[1].decode(errors="replace"), message[2].decode(errors="replace").split())

    def _subscribed(self, sentinel: Address) -> None:
        self.subscribed.add(sentinel)
        if self._down.pop(sentinel, None) is not None:
            log.info("sentinel %s: subscribed again", _name(sentinel))
            if not self._down:
                self._all_up_ms = _now_ms()
        # a switch may have happened while we were not listening (or since start() asked): ask
        self._spawn(self._switch_to(None))

    def _event(self, channel: str, words: list[str]) -> None:
        """A sentinel's message: ``+switch-master <name> <old ip> <old port> <new ip> <new port>``,
        ``<type> <name> <ip> <port>`` about a master, ``<type> <id> <ip> <port> @ <name> ...``."""
        if channel == "+switch-master":
            name = words[0] if words else ""
        elif "@" in words:
            name = words[words.index("@") + 1] if words.index("@") + 1 < len(words) else ""
        else:
            name = words[1] if len(words) > 1 and words[0] == "master" else ""
        if name != self.sentinels.master:
            return
        if channel in RECOVERED:
            master = self.master
            if master is not None and words[2:4] == [master.host, str(master.port)]:
                self._precursor_ms = None  # back without a failover
            return
        if channel == "+sdown" and words[0] != "master":
            return  # a replica or a sentinel is down: no failover of ours
        if self._precursor_ms is None:
            self._precursor_ms = _now_ms()
        if channel == "+switch-master" and len(words) >= 5 and words[4].isdigit():
            node = (words[3], int(words[4]))
            self._spawn(self._switch_to(node))

    # ---- replicas ------------------------------------------------------------------------------------

    async def _replicas_loop(self) -> None:
        while True:
            check_cancelled()
            try:
                await asyncio.wait_for(self._replicas_wanted.wait(), REPLICAS_INTERVAL)
            except asyncio.TimeoutError:
                pass
            self._replicas_wanted.clear()
            replicas = await self._list_replicas()
            if replicas is None:
                continue
            self.replicas = replicas
            if self.on_replicas is not None:
                try:
                    await self.on_replicas(replicas)
                except Exception:  # noqa: BLE001 - a bug there must not stop following the master
                    log.exception("preparing the replicas failed")

    async def _list_replicas(self) -> tuple[RedisAddress, ...] | None:
        for sentinel in self.sentinels.nodes:
            try:
                (reply,) = await query(sentinel, ("SENTINEL", "REPLICAS", self.sentinels.master),
                                       auth=self.auth, timeout=self.timeout)
            except (OSError, asyncio.TimeoutError, hiredis.HiredisError):
                continue
            if not isinstance(reply, list):
                continue
            out = []
            for entry in reply:
                fields = dict(zip(entry[::2], entry[1::2])) if isinstance(entry, list) else {}
                flags = fields.get(b"flags", b"").split(b",")
                if b"s_down" in flags or b"o_down" in flags or b"disconnected" in flags:
                    continue
                try:
                    out.append(self.upstream.located((fields[b"ip"].decode(), int(fields[b"port"]))))
                except (KeyError, ValueError):
                    continue
            return tuple(out)
        return None
