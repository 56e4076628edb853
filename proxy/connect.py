"""Opening a connection to Redis: the one place that does it.

Every connection the proxy opens to a Redis server goes through :func:`open_redis`: each client's
upstream (:mod:`proxy.relay`), each client's node links (:mod:`proxy.cluster.relay`), the cluster's
control queries (:func:`proxy.cluster.topology.query`), and the event pipeline's subscriber and
command links (:func:`proxy.events.redis_link.open_link`). What is said on the connection is the
caller's business (a relay replays the client's own AUTH, the pipeline sends its own); how the
server is reached is decided here, from the :class:`~proxy.config.RedisAddress`: plain TCP today,
and this is where TLS, a unix socket or Sentinel would be added, once for everyone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from proxy.config import RedisAddress

__all__ = ["open_redis", "open_redis_streams"]

P = TypeVar("P", bound=asyncio.BaseProtocol)


async def open_redis(address: RedisAddress, protocol_factory: Callable[[], P], *,
                     timeout: float) -> tuple[asyncio.Transport, P]:
    """Connect to the Redis server at ``address``, driven by ``protocol_factory()``; nothing is
    sent (no AUTH, no SELECT). Raises ``OSError`` when the server cannot be reached, and
    ``TimeoutError`` (an ``OSError`` too) after ``timeout`` seconds: the caller decides whether
    that means closing a client, retrying later or reporting the node as down."""
    loop = asyncio.get_running_loop()
    transport, protocol = await asyncio.wait_for(
        loop.create_connection(protocol_factory, address.host, address.port), timeout)
    return transport, protocol


async def open_redis_streams(address: RedisAddress, *,
                             timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`open_redis` as an asyncio stream pair, for short control queries (never the data
    path: a stream costs a buffer and a task hop per read). Raises as :func:`open_redis`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    transport, protocol = await open_redis(
        address, lambda: asyncio.StreamReaderProtocol(reader, loop=loop), timeout=timeout)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
