"""TLS in front of the shared RabbitMQ, for ``amqps://`` tests and benchmarks: certificates made
with the ``openssl`` command and a TLS terminator (``socat``) the test starts and stops.

``Certificates(directory)`` writes a CA, a server certificate for ``rabbit.test`` and 127.0.0.1,
a client certificate signed by the same CA, and an unrelated CA (``other_ca``) that signed
nothing here. ``TlsTerminator(certs, client_ca=...)`` listens on ``.port`` (TLS; with
``client_ca`` it requires a client certificate signed by it) and forwards the plain bytes to
127.0.0.1:5672; with ``tls=False`` it is the same socat relay without TLS (the benchmark's
extra hop alone). The broker itself is never reconfigured. Nothing here imports pytest or the
rest of tests/ (bench/ imports it as ``tests.amqps``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["Certificates", "TlsTerminator", "SERVER_NAME"]

SERVER_NAME = "rabbit.test"
HOST = "127.0.0.1"
AMQP_PORT = 5672
START_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("openssl not found on PATH: install it (apt-get install openssl)")
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True)


class Certificates:
    """PEM files in ``directory``: ``ca``, ``server_cert``/``server_key``, ``client_cert``/
    ``client_key`` (signed by ``ca``) and ``other_ca`` (a CA that signed none of them)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = directory / "ca.pem"
        self.other_ca = directory / "other-ca.pem"
        self.server_cert, self.server_key = directory / "server.pem", directory / "server.key"
        self.client_cert, self.client_key = directory / "client.pem", directory / "client.key"
        self._make_ca("ca", "key-evt-amqp test CA")
        self._make_ca("other-ca", "key-evt-amqp unrelated CA")
        self._make_leaf("server", SERVER_NAME, f"subjectAltName=DNS:{SERVER_NAME},IP:{HOST}\n"
                        "extendedKeyUsage=serverAuth\n")
        self._make_leaf("client", "key-evt-amqp proxy", "extendedKeyUsage=clientAuth\n")

    def _make_ca(self, name: str, subject: str) -> None:
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={subject}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=self.dir)

    def _make_leaf(self, name: str, subject: str, extensions: str) -> None:
        (self.dir / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" + extensions)
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={subject}", cwd=self.dir)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
                 cwd=self.dir)

    @classmethod
    def temporary(cls) -> tuple[Certificates, tempfile.TemporaryDirectory[str]]:
        """Certificates in a new temporary directory (remove it with the returned handle)."""
        tmp = tempfile.TemporaryDirectory(prefix="kea-amqps-")
        return cls(Path(tmp.name)), tmp


class TlsTerminator:
    """``socat`` terminating TLS on ``.port`` in front of RabbitMQ (a new socat per connection)."""

    def __init__(self, certs: Certificates, client_ca: Path | None = None, target_port: int = AMQP_PORT,
                 tls: bool = True) -> None:
        self.certs = certs
        self.client_ca = client_ca
        self.target_port = target_port
        self.tls = tls
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TlsTerminator:
        binary = shutil.which("socat")
        if binary is None:
            raise RuntimeError("socat not found on PATH: install it (apt-get install socat)")
        if self.tls:
            listen = (f"OPENSSL-LISTEN:{self.port},bind={HOST},reuseaddr,fork,nodelay,"
                      f"cert={self.certs.server_cert},key={self.certs.server_key}")
            listen += f",verify=1,cafile={self.client_ca}" if self.client_ca else ",verify=0"
        else:
            listen = f"TCP-LISTEN:{self.port},bind={HOST},reuseaddr,fork,nodelay"
        self.proc = subprocess.Popen([binary, listen, f"TCP:{HOST}:{self.target_port},nodelay"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"socat did not listen on {self.port}")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        """Stop socat and the children serving open connections (its own process group)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> TlsTerminator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
