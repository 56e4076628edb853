"""TLS for end-to-end tests: certificates made by the test (trustme) and a Redis that speaks TLS only.

Nothing here imports pytest. :class:`Certificates` writes PEM files into a directory: a CA, a
server certificate for ``127.0.0.1``, ``localhost`` and ``redis.test``, a client certificate, and
a second, unrelated CA (the "wrong CA"). :class:`TlsRedisServer` is a :class:`harness.RedisServer`
with ``--port 0 --tls-port <port>``: every connection to it is TLS (mutual TLS when
``auth_clients``).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import redis
import trustme

from harness import HOST, RedisServer, free_port

SERVER_NAMES = ("127.0.0.1", "localhost", "redis.test")


class Certificates:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        ca = trustme.CA()
        self.ca = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        server = ca.issue_cert(*SERVER_NAMES)
        self.server_cert, self.server_key = directory / "server.crt", directory / "server.key"
        server.cert_chain_pems[0].write_to_path(str(self.server_cert))
        server.private_key_pem.write_to_path(str(self.server_key))
        client = ca.issue_cert("key-evt-amqp-client")
        self.client_cert, self.client_key = directory / "client.crt", directory / "client.key"
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))
        only_name = ca.issue_cert("redis.test")  # not valid for 127.0.0.1: needs the server name
        self.named_cert, self.named_key = directory / "named.crt", directory / "named.key"
        only_name.cert_chain_pems[0].write_to_path(str(self.named_cert))
        only_name.private_key_pem.write_to_path(str(self.named_key))
        self.wrong_ca = directory / "wrong-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(self.wrong_ca))

    def client_context(self, with_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if with_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context

    def proxy_args(self, with_cert: bool = True) -> list[str]:
        """The proxy's flags for a TLS upstream signed by this CA (with the client certificate)."""
        args = ["--upstream-tls-ca", str(self.ca)]
        if with_cert:
            args += ["--upstream-tls-cert", str(self.client_cert), "--upstream-tls-key", str(self.client_key)]
        return args

    def redis_cli_args(self) -> list[str]:
        return ["--tls", "--cacert", str(self.ca), "--cert", str(self.client_cert), "--key", str(self.client_key)]


class TlsRedisServer(RedisServer):
    """A Redis that listens with TLS only, on :attr:`port`."""

    def __init__(self, certs: Certificates, extra_args: tuple[str, ...] | list[str] = (), *,
                 auth_clients: bool = True, port: int | None = None, named_only: bool = False) -> None:
        port = port or free_port()
        cert, key = (certs.named_cert, certs.named_key) if named_only else (certs.server_cert, certs.server_key)
        super().__init__(["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                          "--tls-key-file", str(key), "--tls-ca-cert-file", str(certs.ca),
                          "--tls-auth-clients", "yes" if auth_clients else "no", *extra_args], port=port)
        self.certs = certs
        self.named_only = named_only

    @property
    def url(self) -> str:
        return f"rediss://{self.host}:{self.port}/"

    def _context(self) -> ssl.SSLContext:
        context = self.certs.client_context()
        if self.named_only:
            context.check_hostname = False
        return context

    def _pings(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as raw, \
                    self._context().wrap_socket(raw, server_hostname=self.host) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
            return reply.startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def client(self, **kw: Any) -> redis.Redis:
        kw.setdefault("ssl", True)
        kw.setdefault("ssl_ca_certs", str(self.certs.ca))
        kw.setdefault("ssl_certfile", str(self.certs.client_cert))
        kw.setdefault("ssl_keyfile", str(self.certs.client_key))
        kw.setdefault("ssl_check_hostname", not self.named_only)
        return super().client(**kw)


__all__ = ["HOST", "Certificates", "TlsRedisServer"]
