"""The ``key_evt_amqp.*`` commands: where their replies go, who may run them, what they do.

A command of ours is answered in its place in the client's reply stream. The relay holds the
client's later input and hands the command to a :class:`Barrier`, which sends Redis, on the
client's own connection, behind everything the client sent before:
1. an authority probe, ``CONFIG SET key-evt-amqp-authority-probe 1``: Redis checks ACL rights
   before arguments, so a user without the right to run ``CONFIG SET`` gets ``-NOPERM``, an
   unauthenticated client ``-NOAUTH``, and an allowed one ``-ERR Unknown option`` (nothing
   changes). Inside ``MULTI`` there is no probe: our commands are refused there;
2. a marker: ``ECHO <random token>``, whose reply (the token as a bulk string) nothing else can
   produce. ECHO is answered without an error, so the marker leaves no trace in Redis's error
   statistics. Where ECHO itself is refused (an unauthenticated client, an ACL user without
   ``+echo``, a busy script), the reply stream ends with an error line instead; the barrier then
   sends a second marker behind it: a command named by a random token, which every Redis refuses
   at once (``-ERR unknown command '<token>'``) whatever the client's state, and strips whichever
   reply ECHO got. Inside ``MULTI`` only that unknown command is sent: it also makes ``EXEC`` fail
   with ``EXECABORT``, as Redis does for any refused command.
Since the client's later input is held, the marker's reply is the last frame Redis sends. When the
reply stream ends with it, every earlier reply has passed: the barrier cuts the probe's and the
marker's replies off, runs the command, and the relay writes our reply and releases the input.

What shows in Redis's statistics: each of our commands adds one error reply (the probe's
``Unknown option``: the only way to ask "may this user run CONFIG SET?" without changing
anything); a HELLO adds none; either adds one more where ECHO is refused as above.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any, Protocol

from protocol import barrier, replies
from protocol.barrier import Probe
from protocol.commands import admin_verb
from protocol.events import parse_classes
from protocol.integers import string2ll
from protocol.keymask import add_masks
from proxy.config import Config
from proxy.ratelog import RateLimitedLog
from proxy.runtime import Change, Runtime
from protocol.routing import FORMATS
from proxy.settings import apply_module_args, module_arg_fields, parse_route


class BarrierOwner(Protocol):
    """What a :class:`Barrier` needs of the client connection that owns it (proxy/relay.py's
    ClientConnection): a Protocol, so that this module does not import the relay."""

    transport: asyncio.Transport | None
    in_multi: bool
    resp3: bool
    runtime: Runtime

    def inject(self, data: bytes) -> None: ...

    def barrier_done(self, reply: bytes, *, close: bool = False) -> None: ...

log = logging.getLogger("key_evt_amqp.admin")
_refusals = RateLimitedLog(log)

#: Our commands that only read: they need the authority to run ``INFO`` (the others: ``CONFIG SET``).
READ_VERBS = frozenset({"info", "config_get", "fleet", "route_list"})

Reply = bytes | Awaitable[bytes]
Handler = Callable[["Runtime", str, list[bytes], bool], Reply]


class Barrier:
    """One command of ours (or a protocol error) waiting for its place in the reply stream."""

    def __init__(
        self,
        client: BarrierOwner,
        args: list[bytes] | None,
        *,
        error: str = "",
        drain: bool = False,
        hello: int | None = None,
    ) -> None:
        """One of: ``args``, our command; ``error``, a protocol error to send before closing;
        ``drain``, close once Redis has answered everything (shutdown); ``hello``, the version a
        relayed HELLO asked for (our replies switch protocol only if Redis accepted it)."""
        self.client = client
        self.args = args
        self.error = error
        self.drain = drain
        self.hello = hello
        self.markers = barrier.markers(("key-evt-amqp-marker-" + secrets.token_hex(16)).encode())
        self.marker_reply = self.markers.echo_reply  # the reply that ends the wait
        self.fallback = False  # the unknown command was sent behind ECHO
        self.probing = False
        self.asking_user = False  # allowed; waiting for the reply to ACL WHOAMI (audit log)
        self._tail = b""  # reply bytes kept back: the end of the stream may be our replies
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.args[0].decode("utf-8", "replace").lower() if self.args else ""

    def begin(self) -> None:
        client = self.client
        if self.args is not None and admin_verb(self.args[0]) not in HANDLERS:
            self.error = unknown_command(self.args)
        elif self.args is not None and client.in_multi:
            self.error = f"ERR {self.name} is not allowed inside MULTI (the transaction is aborted)"
        elif self.args is not None:
            self.probing = True
        # One write, so that Redis reads both at once and answers both at once (a probe's error
        # line read alone would look like a refused ECHO).
        probe = b""
        if self.probing:
            probe = barrier.PROBE if self._probes() == 1 else barrier.READ_PROBE + barrier.PROBE
        if client.in_multi:
            self.marker_reply = self.markers.unknown_reply
            client.inject(probe + self.markers.unknown)
        else:
            client.inject(probe + self.markers.echo)

    def on_replies(self, data: bytes) -> None:
        """Reply bytes arrived: pass on all but what may be the start of our own replies."""
        transport = self.client.transport
        assert transport is not None
        stream = self._tail + data
        if self.asking_user:
            self._user_replies(stream)
            return
        echo_reply = self.markers.echo_reply
        if not stream.endswith(self.marker_reply):
            if not self.fallback and self.marker_reply is echo_reply and barrier.ends_with_error(stream):
                self._fall_back()
            keep = len(self.marker_reply) + len(echo_reply) + barrier.PROBE_REPLY_MAX
            transport.write(stream[:-keep])
            self._tail = stream[-keep:]
            return
        self._tail = b""
        start, end = barrier.cut(stream, self.markers, self.marker_reply, fallback=self.fallback,
                                 probed=self.probing, probes=self._probes())
        if not self.probing and self.hello is not None and not barrier.hello_refused(stream, end):
            self.client.resp3 = self.hello == 3
        transport.write(stream[:start])
        self._ready(stream[start:end])

    def _probes(self) -> int:
        """How many probes go before the marker: ours that only read take either right."""
        return 2 if self.args is not None and admin_verb(self.args[0]) in READ_VERBS else 1

    def _fall_back(self) -> None:
        """ECHO may have been refused: wait for a marker every Redis answers, sent behind it."""
        self.fallback = True
        self.marker_reply = self.markers.unknown_reply
        self.client.inject(self.markers.unknown)

    def flush(self) -> None:
        """The upstream is gone: what was kept back is Redis's, not ours; pass it on."""
        if self._tail and self.client.transport is not None and not self.asking_user:
            self.client.transport.write(self._tail)
        self._tail = b""

    def _ready(self, probe_reply: bytes) -> None:
        if self.drain or self.hello is not None:
            self.client.barrier_done(b"", close=self.drain)
            return
        if self.error:
            self.client.barrier_done(replies.error(self.error), close=self.args is None)
            return
        verdict = barrier.judge_probe(probe_reply)
        if verdict is not Probe.ALLOWED:
            self.client.barrier_done(self._refusal(verdict, probe_reply))
            return
        assert self.args is not None
        if admin_verb(self.args[0]) not in READ_VERBS:
            self._ask_user()
            return
        self._run(self._who())

    def _ask_user(self) -> None:
        """Before a command that changes something: ask Redis who the user is (for the audit
        log), behind the same marker; nothing of the client's can come in between (held)."""
        self.asking_user = True
        self.client.inject(barrier.WHOAMI + (self.markers.unknown if self.marker_reply is not
                                             self.markers.echo_reply else self.markers.echo))

    def _user_replies(self, stream: bytes) -> None:
        if not stream.endswith(self.marker_reply):
            self._tail = stream  # bounded by the user name's length (Redis's own)
            return
        self._tail = b""
        self.asking_user = False
        user = barrier.user_of(stream[:-len(self.marker_reply)])
        self._run(f"{self._who()} user={user}")

    def _run(self, who: str) -> None:
        assert self.args is not None
        reply = run(self.client.runtime, self.args, resp3=self.client.resp3, client=who)
        if isinstance(reply, bytes):
            self.client.barrier_done(reply)
        else:
            self._task = asyncio.ensure_future(self._deliver(reply))

    async def _deliver(self, pending: Awaitable[bytes]) -> None:
        self.client.barrier_done(await pending)

    def _who(self) -> str:
        return describe_client(self.client.transport)

    def _refusal(self, verdict: Probe, probe_reply: bytes) -> bytes:
        refused(self.client.runtime, self.name, self._who(), probe_reply)
        if verdict is Probe.NOAUTH:
            return probe_reply[:probe_reply.index(b"\r\n") + 2]  # one, if both probes got it
        if verdict is not Probe.NOPERM:
            log.warning("authority probe answered %r; refusing %s", probe_reply[:80], self.name)
        return barrier.refusal(self.name, needs_right(self.name))

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


#: Redis quotes the arguments of an unknown command up to this many bytes in all.
_UNKNOWN_ARGS_SHOWN = 128


def unknown_command(args: list[bytes]) -> str:
    """Redis's own text for an unknown command, as ``processCommand`` builds it: each argument
    quoted as a C string (up to a NUL), while fewer than 128 bytes are shown, the last one cut to
    fit. ``replies.error`` turns CR and LF into spaces, as Redis does."""
    shown = b""
    for arg in args[1:]:
        if len(shown) >= _UNKNOWN_ARGS_SHOWN:
            break
        shown += b"'" + _c_string(arg)[:_UNKNOWN_ARGS_SHOWN - len(shown)] + b"' "
    # surrogateescape: bytes that are not UTF-8 go back out as the raw bytes Redis echoes.
    name = _c_string(args[0])[:128].decode("utf-8", "surrogateescape")
    return f"ERR unknown command '{name}', with args beginning with: {shown.decode('utf-8', 'surrogateescape')}"


def _c_string(arg: bytes) -> bytes:
    return arg.split(b"\0", 1)[0]


def run(runtime: Runtime, args: list[bytes], *, resp3: bool,
        client: str = "") -> bytes | Coroutine[Any, Any, bytes]:
    """Run one of our commands (``args[0]`` a name in :data:`HANDLERS`), for either relay, once
    the client's authority is known; ``client`` says who asked (:func:`describe_client`).

    Returns the encoded reply, or a coroutine that gives it: the caller schedules it, keeps the
    task if it may have to cancel it, and sends the reply in the command's place when it ends.
    Every command is counted by name and result; every one that may change something is logged
    (the audit line: who, what, each setting's old -> new value, passwords as ``***``, the reply).
    """
    name = args[0].decode("utf-8", "replace").lower()
    verb = admin_verb(args[0])
    before = runtime.config
    reply = HANDLERS[verb](runtime, name, args[1:], resp3)
    if isinstance(reply, bytes):
        _done(runtime, verb, client, config_changes(before, runtime.config), reply)
        return reply
    return _settled(runtime, verb, client, before, reply)


async def _settled(runtime: Runtime, verb: str, client: str, before: Config, pending: Awaitable[bytes]) -> bytes:
    try:
        reply = await pending
    except Exception:  # a bug must cost one reply, not the proxy
        log.exception("key_evt_amqp.%s failed", verb)
        reply = replies.error(f"ERR key_evt_amqp.{verb} failed: internal error (see the proxy's log)")
    # a change is in force once the fleet's settings in Redis hold it (fleet/shared_config.py)
    _done(runtime, verb, client, config_changes(before, runtime.config), reply)
    return reply


def _done(runtime: Runtime, verb: str, client: str, changes: str, reply: bytes) -> None:
    failed = reply[:1] == b"-"
    runtime.metrics.count_admin(verb, "error" if failed else "ok")
    if verb not in READ_VERBS:
        outcome = reply[1:].split(b"\r\n", 1)[0].decode("utf-8", "replace")
        log.info("admin: key_evt_amqp.%s by %s: %s -> %s", verb, client or "?", changes or "no change",
                 outcome)


def needs_right(name: str) -> str:
    """The Redis command whose right our command ``name`` takes: ``INFO`` or ``CONFIG SET``."""
    return "INFO or CONFIG SET" if name.rpartition(".")[2] in READ_VERBS else "CONFIG SET"


def refused(runtime: Runtime, name: str, client: str, probe_reply: bytes) -> None:
    """One of our commands was refused for want of authority: counted, and logged (rate-limited:
    a client can retry in a loop)."""
    verb = name[len("key_evt_amqp."):] if name.startswith("key_evt_amqp.") else name
    runtime.metrics.count_admin(verb if verb in HANDLERS else "unknown", "refused")
    _refusals.warn("refused", "admin: %s by %s refused: %s", name, client or "?",
                   probe_reply[:80].strip().decode("utf-8", "replace"))


def config_changes(before: Config, after: Config) -> str:
    """``"routing_key 'a' -> 'b', amqp_password *** -> ***"``: each setting that differs, its
    values as :meth:`Config.masked` shows them (passwords never shown); ``""`` when none."""
    if before == after:
        return ""
    old, new = before.masked(), after.masked()
    return ", ".join(
        f"{name} {old[name]!r} -> {new[name]!r}" if old[name] != new[name] else f"{name} *** -> ***"
        for name in old if getattr(before, name) != getattr(after, name))


def describe_client(transport: asyncio.BaseTransport | None) -> str:
    """``127.0.0.1:51234`` (``[::1]:51234``, ``unix``): the client as the audit log names it."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "unix" if peer is not None else "?"


def _arity(name: str) -> bytes:
    return replies.error(f"ERR wrong number of arguments for '{name}' command")


def _config_set(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if not args:
        return _arity(name)
    return runtime.change(_module_args(args))


def _module_args(args: list[bytes]) -> Change:
    return Change(module_arg_fields(args, with_flags=False),
                  lambda config: apply_module_args(config, args, with_flags=False))


def _keymask_clean(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if args:
        return _arity(name)
    return runtime.change(Change(("keymasks",), lambda config: replace(config, keymasks=())))


def _keymask_add(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if not args:
        return _arity(name)
    # Added to the fleet's newest masks (the change is computed from them, see fleet/shared_config).
    return runtime.change(Change(("keymasks",), lambda config: replace(
        config, keymasks=add_masks(config.keymasks, tuple(args)))))


def _keymask_set(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if not args:
        return _arity(name)
    masks = add_masks((), tuple(args))
    return runtime.change(Change(("keymasks",), lambda config: replace(config, keymasks=masks)))


def _fallback_size_set(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if len(args) != 1:
        return _arity(name)
    # Any 64-bit integer is a valid size (> 0 cap, 0 unlimited, < 0 off): Redis's rule is the check.
    size = string2ll(args[0])
    if size is None:
        return replies.error("ERR value is not an integer or out of range")
    return runtime.change(Change(("fallback_size",), lambda config: replace(config, fallback_size=size)))


def _events_set(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if len(args) != 1:
        return _arity(name)
    spec = args[0].decode("utf-8", "replace")
    try:
        parse_classes(spec)
    except ValueError as exc:
        return replies.error(f"ERR {exc}")
    return runtime.change(Change(("events",), lambda config: replace(config, events=spec)))


def _route_add(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if len(args) not in (2, 3):
        return _arity(name)
    try:
        route = parse_route(args)
    except ValueError as exc:
        return replies.error(f"ERR {exc}")
    # Appended to the fleet's newest routes (as keymask_add): the first match wins, so order counts.
    return runtime.change(Change(("routes",), lambda config: replace(
        config, routes=(*(r for r in config.routes if r != route), route))))


def _route_clean(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if args:
        return _arity(name)
    return runtime.change(Change(("routes",), lambda config: replace(config, routes=())))


def _route_list(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    """One array per route, in matching order: mask, routing key, exchange (nil: ``--exchange``)."""
    if args:
        return _arity(name)
    return replies.encode([list(route) for route in runtime.config.routes], resp3=resp3)


def _format_set(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if len(args) != 1:
        return _arity(name)
    fmt = args[0].decode("utf-8", "replace").lower()
    if fmt not in FORMATS:
        return replies.error("ERR format must be module or json")
    return runtime.change(Change(("event_format",), lambda config: replace(config, event_format=fmt)))


def _fleet(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if args:
        return _arity(name)
    return runtime.fleet(resp3)


def _config_reset(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if args:
        return _arity(name)
    return runtime.reset()


def _config_get(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if args:
        return _arity(name)
    values: dict[str, object] = {key: _plain(value) for key, value in runtime.config.masked().items()}
    # Each mask its own bulk string, bytes as given: joined, "a b" + "c" would read as "a" + "b c".
    values["keymasks"] = list(runtime.config.keymasks)
    values["routes"] = [list(route) for route in runtime.config.routes]  # as route_list
    # One field more, last: where each value came from (default, file, env, flag, command), as a
    # map inside the map; a client reading the settings by name sees them as before.
    values["origins"] = runtime.settings.origins()
    return replies.encode(values, resp3=resp3)


def _info(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if args:
        return _arity(name)
    lines = ["# key_evt_amqp"]
    # One field per line: a CR or LF inside a value (an error text) must not forge another field.
    lines += [f"{key}:{_one_line(_plain(value))}" for key, value in runtime.info().items()]
    return replies.bulk(("\r\n".join(lines) + "\r\n").encode("utf-8", "replace"))


def _connect(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    return runtime.connect(_module_args(args))  # no arguments: no setting changes


def _disconnect(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if args:
        return _arity(name)
    return runtime.disconnect()


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def _plain(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


HANDLERS: dict[str, Handler] = {
    "config_set": _config_set,
    "config_get": _config_get,
    "config_reset": _config_reset,
    "fleet": _fleet,
    "connect": _connect,
    "disconnect": _disconnect,
    "fallback_storage_size_set": _fallback_size_set,
    "keymask_clean": _keymask_clean,
    "keymask_add": _keymask_add,
    "keymask_set": _keymask_set,
    "events_set": _events_set,
    "route_add": _route_add,
    "route_list": _route_list,
    "route_clean": _route_clean,
    "format_set": _format_set,
    "info": _info,
}
