"""Settings a fleet shares: a ``key_evt_amqp.*`` change sent to any instance applies to all.

The values our commands set live in Redis, in the hash ``{key_evt_amqp}:config`` (in the
upstream's db; in cluster mode on that key's slot, the one the fallback list uses): one field per
setting set by a command (:data:`proxy.settings.COMMAND_SETTINGS`, in the form
:mod:`.shared_fields` gives), ``amqp_enabled`` (``connect`` / ``disconnect``) and ``version``. A setting that is not in
the hash has the instance's start value (flags, environment, file, default): a value set by a
command wins until ``key_evt_amqp.config_reset`` deletes the hash (README, "Shared settings").

**Writing** (:meth:`SharedConfig.change`), on the instance that got the command, under a lock
that serialises this instance's changes and reads:

1. ``WATCH`` the key, ``HGETALL`` it: the fleet's newest state, applied here first;
2. the command's new values are computed from that state and validated: once, here;
3. ``MULTI``, ``HSET`` the fields the command sets and ``version`` (read + 1), ``PUBLISH`` on the
   channel, ``EXEC``. If another instance wrote in between, ``EXEC`` changes nothing and answers
   nil: back to 1 (at most :data:`CHANGE_ATTEMPTS` times). Concurrent changes are thus applied
   one after the other, each to the other's result (two ``keymask_add`` keep both masks), and
   every instance ends up reading the same hash.

``version`` is set (read + 1), not ``HINCRBY``'d: under ``WATCH`` that is as atomic, and a version
field spoilt by hand would make ``HINCRBY`` fail inside ``EXEC`` while the ``HSET`` went through.

**Watching.** Each instance keeps its own subscriber connection on the channel (PUBLISH reaches
every node of a cluster, so the key's owner serves as well as any). A message, or the
confirmation of a new subscription (messages may have been missed while it was down), starts a
read of the hash; as a backstop the hash is read every :data:`POLL_INTERVAL` anyway, and a PING
as often proves the subscription alive (silent for :data:`SUBSCRIPTION_SILENCE`, as a partition
leaves it, it is replaced). An instance applies the hash whenever its content differs from what
it applied last: the whole content, so that a reset, a ``FLUSHALL`` or an edit by hand that leaves
``version`` alone counts too.

**Failures.** Reading never fails the proxy: a field this instance cannot parse (a setting of a
newer version, an edit by hand) is logged and ignored, the rest applies; an unreachable Redis
keeps the settings in force, and the reads are retried. A command that cannot be stored replies
``-ERR`` and changes nothing: with Redis gone there are no events to forward, and a change applied
to one instance alone would be undone, silently, by its next read of the hash.
"""

from __future__ import annotations

import asyncio
import random
import contextlib
import dataclasses
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import hiredis

from protocol.slots import key_slot
from proxy.config import Config, RedisAddress
from proxy.errors import CommandError, ConfigError, check_cancelled, stopped
from proxy.events.errors import LinkError
from proxy.events.redis_link import RedisLink, open_link
from proxy.fleet.shared_fields import ENABLED, VERSION, decode, encode, encode_enabled, version_of
from proxy.live import LiveConfig
from proxy.ratelog import RateLimitedLog
from proxy.settings import COMMAND_SETTINGS

if TYPE_CHECKING:
    from proxy.cluster.topology import Topology

__all__ = ["CHANNEL", "KEY", "SharedConfig", "WatchState", "locator"]

log = logging.getLogger("proxy.fleet.config")

KEY = b"{key_evt_amqp}:config"  # contains key_evt_amqp: its own events are never forwarded
CHANNEL = KEY  # PUBLISHed after each change; outside __keyevent@*__:*, so no event source sees it
POLL_INTERVAL = 2.0  # seconds between two reads of the hash when no message came
OP_TIMEOUT = 5.0  # seconds for one round trip before the command link counts as dead
CHANGE_ATTEMPTS = 20  # WATCH/EXEC rounds lost to other writers before a command gives up
RETRY_SPREAD = 0.005  # seconds: a lost round waits up to this times the attempt number (random)
SUBSCRIBE_SPACING = 1.0  # seconds between two attempts to subscribe (a refused SUBSCRIBE, say)
#: A PING goes down the subscription every POLL_INTERVAL; silent this long, it counts as dead (a
#: partition leaves a connection open that will never deliver anything) and is replaced.
SUBSCRIPTION_SILENCE = 3 * POLL_INTERVAL
_SHOWN_MAX = 64  # characters of a reply quoted in an error

Change = Callable[[Config], Config]


class _Moved(CommandError):
    """The hash's slot is served by another master now (cluster mode): ask again."""


def _gave_up() -> CommandError:
    return CommandError(f"ERR the shared settings did not hold still for {CHANGE_ATTEMPTS} attempts "
                        f"(other instances writing, or the slot moving): nothing changed, try again")

Locate = Callable[[], RedisAddress]


def _pairs(reply: Any) -> dict[bytes, bytes]:
    if not isinstance(reply, list) or len(reply) % 2:
        raise CommandError(f"ERR unexpected reply to HGETALL: {str(reply)[:_SHOWN_MAX]}")
    return dict(zip(reply[::2], reply[1::2], strict=True))


# ---- where the hash lives ---------------------------------------------------------------------


def locator(upstream: RedisAddress, topology: Topology | None) -> tuple[Locate, Callable[[str], None] | None]:
    """Where the hash is (asked before each connection) and who hears of a ``MOVED``: the
    upstream itself; in cluster mode the master that owns the key's slot now."""
    if topology is None:
        return (lambda: upstream), None
    slot = key_slot(KEY)
    seed = (upstream.host, upstream.port)

    def locate() -> RedisAddress:
        return upstream.at(topology.owner(slot) or seed)

    def on_moved(error: str) -> None:
        parts = error.split()
        if parts[0] == "MOVED" and len(parts) == 3:
            host, _, port = parts[2].rpartition(":")
            topology.moved(int(parts[1]), (host.strip("[]"), int(port)))
        else:
            topology.refresh_soon()

    return locate, on_moved


# ---- the fleet's settings, kept current ------------------------------------------------------


class WatchState(enum.Enum):
    STOPPED = "stopped"
    CONNECTING = "connecting"
    WATCHING = "watching"  # subscribed to the channel, the last read of the hash succeeded
    RETRYING = "retrying"  # Redis unreachable or refusing: tried again every POLL_INTERVAL


class SharedConfig:
    """The settings in force = the start values, overridden by what the hash holds.

    Build it with the :class:`~proxy.live.LiveConfig` holding the start configuration, then
    :meth:`load` (before anything subscribes to the live configuration: the first events are
    filtered with the fleet's settings), :meth:`start` once the event service exists, and
    :meth:`stop` at shutdown. Commands go through :meth:`change` and :meth:`reset`.
    """

    def __init__(self, live: LiveConfig, locate: Locate,
                 on_moved: Callable[[str], None] | None = None) -> None:
        self.live = live
        self.start_config = live.current  # the start values, which a reset goes back to
        self.locate = locate
        self.on_moved = on_moved
        self.timeout = live.current.connect_timeout
        self.values: dict[str, object] = {}  # the settings the hash sets (origin "command")
        self.enabled = True  # amqp_enabled in force
        self.version = 0
        self.state = WatchState.STOPPED
        self.seen: dict[bytes, bytes] | None = None  # the hash as last applied (None: never read)
        self._on_enabled: Callable[[bool], Awaitable[None]] | None = None
        self._lock = asyncio.Lock()
        self._link: RedisLink | None = None  # commands and reads
        self._sub: RedisLink | None = None  # the subscription
        self._sub_confirmed = False  # the subscription's confirmation came on self._sub
        self._sub_tried = -SUBSCRIBE_SPACING
        self._sub_heard = 0.0  # loop time of the subscription's last reply
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._rlog = RateLimitedLog(log)

    # ---- life-cycle ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the hash once and apply it. Never raises: without Redis the start values stay
        in force, and the watcher (:meth:`start`) applies the hash when it can read it."""
        try:
            await self.refresh()
        except (LinkError, CommandError) as exc:
            log.warning("shared settings not read at start (%s): the start values apply until "
                        "they are", exc)

    async def start(self, on_enabled: Callable[[bool], Awaitable[None]]) -> None:
        """Watch the hash from now on; ``on_enabled(flag)`` is awaited whenever ``amqp_enabled``
        changes (not for changes this instance's own connect/disconnect made), and now if the
        fleet is disconnected."""
        self._on_enabled = on_enabled
        if not self.enabled:
            await self._tell_enabled(False)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="shared-config")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await stopped([self._task])
        self.state = WatchState.STOPPED
        for link in (self._sub, self._link):
            if link is not None:
                link.close()

    # ---- commands -----------------------------------------------------------------------------

    async def change(self, fields: Sequence[str], make: Change, *, enabled: bool | None = None,
                     then: Callable[[], Awaitable[bytes]] | None = None) -> bytes | None:
        """Set ``fields`` (Config field names) to their values in ``make(config in force)`` on
        every instance, and ``amqp_enabled`` unless None; then run ``then()`` here and return
        what it returns (no other change of this instance's settings comes in between).

        Raises ConfigError (from ``make``: nothing was written) or CommandError (``-ERR`` text:
        Redis could not be reached or refused; nothing changed).
        """
        async with self._lock:
            for attempt in range(CHANGE_ATTEMPTS):
                if attempt:  # lost to another writer: let it finish (two equally fast loops
                    # would otherwise keep colliding)
                    await asyncio.sleep(random.uniform(0, RETRY_SPREAD * attempt))
                try:
                    written = await self._try_change(fields, make, enabled)
                except _Moved:
                    continue  # the topology heard of it: the next round asks the slot's owner
                except LinkError as exc:
                    raise CommandError(f"ERR the setting could not be stored in Redis, nothing "
                                       f"changed: {exc}") from None
                except CommandError:
                    self._drop_link()  # whatever WATCH or MULTI state it was left in goes too
                    raise
                if written:
                    return await then() if then is not None else None
            raise _gave_up()

    async def reset(self) -> None:
        """``config_reset``: delete the hash; every instance goes back to its start values.
        Raises CommandError (``-ERR`` text)."""
        async with self._lock:
            for _ in range(CHANGE_ATTEMPTS):
                try:
                    link = await self._command_link()
                except LinkError as exc:
                    raise CommandError(f"ERR the settings could not be reset in Redis, nothing "
                                       f"changed: {exc}") from None
                try:
                    replies = await link.request(
                        [("MULTI",), ("DEL", KEY), ("PUBLISH", CHANNEL, b"reset"), ("EXEC",)], OP_TIMEOUT)
                    self._exec_result(replies)
                except LinkError as exc:
                    self._wake.set()
                    raise CommandError(f"ERR Redis did not confirm the reset ({exc}): it applies to "
                                       f"every instance if Redis did it (config_get shows it within "
                                       f"seconds)") from None
                except _Moved:
                    continue
                except CommandError:
                    self._drop_link()
                    raise
                await self._apply({})
                return
            raise _gave_up()

    async def _try_change(self, fields: Sequence[str], make: Change, enabled: bool | None) -> bool:
        """One WATCH/EXEC round: False when another writer came first (nothing was written)."""
        link = await self._command_link()
        watched = await link.request([("WATCH", KEY), ("HGETALL", KEY)], OP_TIMEOUT)
        self._checked(watched[0])
        current = _pairs(self._checked(watched[1]))
        await self._apply(current)
        try:
            config = make(self.live.current)
        except ConfigError:
            with contextlib.suppress(LinkError):  # a dead link has forgotten the WATCH anyway
                await link.request([("UNWATCH",)], OP_TIMEOUT)
            raise
        written = encode({name: getattr(config, name) for name in fields})
        if enabled is not None:
            written[ENABLED] = encode_enabled(enabled)
        written[VERSION] = b"%d" % (version_of(current) + 1)
        pairs = [part for item in written.items() for part in item]
        try:
            replies = await link.request(
                [("MULTI",), ("HSET", KEY, *pairs), ("PUBLISH", CHANNEL, written[VERSION]), ("EXEC",)],
                OP_TIMEOUT)
        except LinkError as exc:
            self._wake.set()  # read the hash again as soon as Redis answers: it knows
            raise CommandError(f"ERR Redis did not confirm the change ({exc}): it applies to every "
                               f"instance if Redis stored it (config_get shows it within seconds), "
                               f"else nothing changed") from None
        if replies[-1] is None:
            return False
        self._exec_result(replies)
        if enabled is not None:
            self.enabled = enabled  # the caller's `then` acts on it here, not on_enabled
        await self._apply({**current, **written})  # exactly the hash now: nobody wrote between
        return True

    def _exec_result(self, replies: list[Any]) -> None:
        """MULTI ... EXEC's replies: raise CommandError for any error (a queued command refused:
        ACL, WRONGTYPE, MOVED)."""
        for reply in replies[:-1]:
            self._checked(reply)
        for reply in self._checked(replies[-1]):
            self._checked(reply)

    def _checked(self, reply: Any) -> Any:
        if isinstance(reply, hiredis.ReplyError):
            text = str(reply)
            if text.startswith(("MOVED ", "ASK ")):  # in a MULTI: the queued command's reply
                if self.on_moved is not None:
                    self.on_moved(text)
                self._drop_link()  # the next operation connects to the slot's owner
                raise _Moved(f"ERR the shared settings' slot moved: {text}")
            raise CommandError(f"ERR Redis refused the shared settings operation: {text}")
        return reply

    def _drop_link(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    # ---- reading and applying -----------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the hash and apply it if it changed. Raises LinkError or CommandError."""
        async with self._lock:
            link = await self._command_link()
            (reply,) = await link.request([("HGETALL", KEY)], OP_TIMEOUT)
            await self._apply(_pairs(self._checked(reply)))

    async def _apply(self, fields: dict[bytes, bytes]) -> None:
        if fields == self.seen:
            return
        state = decode(fields)
        for problem in state.problems:
            log.warning("shared settings (version %d): %s: ignored", state.version, problem)
        config = dataclasses.replace(self.start_config, **state.values)  # type: ignore[arg-type]  # field values of mixed types, each parsed for its field
        before = self.live.current
        changed = [name for name in COMMAND_SETTINGS if getattr(config, name) != getattr(before, name)]
        self.seen, self.values, self.version = dict(fields), dict(state.values), state.version
        if changed:
            what = f"version {state.version} applied" if fields else "reset to the start values"
            log.info("shared settings %s: %s changed", what, ", ".join(changed))
            self.live.update(config)
        enabled = True if state.enabled is None else state.enabled
        if enabled != self.enabled:
            self.enabled = enabled
            log.info("shared settings: the broker is %s on every instance (version %d)",
                     "enabled" if enabled else "disconnected", state.version)
            await self._tell_enabled(enabled)

    async def _tell_enabled(self, enabled: bool) -> None:
        if self._on_enabled is None:
            return
        try:
            await self._on_enabled(enabled)
        except Exception:  # a bug there must not stop the watcher
            log.exception("applying amqp_enabled=%d failed", enabled)

    # ---- connections and the watcher ---------------------------------------------------------

    async def _command_link(self) -> RedisLink:
        if self._link is None or self._link.closed:
            self._link = await open_link(self.locate(), self.timeout)
        return self._link

    async def _run(self) -> None:
        self.state = WatchState.CONNECTING
        while True:
            check_cancelled()
            if self._sub is not None and not self._sub.closed:
                self._check_subscription()
            if self._sub is None or self._sub.closed:
                await self._subscribe()
            self._wake.clear()
            try:
                await self.refresh()
                subscribed = self._sub is not None and self._sub_confirmed
                self.state = WatchState.WATCHING if subscribed else WatchState.RETRYING
            except (LinkError, CommandError) as exc:
                self.state = WatchState.RETRYING
                self._rlog.warn("read", "shared settings: cannot read %r (%s); the settings in force "
                                "stay, retrying every %.0fs", KEY, exc, POLL_INTERVAL)
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)
            except asyncio.TimeoutError:
                pass

    def _check_subscription(self) -> None:
        assert self._sub is not None
        if asyncio.get_running_loop().time() - self._sub_heard > SUBSCRIPTION_SILENCE:
            self._rlog.warn("silent", "shared settings: the subscription has been silent for %.0fs: "
                            "reconnecting", SUBSCRIPTION_SILENCE)
            self._sub.abort()
        elif self._sub_confirmed:
            self._sub.send_unanswered("PING")

    async def _subscribe(self) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._sub_tried < SUBSCRIBE_SPACING:
            return
        self._sub_tried = self._sub_heard = now
        self._sub_confirmed = False
        try:
            self._sub = await open_link(self.locate(), self.timeout, select_db=False,
                                        on_push=self._on_push, on_lost=self._on_sub_lost)
            self._sub.send_unanswered("SUBSCRIBE", CHANNEL)
        except LinkError as exc:
            self._rlog.warn("subscribe", "shared settings: cannot subscribe (%s): reading the hash "
                            "every %.0fs meanwhile", exc, POLL_INTERVAL)

    def _on_push(self, reply: Any) -> None:
        self._sub_heard = asyncio.get_running_loop().time()
        if isinstance(reply, hiredis.ReplyError):
            self._rlog.warn("subscribe", "shared settings: SUBSCRIBE %r refused (%s): reading the "
                            "hash every %.0fs meanwhile", CHANNEL, reply, POLL_INTERVAL)
            if self._sub is not None:
                self._sub.close()
            return
        kind = reply[0] if isinstance(reply, list) and reply else None
        if kind == b"pong":
            return
        if kind == b"subscribe":
            self._sub_confirmed = True
        self._wake.set()  # subscribed (a change may have been missed before) or a change

    def _on_sub_lost(self, exc: BaseException | None) -> None:
        self._sub_confirmed = False
        self._wake.set()

    # ---- what commands report -----------------------------------------------------------------

    def origins(self) -> dict[str, str]:
        """Where each value in force came from: ``command``, or its start origin (``default``,
        ``file``, ``env``, ``flag``); in ``config_get``'s order."""
        start = self.start_config
        return {name: "command" if name in self.values else start.start_origin(name)
                for name in self.live.current.masked()}

    def info(self) -> dict[str, object]:
        return {
            "amqp_enabled": int(self.enabled),
            "shared_config_state": self.state.value,
            "shared_config_version": self.version,
            "shared_config_set": ",".join(name for name in COMMAND_SETTINGS if name in self.values),
        }
