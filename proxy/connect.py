"""Opening a connection to Redis: the one place that does it.

Every connection the proxy opens to a Redis server goes through :func:`open_redis`: each client's
upstream (:mod:`proxy.relay`), each client's node links (:mod:`proxy.cluster.relay`), the cluster's
control queries (:func:`proxy.cluster.topology.query`), and the event pipeline's subscriber and
command links (:func:`proxy.events.redis_link.open_link`). What is said on the connection is the
caller's business (a relay replays the client's own AUTH, the pipeline sends its own); how the
server is reached is decided here, from the :class:`~proxy.config.RedisAddress`, once for everyone:

- TCP, or a unix socket (``unix_path``);
- TLS (``tls``), with one :class:`ssl.SSLContext` per TLS setting, built once (:func:`tls_context`);
- Sentinel (``sentinel``): the master the running :class:`proxy.sentinel.SentinelWatch` knows
  (it registers itself with :func:`set_locator`); a connection opened before a failover stays
  where it is (the watch has the clients closed, as Sentinel has Redis close them).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from proxy.config import RedisAddress, RedisTLS, Sentinels

__all__ = ["open_redis", "open_redis_streams", "server_tls_context", "set_locator", "tls_context", "tls_reason"]

P = TypeVar("P", bound=asyncio.BaseProtocol)

#: ``locate(timeout)`` -> the current master's address, or OSError when none is known now.
Locate = Callable[[float], Awaitable[RedisAddress]]
_locators: dict[Sentinels, Locate] = {}


def set_locator(sentinels: Sentinels, locate: Locate | None) -> None:
    """Have :func:`open_redis` ask ``locate`` for the master of ``sentinels`` (None: forget it)."""
    if locate is None:
        _locators.pop(sentinels, None)
    else:
        _locators[sentinels] = locate


@functools.lru_cache(maxsize=8)
def tls_context(tls: RedisTLS) -> ssl.SSLContext:
    """The client-side context for ``tls``, built once per setting (files are read here).
    Raises ValueError(reason) when a file cannot be read or does not hold what it should."""
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file is not None:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(tls_reason(exc)) from None
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@functools.lru_cache(maxsize=2)
def server_tls_context(cert_file: str, key_file: str, ca_file: str | None) -> ssl.SSLContext:
    """The listener's context (``--tls-cert``, ``--tls-key``, ``--tls-ca``): built here too, so
    that every TLS context of the proxy comes from one module. With ``ca_file`` a client must
    show a certificate that chains to it. Raises ValueError(reason) as :func:`tls_context`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
        if ca_file is not None:
            context.load_verify_locations(cafile=ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(tls_reason(exc)) from None
    return context


def tls_reason(exc: BaseException) -> str:
    """One line for a TLS failure: OpenSSL's reason (``certificate verify failed: unable to get
    local issuer certificate``), without the ``[SSL: ...] ... (_ssl.c:1000)`` decoration."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def _located(address: RedisAddress, timeout: float) -> RedisAddress:
    if address.sentinel is None:
        return address
    locate = _locators.get(address.sentinel)
    if locate is None:
        raise OSError(errno.EHOSTUNREACH, f"no master named {address.sentinel.master!r} is known "
                                          "(Sentinel not started)")
    return await locate(timeout)


async def open_redis(address: RedisAddress, protocol_factory: Callable[[], P], *,
                     timeout: float) -> tuple[asyncio.Transport, P]:
    """Connect to the Redis server at ``address``, driven by ``protocol_factory()``; nothing is
    sent (no AUTH, no SELECT). Raises ``OSError`` when the server cannot be reached (an
    ``ssl.SSLError`` when the TLS handshake fails: :func:`tls_reason` words it), and
    ``TimeoutError`` (an ``OSError`` too) after ``timeout`` seconds: the caller decides whether
    that means closing a client, retrying later or reporting the node as down."""
    if address.sentinel is not None:
        located = await _located(address, timeout)
        transport, protocol = await open_redis(located, protocol_factory, timeout=timeout)
        if await _located(address, timeout) != located:
            # the master changed while we connected: the watch has closed everyone else by now
            transport.abort()
            raise ConnectionResetError(errno.ECONNRESET, "the master changed while connecting")
        return transport, protocol
    loop = asyncio.get_running_loop()
    options: dict[str, Any] = {}
    if address.tls is not None:
        options = {"ssl": tls_context(address.tls), "ssl_handshake_timeout": timeout,
                   "server_hostname": address.tls.server_name or address.host}
    if address.unix_path is not None:
        connecting = loop.create_unix_connection(protocol_factory, address.unix_path, **options)
    else:
        connecting = loop.create_connection(protocol_factory, address.host, address.port, **options)
    transport, protocol = await asyncio.wait_for(connecting, timeout)
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
