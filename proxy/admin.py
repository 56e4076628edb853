"""The ``key_evt_amqp.*`` commands: where their replies go, who may run them, what they do.

A command of ours is answered in its place in the client's reply stream. The relay holds the
client's later input and hands the command to a :class:`Barrier`, which:
1. refuses it at once (as an error in its place) inside ``MULTI``, where it could not be queued;
2. otherwise asks Redis whether this connection may run ``CONFIG SET``: it sends
   ``CONFIG SET key-evt-amqp-authority-probe 1`` on the client's own upstream connection. Redis
   checks ACL permissions before the arguments, so a user without the right gets ``-NOPERM``, an
   unauthenticated client ``-NOAUTH``, and an allowed one ``-ERR Unknown option`` (nothing is
   changed). The probe's reply is the last frame Redis sends before ours, so it is cut off the
   end of the stream and never reaches the client;
3. runs the command and hands the reply back to the relay, which writes it and releases input.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from protocol import replies
from protocol.commands import admin_verb
from protocol.events import parse_classes
from protocol.keymask import add_masks
from proxy.settings import ConfigError, apply_module_args

if TYPE_CHECKING:
    from proxy.relay import ClientConnection
    from proxy.server import Runtime

log = logging.getLogger("key_evt_amqp.admin")

PROBE = b"*4\r\n$6\r\nCONFIG\r\n$3\r\nSET\r\n$28\r\nkey-evt-amqp-authority-probe\r\n$1\r\n1\r\n"
#: The probe's reply is one error line, far shorter than this: reply bytes kept back at the end
#: of the stream while it is awaited, so it can be cut off whole.
PROBE_REPLY_MAX = 1024
OK = replies.simple("OK")

Reply = bytes | Awaitable[bytes]
Handler = Callable[["Runtime", str, list[bytes], bool], Reply]


class Barrier:
    """One command of ours (or a protocol error) waiting for its place in the reply stream."""

    def __init__(self, client: ClientConnection, args: list[bytes] | None, *, error: str = "") -> None:
        self.client = client
        self.args = args
        self.error = error
        self.probing = False
        self.target = 0
        self._task: asyncio.Task[None] | None = None

    def begin(self) -> None:
        client = self.client
        if self.args is not None and not self.error:
            verb = admin_verb(self.args[0])
            if verb not in HANDLERS:
                self.error = unknown_command(self.args)
            elif client.in_multi:
                self.error = f"ERR {self.name} is not allowed inside MULTI (run it outside the transaction)"
            else:
                client.inject(PROBE)
                self.probing = True
        self.target = client.sent
        if client.replied >= self.target:
            self._ready(b"")

    @property
    def name(self) -> str:
        assert self.args is not None
        return self.args[0].decode("utf-8", "replace")

    def on_replies(self, data: bytes) -> None:
        """Reply bytes arrived (``client.replied`` already counts their frames)."""
        client = self.client
        transport = client.transport
        assert transport is not None
        if not self.probing:
            transport.write(data)
            if client.replied >= self.target:
                self._ready(b"")
            return
        stream = client._reply_tail + data
        if client.replied < self.target - 1:
            client._reply_tail = b""
            transport.write(stream)
        elif client.replied == self.target - 1:
            # The probe's reply may have begun at the end of this chunk: keep the end back.
            cut = max(0, len(stream) - PROBE_REPLY_MAX)
            transport.write(stream[:cut])
            client._reply_tail = stream[cut:]
        elif client.replied == self.target:
            # The probe's reply is the last frame: one error line, with no CRLF inside.
            before = stream.rfind(b"\r\n", 0, len(stream) - 2)
            start = before + 2 if before >= 0 else 0
            client._reply_tail = b""
            transport.write(stream[:start])
            self._ready(stream[start:])
        else:
            log.warning("more replies than commands: the client's stream is no longer counted")
            client._reply_tail = b""
            transport.write(stream)
            client._become_pipe()
            self._ready(b"")

    def _ready(self, probe_reply: bytes) -> None:
        if self.error:
            self.client.barrier_done(replies.error(self.error), close=self.args is None)
            return
        if self.probing and not probe_reply.startswith(b"-ERR"):
            self.client.barrier_done(self._refusal(probe_reply))
            return
        assert self.args is not None
        reply = execute(self.client.server.runtime, self.args, resp3=self.client.resp3)
        if isinstance(reply, bytes):
            self.client.barrier_done(reply)
        else:
            self._task = asyncio.ensure_future(self._finish(reply))

    async def _finish(self, pending: Awaitable[bytes]) -> None:
        try:
            reply = await pending
        except Exception:  # a bug must cost one reply, not the proxy
            log.exception("%s failed", self.name)
            reply = replies.error(f"ERR {self.name} failed: internal error (see the proxy's log)")
        self.client.barrier_done(reply)

    def _refusal(self, probe_reply: bytes) -> bytes:
        if probe_reply.startswith(b"-NOAUTH"):
            return probe_reply
        if not probe_reply.startswith(b"-NOPERM"):
            log.warning("authority probe answered %r; refusing %s", probe_reply[:80], self.name)
        return replies.error(
            f"NOPERM this user has no permissions to run the '{self.name.lower()}' command "
            "(it needs the right to run CONFIG SET)"
        )

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


def unknown_command(args: list[bytes]) -> str:
    """Redis's own text for an unknown command (args shown up to 128 bytes each, like Redis)."""
    shown = "".join(
        "'" + a[:128].decode("utf-8", "replace").replace("\r", " ").replace("\n", " ") + "' "
        for a in args[1:]
    )
    name = args[0].decode("utf-8", "replace")
    return f"ERR unknown command '{name}', with args beginning with: {shown}"


def execute(runtime: Runtime, args: list[bytes], *, resp3: bool) -> Reply:
    """Run one of our commands; returns the encoded reply, or an awaitable of it."""
    name = args[0].decode("utf-8", "replace").lower()
    return HANDLERS[admin_verb(args[0])](runtime, name, args[1:], resp3)


def _arity(name: str) -> bytes:
    return replies.error(f"ERR wrong number of arguments for '{name}' command")


def _config_set(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if not args:
        return _arity(name)
    try:
        config = apply_module_args(runtime.config, args, with_flags=False)
    except ConfigError as exc:
        return replies.error(f"ERR {exc}")
    runtime.update(config)
    return OK


def _keymask_clean(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if args:
        return _arity(name)
    runtime.update(replace(runtime.config, keymasks=()))
    return OK


def _keymask_add(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if not args:
        return _arity(name)
    runtime.update(replace(runtime.config, keymasks=add_masks(runtime.config.keymasks, tuple(args))))
    return OK


def _keymask_set(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if not args:
        return _arity(name)
    runtime.update(replace(runtime.config, keymasks=add_masks((), tuple(args))))
    return OK


def _fallback_size_set(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if len(args) != 1:
        return _arity(name)
    try:
        size = int(args[0])
    except ValueError:
        return replies.error("ERR value is not an integer or out of range")
    runtime.update(replace(runtime.config, fallback_size=size))
    return OK


def _events_set(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if len(args) != 1:
        return _arity(name)
    spec = args[0].decode("utf-8", "replace")
    try:
        parse_classes(spec)
    except ValueError as exc:
        return replies.error(f"ERR {exc}")
    runtime.update(replace(runtime.config, events=spec))
    return OK


def _config_get(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if args:
        return _arity(name)
    values = {key: _plain(value) for key, value in runtime.config.masked().items()}
    return replies.encode(values, resp3=resp3)


def _info(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if args:
        return _arity(name)
    lines = ["# key_evt_amqp"]
    lines += [f"{key}:{_plain(value)}" for key, value in runtime.info().items()]
    return replies.bulk(("\r\n".join(lines) + "\r\n").encode("utf-8", "replace"))


def _connect(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    config = runtime.config
    if args:
        try:
            config = apply_module_args(config, args, with_flags=False)
        except ConfigError as exc:
            return replies.error(f"ERR {exc}")
        runtime.update(config)
    return runtime.connect(config)


def _disconnect(runtime: Runtime, name: str, args: list[bytes], resp3: bool) -> Reply:
    if args:
        return _arity(name)
    return runtime.disconnect()


def _plain(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


HANDLERS: dict[str, Handler] = {
    "config_set": _config_set,
    "config_get": _config_get,
    "connect": _connect,
    "disconnect": _disconnect,
    "fallback_storage_size_set": _fallback_size_set,
    "keymask_clean": _keymask_clean,
    "keymask_add": _keymask_add,
    "keymask_set": _keymask_set,
    "events_set": _events_set,
    "info": _info,
}
