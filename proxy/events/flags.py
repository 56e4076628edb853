"""``notify-keyspace-events``: make a Redis publish the event classes the proxy forwards.

Used on the subscriber's own connection *before* it subscribes (so the subscription's
confirmation is the moment from which Redis emits everything selected: the end of a gap), and on
the command link when the selection changes at run time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import hiredis

from protocol.events import notify_flags_update

__all__ = ["Run", "ensure_notify_flags"]

log = logging.getLogger("key_evt_amqp.events")

#: Sends commands in one write and returns their replies; raises LinkError when the link fails.
Run = Callable[[Sequence[Sequence[bytes | str | int]]], Awaitable[list[Any]]]


def _config_value(reply: Any) -> str | None:
    """The value in a ``CONFIG GET`` reply (RESP2 list or RESP3 map), None if it is not one."""
    if isinstance(reply, dict):
        reply = [item for pair in reply.items() for item in pair]
    if isinstance(reply, list) and len(reply) >= 2 and isinstance(reply[1], bytes):
        return reply[1].decode()
    return None


async def ensure_notify_flags(run: Run, classes: Iterable[str], where: str = "") -> tuple[str, str]:
    """Add ``E`` and ``classes`` to ``notify-keyspace-events``, keeping every other letter.

    Returns ``(value, error)``: the value Redis has now (``""`` when it could not be read) and why
    it could not be read or changed (``""`` when it suffices now). A refused ``CONFIG`` is an
    error value, not an exception (managed Redis); a failed connection raises LinkError.
    """
    (reply,) = await run([("CONFIG", "GET", "notify-keyspace-events")])
    current = _config_value(reply)
    if current is None:
        return "", f"CONFIG GET refused: {reply}"
    wanted = notify_flags_update(current, classes)
    if wanted is None:
        return current, ""
    (answer,) = await run([("CONFIG", "SET", "notify-keyspace-events", wanted)])
    if isinstance(answer, hiredis.ReplyError):
        return current, f"CONFIG SET notify-keyspace-events {wanted} refused: {answer}"
    log.info("notify-keyspace-events%s changed from %r to %r", f" on {where}" if where else "", current, wanted)
    return wanted, ""
