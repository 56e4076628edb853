"""What :mod:`proxy` raises on purpose: one root, so a caller can catch all of it.

Exception tree::

    ProxyError                  root: ``except ProxyError`` catches anything the proxy raises on purpose
    ├── ConfigError             a setting is invalid; ``str(exc)`` is one line naming it and the value
    │                           (passwords as ``***``): print it and exit 2, or send it as ``-ERR``
    ├── TopologyError           no cluster node gave a full slot map; the refresher logs it and
    │                           tries again (the last good map stays in use)
    ├── SentinelError           at start, no sentinel named a master that says it is one
    │                           (``redis+sentinel://``): print it and exit 1
    ├── CommandError            one of our ``key_evt_amqp.*`` commands failed: reply ``-`` + ``str(exc)``
    └── EventsError             root of the event pipeline (:mod:`proxy.events.errors`)
        ├── AmqpCommandError    key_evt_amqp.connect / disconnect failed (also a CommandError),
        │                       e.g. ``AMQP CONNECT ERROR: 3``
        ├── LinkError           a pipeline connection to Redis dropped (also a ConnectionError):
        │                       retry after a backoff
        ├── BrokerError         connecting to RabbitMQ failed; ``code`` is the module's CONNECT ERROR
        └── AiormqIncompatible  (also an ImportError) the installed aiormq lacks a hook we use

Kept apart, as in :mod:`protocol.errors`: ``protocol.ProtocolError`` (a client sent bytes Redis
would reject: send its ``.reply``, then close) is the peer's fault, not ours, and stays in its own
tree. Redis error *replies* are values that pass through (bytes in the relays, ``hiredis.ReplyError``
instances in the pipeline), never exceptions. Failing to connect is the ``OSError`` /
``TimeoutError`` of :func:`proxy.connect.open_redis`; each caller says what it means for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

__all__ = ["check_cancelled", "CommandError", "ConfigError", "ProxyError", "SentinelError", "TopologyError"]


class ProxyError(Exception):
    """Root of every error raised on purpose by :mod:`proxy`."""


class ConfigError(ProxyError):
    """A setting is invalid. ``str(error)`` is one line: print it, or send it as a Redis error."""


class TopologyError(ProxyError):
    """No seed or known node answered ``CLUSTER SLOTS`` with a full map."""


class SentinelError(ProxyError):
    """No sentinel named a master that ``ROLE`` confirms; ``str(error)`` gives each one's reason."""


class CommandError(ProxyError):
    """One of our commands failed in a way the client must hear: reply ``-`` + ``str(exc)``."""


def check_cancelled() -> None:
    """Raise CancelledError if the running task was asked to stop.

    Python 3.11's ``asyncio.wait_for`` can swallow a cancellation that arrives just as the awaited
    operation fails (a connection refused at the same moment): the caller then sees the failure,
    not the cancellation, and a retry loop would retry for ever while ``stop()`` waits for it.
    Every retry loop calls this once per round."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


STOP_WAIT = 2.0  # seconds a stop waits for a cancelled task


async def stopped(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Wait for cancelled ``tasks`` to end, at most :data:`STOP_WAIT` (a cancellation lost by
    ``wait_for``, see :func:`check_cancelled`, must not hang a stop)."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    if pending:
        await asyncio.wait(pending, timeout=STOP_WAIT)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a failure was logged where it happened
