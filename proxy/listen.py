"""Where clients connect: a TCP address or a unix socket, plain or TLS (``--listen``, ``--tls-*``).

:func:`open_listener` returns an :class:`asyncio.Server`-like :class:`Listener`. For a unix socket
it also owns the socket file: a stale one (left by a crash: nobody accepts on it) is removed
before binding, a live one (another process serves it) is an error, and the file is created with
``listen_perm`` (never wider in between: it is bound under a 0o177 umask) and removed at
:meth:`Listener.close` if it is still ours. A client whose TLS handshake fails is closed by the
event loop before any :class:`~proxy.relay.ClientConnection` exists: nobody else notices.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
import stat
from collections.abc import Callable
from typing import Any

from proxy.config import SECONDS, Config

__all__ = ["Listener", "open_listener"]

#: Longest a client may take over its TLS handshake before it is closed (a slowloris bound).
HANDSHAKE_TIMEOUT = 10 * SECONDS
_BACKLOG = 1024


class Listener:
    def __init__(self, server: asyncio.base_events.Server, unix_path: str | None = None,
                 unix_inode: int = 0) -> None:
        self.server = server
        self.unix_path = unix_path
        self._inode = unix_inode

    @property
    def addresses(self) -> list[str]:
        if self.unix_path is not None:
            return [f"unix:{self.unix_path}"]
        out = []
        for sock in self.server.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    def close(self) -> None:
        """Stop accepting; remove the unix socket file if it is still the one we made."""
        self.server.close()
        if self.unix_path is not None:
            try:
                if os.lstat(self.unix_path).st_ino == self._inode:
                    os.unlink(self.unix_path)
            except OSError:
                pass

    async def wait_closed(self) -> None:
        await self.server.wait_closed()


async def open_listener(factory: Callable[[], asyncio.Protocol], config: Config,
                        tls: ssl.SSLContext | None, *, reuse_port: bool = False) -> Listener:
    """Listen where ``config`` says; raises OSError (``strerror`` says why) when that is not possible.
    ``reuse_port`` (TCP): share the port with the other workers (``SO_REUSEPORT``)."""
    loop = asyncio.get_running_loop()
    options: dict[str, Any] = {"ssl": tls, "ssl_handshake_timeout": HANDSHAKE_TIMEOUT} if tls is not None else {}
    if config.listen_unix is None:
        server = await loop.create_server(factory, config.listen_host, config.listen_port,
                                          reuse_address=True, reuse_port=reuse_port, backlog=_BACKLOG,
                                          **options)
        return Listener(server)
    path = config.listen_unix
    _remove_stale(path)
    umask = os.umask(0o177)
    try:
        server = await loop.create_unix_server(factory, path, backlog=_BACKLOG, **options)
    finally:
        os.umask(umask)
    os.chmod(path, config.listen_perm)
    return Listener(server, path, os.lstat(path).st_ino)


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody accepts on; leave anything else (and say so)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "the path exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: left by a process that is gone
            return
        except OSError:
            return  # let the bind report it
    raise OSError(errno.EADDRINUSE, "another process accepts connections on this socket")
