"""``key-evt-amqp tail``: watch the events live, from a terminal.

Binds an exclusive, auto-delete queue (the broker names it; it vanishes with the connection) to the
configured exchange and routing key, read from the same flags, environment and config file as
``serve``, and prints one line per event::

    2026-01-02T03:04:05.678Z db=0 set "greeting" id=5f1c...-1

time received (UTC), db, event, the key escaped (binary keys stay on one line: ``\\n``, ``\\xff``,
``\\"``), message_id. Gap markers (``type=key_evt_amqp.gap``) say how long and since when events
may be missing, highlighted, and are shown whatever the filters. ``--json``: one object per line
instead (``time``, ``db``, ``event``, ``key``, ``message_id``; a gap marker has ``gap: true``,
``gap_start_ms``, ``gap_end_ms``, ``source``). Colour only when stdout is a terminal (and
``NO_COLOR`` is not set). On exit (Ctrl-C, SIGTERM, ``--count``) a summary line goes to stderr:
events received, shown, and the rate.

Exit status: 0 after Ctrl-C/SIGTERM/``--count``, 1 when the broker cannot be reached or the
connection is lost, 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fnmatch
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from protocol.routing import PLACEHOLDER
from proxy import settings
from proxy.config import Config

if TYPE_CHECKING:
    import aiormq.abc

__all__ = ["Filters", "Formatter", "escape_key", "main"]

GAP_TYPE = "key_evt_amqp.gap"
PREFETCH = 1000  # messages the broker may push before we read them (the queue holds the rest)

_RESET, _BOLD_RED, _CYAN, _DIM = "\x1b[0m", "\x1b[1;31m", "\x1b[36m", "\x1b[2m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``tail``'s own flags (the connection flags are ``serve``'s: :func:`settings.add_arguments`)."""
    group = parser.add_argument_group("what to show")
    group.add_argument("--event", metavar="NAMES", default="",
                       help="only these events, comma-separated (set,del,expired); default all")
    group.add_argument("--key", metavar="GLOB", default="", help="only keys matching GLOB (* ? [...])")
    group.add_argument("--db", metavar="N", type=int, default=None, help="only events of db N")
    group.add_argument("--json", action="store_true", help="one JSON object per line (for jq)")
    group.add_argument("--count", metavar="N", type=int, default=0, help="exit after N events shown")


def escape_key(key: bytes) -> str:
    """The key in double quotes, as redis-cli shows one: printable ASCII as is, ``\\n \\r \\t
    \\" \\\\``, any other byte ``\\xHH``; so a binary key stays one line."""
    out = ['"']
    for byte in key:
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    out.append('"')
    return "".join(out)


def iso_ms(ms: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{int(ms % 1000):03d}Z"


@dataclass(frozen=True)
class Seen:
    """One message as tail sees it."""

    db: int
    event: str
    key: bytes  # for a gap marker: the source (host:port)
    message_id: str
    gap: tuple[int, int] | None = None  # (start_ms, end_ms) for a gap marker
    headers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: bytes, message_id: str | None, kind: str | None, headers: dict[str, Any],
              content_type: str | None = None) -> Seen:
        if content_type == "application/json":  # --format json (docs/event.schema.json)
            return cls._parse_json(body, message_id, headers)
        db_text, _, rest = body.partition(b"\n")
        event, _, key = rest.partition(b"\n")
        try:
            db = int(db_text)
        except ValueError:
            db = -1
        gap = None
        if kind == GAP_TYPE:
            gap = (int(headers.get("gap_start_ms", 0)), int(headers.get("gap_end_ms", 0)))
        return cls(db, event.decode("utf-8", "backslashreplace"), key, message_id or "", gap, headers)

    @classmethod
    def _parse_json(cls, body: bytes, message_id: str | None, headers: dict[str, Any]) -> Seen:
        try:
            data = json.loads(body)
            if "gap" in data:
                gap = data["gap"]
                return cls(-1, GAP_TYPE, str(gap["node"]).encode(), message_id or "",
                           (int(gap["start_ms"]), int(gap["end_ms"])), headers)
            key = data["key"].encode() if "key" in data else base64.b64decode(data["key_b64"])
            return cls(int(data["db"]), str(data["event"]), key, message_id or "", None, headers)
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(-1, "?", body, message_id or "", None, headers)  # not ours: shown raw


def binding_key(routing_key: str) -> str:
    """What tail binds: the routing key, or for a template (``redis.{db}.{event}``) the topic
    pattern with one word per placeholder (``redis.*.*``: a topic exchange is needed; events
    that ``--route`` sends elsewhere are not seen)."""
    return PLACEHOLDER.sub("*", routing_key)


@dataclass(frozen=True)
class Filters:
    events: frozenset[str] = frozenset()
    key: str = ""
    db: int | None = None

    def keep(self, seen: Seen) -> bool:
        if seen.gap is not None:
            return True  # a hole in the stream is always worth seeing
        if self.events and seen.event not in self.events:
            return False
        if self.db is not None and seen.db != self.db:
            return False
        if self.key and not fnmatch.fnmatchcase(seen.key.decode("latin-1"), self.key):
            return False
        return True


class Formatter:
    """One line per message: text (coloured on a terminal) or JSON."""

    def __init__(self, as_json: bool, colour: bool) -> None:
        self.as_json = as_json
        self.colour = colour

    def line(self, seen: Seen, now_ms: float) -> str:
        if self.as_json:
            entry: dict[str, object] = {"time": iso_ms(now_ms), "db": seen.db, "event": seen.event,
                                        "key": seen.key.decode("utf-8", "backslashreplace"),
                                        "message_id": seen.message_id}
            if seen.gap is not None:
                entry = {"time": iso_ms(now_ms), "gap": True, "gap_start_ms": seen.gap[0],
                         "gap_end_ms": seen.gap[1], "source": entry["key"], "message_id": seen.message_id,
                         **{k: str(v) for k, v in seen.headers.items() if k in ("reason", "lost", "shard", "node")}}
            return json.dumps(entry, ensure_ascii=False)
        stamp = iso_ms(now_ms)
        if seen.gap is not None:
            start, end = seen.gap
            extra = "".join(f" {k}={seen.headers[k]}" for k in ("reason", "lost", "shard") if k in seen.headers)
            text = (f"{stamp} GAP events of {seen.key.decode('utf-8', 'backslashreplace')} may be lost "
                    f"between {iso_ms(start)} and {iso_ms(end)} ({end - start} ms){extra} id={seen.message_id}")
            return f"{_BOLD_RED}{text}{_RESET}" if self.colour else text
        event = f"{_CYAN}{seen.event}{_RESET}" if self.colour else seen.event
        ident = f"{_DIM}id={seen.message_id}{_RESET}" if self.colour else f"id={seen.message_id}"
        return f"{stamp} db={seen.db} {event} {escape_key(seen.key)} {ident}"


class Tail:
    """Consume, filter, print; counts for the summary."""

    def __init__(self, config: Config, filters: Filters, formatter: Formatter, out: TextIO,
                 count: int = 0) -> None:
        self.config = config
        self.filters = filters
        self.formatter = formatter
        self.out = out
        self.count = count
        self.received = 0
        self.shown = 0
        self.started = time.monotonic()
        self.done: asyncio.Future[int] | None = None

    async def on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        props = message.header.properties
        seen = Seen.parse(message.body, props.message_id, props.message_type, dict(props.headers or {}),
                          props.content_type)
        self.received += 1
        if not self.filters.keep(seen):
            return
        self.shown += 1
        self.out.write(self.formatter.line(seen, time.time() * 1000) + "\n")
        self.out.flush()
        if self.count and self.shown >= self.count and self.done is not None and not self.done.done():
            self.done.set_result(0)

    def summary(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return (f"key-evt-amqp tail: {self.received} events received, {self.shown} shown in {elapsed:.1f} s "
                f"({self.received / elapsed:.1f}/s)")

    async def run(self, err: TextIO) -> int:
        import aiormq  # here: `key-evt-amqp --help` and `serve` need not load it for tail

        c = self.config
        url = _amqp_url(c)
        try:
            connection = await asyncio.wait_for(aiormq.connect(url), c.connect_timeout)
        except (OSError, asyncio.TimeoutError, aiormq.exceptions.AMQPError) as exc:
            err.write(f"key-evt-amqp tail: cannot connect to {_shown(c)}: {exc!r}\n")
            return 1
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, lambda: self.done.done() or self.done.set_result(0))  # type: ignore[union-attr]  # set just above
        try:
            channel = await connection.channel()
            declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
            queue = declared.queue or ""
            await channel.queue_bind(queue, c.exchange, routing_key=binding_key(c.routing_key))
            await channel.basic_qos(prefetch_count=PREFETCH)
            await channel.basic_consume(queue, self.on_message, no_ack=True)
            err.write(f"key-evt-amqp tail: queue {queue} bound to exchange {c.exchange!r} with routing key "
                      f"{binding_key(c.routing_key)!r} on {_shown(c)}; Ctrl-C to stop\n")
            err.flush()
            self.started = time.monotonic()
            lost = connection.closing
            finished, _ = await asyncio.wait([self.done, lost], return_when=asyncio.FIRST_COMPLETED)
            if self.done not in finished:
                err.write(f"key-evt-amqp tail: connection to the broker lost: {lost.exception()!r}\n")
                return 1
            return self.done.result()
        except aiormq.exceptions.AMQPError as exc:
            err.write(f"key-evt-amqp tail: the broker refused: {exc!r}\n")
            return 1
        finally:
            err.write(self.summary() + "\n")
            if not connection.is_closed:
                try:
                    await asyncio.wait_for(connection.close(), 2)
                except Exception:  # noqa: BLE001 - leaving anyway; the queue goes with the connection
                    pass


def _amqp_url(c: Config) -> str:
    from yarl import URL

    path = "/" if c.amqp_vhost == "/" else "/" + c.amqp_vhost
    return str(URL.build(scheme="amqp", user=c.amqp_user, password=c.amqp_password, host=c.amqp_host,
                         port=c.amqp_port, path=path, query={"name": "key-evt-amqp tail"}))


def _shown(c: Config) -> str:
    return f"amqp://{c.amqp_user}:***@{c.amqp_host}:{c.amqp_port}/"


def main(argv: Sequence[str], environ: dict[str, str] | os._Environ[str]) -> int:
    """``key-evt-amqp tail [flags]``: returns the exit status."""
    parser = argparse.ArgumentParser(prog="key-evt-amqp tail", add_help=False)
    add_arguments(parser)
    own, rest = parser.parse_known_args(list(argv))
    try:
        config = settings.load(rest, environ)
    except settings.ConfigError as exc:
        print(f"key-evt-amqp: {exc}", file=sys.stderr)
        return 2
    colour = sys.stdout.isatty() and not environ.get("NO_COLOR")
    filters = Filters(frozenset(e for e in own.event.split(",") if e), own.key, own.db)
    tail = Tail(config, filters, Formatter(own.json, colour), sys.stdout, own.count)
    try:
        return asyncio.run(tail.run(sys.stderr))
    except BrokenPipeError:  # `| head`: the reader left
        return 0
