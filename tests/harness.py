"""Processes for end-to-end tests: private ``redis-server`` instances and the proxy itself.

Nothing here imports pytest, so scripts and benchmarks can use it too. Every process is started on a
free port in a temporary directory and must be stopped by the caller (each class is a context manager).
The shared Redis on 6379 and RabbitMQ on 5672 are never touched.

Typical use::

    with RedisServer() as redis_server, ProxyProcess(redis_server.url) as proxy:
        client = redis.Redis(port=proxy.port)
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT = 15.0  # seconds for a process to accept connections
#: Set to run the suite against another build of the proxy, e.g. the installed console script:
#: ``KEA_PROXY_COMMAND="key-evt-amqp"``. The default is ``python -m proxy`` from this checkout.
PROXY_COMMAND_ENV = "KEA_PROXY_COMMAND"
LOG_TAIL_CHARS = 4000


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it; a race with other processes is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


#: The AMQP password given to proxies started by the shared fixtures: config_get must never show it.
TEST_AMQP_PASSWORD = "s3cret-amqp-pw"


def unreachable_amqp_url(password: str = TEST_AMQP_PASSWORD) -> str:
    """An AMQP URL on a port where nothing listens, so a proxy never reaches the shared RabbitMQ."""
    return f"amqp://guest:{password}@{HOST}:{free_port()}/"


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             message: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Exceptions raised by the predicate count as "not yet". On timeout, raise AssertionError naming the
    predicate, ``message`` and the last exception seen.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - "not ready yet" can look like anything
            last_error = exc
        if time.monotonic() >= deadline:
            name = getattr(predicate, "__name__", repr(predicate))
            detail = f"; last error: {last_error!r}" if last_error else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {name} {message}{detail}")
        time.sleep(interval)


def no_retry() -> Retry:
    """redis-py retries failed connections by default; a test must see each failure as it happens."""
    return Retry(NoBackoff(), 0)


def port_accepts(port: int, host: str = HOST) -> bool:
    """True when a TCP connect to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<no log: {exc}>"


def _reap(proc: subprocess.Popen | None, sig: int, timeout: float) -> int | None:
    """Send ``sig`` to a still-running process and wait for it; SIGKILL if it does not exit in time."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


class RedisServer:
    """A private ``redis-server`` on a free port, with its data directory in a temporary directory.

    ``start()`` returns once PING answers. ``restart()`` comes back on the same port with the same
    arguments (after ``kill()`` or ``stop()``). The directory and log survive restarts and go at ``close()``.
    """

    def __init__(self, extra_args: Sequence[str] = (), port: int | None = None) -> None:
        self.host = HOST
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self._tmp = tempfile.TemporaryDirectory(prefix="kea-redis-")
        self.dir = Path(self._tmp.name)
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None
        self._password = self._arg_value("--requirepass")

    def _arg_value(self, name: str) -> str | None:
        args = list(self.extra_args)
        if name in args and args.index(name) + 1 < len(args):
            return args[args.index(name) + 1]
        return None

    @property
    def url(self) -> str:
        """``redis://host:port/`` (no credentials: give them to the proxy's clients, not the URL)."""
        return f"redis://{self.host}:{self.port}/"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found on PATH: install it (apt-get install redis-server)")
        argv = [binary, "--port", str(self.port), "--bind", self.host, "--dir", str(self.dir),
                "--save", "", "--appendonly", "no", "--logfile", str(self.log_path),
                "--daemonize", "no", *self.extra_args]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            if self._pings():
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING:\n{_tail(self.log_path)}")

    def _pings(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
            # Either +PONG or -NOAUTH: both mean the server is up and serving.
            return reply.startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def client(self, **kw: Any) -> redis.Redis:
        """A redis-py client straight to this server (admin password filled in when there is one)."""
        kw.setdefault("host", self.host)
        kw.setdefault("port", self.port)
        kw.setdefault("decode_responses", False)
        kw.setdefault("socket_timeout", 10)
        kw.setdefault("retry", no_retry())
        if self._password is not None:
            kw.setdefault("password", self._password)
        return redis.Redis(**kw)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, falling back to SIGTERM; waits for the process to exit."""
        if not self.is_running():
            return
        try:
            with self.client(socket_timeout=2) as c:
                c.execute_command("SHUTDOWN", "NOSAVE")
        except redis.ConnectionError:
            pass  # the expected outcome: the server closes the connection as it exits
        except redis.RedisError:
            pass
        _reap(self.proc, signal.SIGTERM, timeout=5)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        _reap(self.proc, signal.SIGKILL, timeout=5)

    def restart(self) -> RedisServer:
        """Stop if running, then start again on the same port with the same arguments."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.kill()
        self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ProxyProcess:
    """``python -m proxy serve`` on a free port in front of ``upstream_url``, logging to a file.

    ``start()`` returns once the port accepts TCP connections; when it does not within 15 s (or the
    process exits), it raises with the tail of the log. ``stop()`` sends SIGTERM and returns the exit code.
    """

    def __init__(self, upstream_url: str, extra_args: Sequence[str] = (), port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.host = HOST
        self.port = port or free_port()
        self.upstream_url = upstream_url
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})
        self._tmp = tempfile.TemporaryDirectory(prefix="kea-proxy-")
        self.log_path = Path(self._tmp.name) / "proxy.log"
        self.proc: subprocess.Popen | None = None
        self._log_file: Any = None

    @property
    def argv(self) -> list[str]:
        override = os.environ.get(PROXY_COMMAND_ENV)
        command = shlex.split(override) if override else [sys.executable, "-m", "proxy"]
        return [*command, "serve", "--listen", f"{self.host}:{self.port}",
                "--upstream", self.upstream_url, *self.extra_args]

    def start(self) -> ProxyProcess:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # Our own settings only come from the arguments; do not inherit a developer's environment.
        for name in [n for n in env if n.startswith("KEY_EVT_AMQP_")]:
            del env[name]
        env.update(self.extra_env)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode} at start:\n{self.log_text()[-LOG_TAIL_CHARS:]}")
            if self._accepts():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"proxy did not listen on {self.port} within {START_TIMEOUT}s:\n"
                           f"{self.log_text()[-LOG_TAIL_CHARS:]}")

    @property
    def unix_path(self) -> str | None:
        """The unix socket given with ``--listen unix:PATH`` in the extra arguments (the last
        ``--listen`` wins), else None."""
        args = list(self.extra_args)
        listens = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--listen"]
        return listens[-1][len("unix:"):] if listens and listens[-1].startswith("unix:") else None

    def _accepts(self) -> bool:
        path = self.unix_path
        if path is None:
            return port_accepts(self.port, self.host)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
            return True
        except OSError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kw: Any) -> redis.Redis:
        """A redis-py client to the proxy (decode_responses=False unless given)."""
        kw.setdefault("host", self.host)
        kw.setdefault("port", self.port)
        kw.setdefault("decode_responses", False)
        kw.setdefault("socket_timeout", 10)
        kw.setdefault("retry", no_retry())
        return redis.Redis(**kw)

    def rss_bytes(self) -> int:
        """The proxy's resident set size, from /proc/<pid>/status."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout`` (then SIGKILL), return the exit code."""
        code = _reap(self.proc, signal.SIGTERM, timeout)
        self._close_log()
        return -1 if code is None else code

    def kill(self) -> None:
        _reap(self.proc, signal.SIGKILL, timeout=5)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        self.kill()
        self._tmp.cleanup()

    def __enter__(self) -> ProxyProcess:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def exchange(port: int, chunks: Sequence[bytes], *, half_close: bool = False, idle: float = 0.5,
             gap: float = 0.0, host: str = HOST) -> tuple[bytes, bool]:
    """Send ``chunks`` (one write each, ``gap`` seconds apart), half-close if asked, then read until
    the peer closes (True) or stays silent for ``idle`` seconds (False). A reset counts as a close."""
    with socket.create_connection((host, port), timeout=10) as sock:
        for i, chunk in enumerate(chunks):
            if i and gap:
                time.sleep(gap)
            sock.sendall(chunk)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock, idle)


def read_until_closed(sock: socket.socket, idle: float, received: bytes = b"") -> tuple[bytes, bool]:
    """``received`` and everything the peer sends after it until it closes (True: EOF or reset)
    or stays silent for ``idle`` seconds (False)."""
    data = bytearray(received)
    sock.settimeout(idle)
    try:
        while chunk := sock.recv(65536):
            data += chunk
        return bytes(data), True
    except ConnectionResetError:
        return bytes(data), True
    except TimeoutError:
        return bytes(data), False


class ErrorReply(bytes):
    """A RESP error reply (``-ERR ...``), kept as a value: ``ErrorReply(b"ERR unknown command ...")``."""


class PushReply(list):
    """A RESP3 push (``>``), e.g. an invalidation message or a pub/sub message."""


def encode_command(*args: bytes | str | int) -> bytes:
    """One command as a RESP multibulk request."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RawClient:
    """A plain socket speaking RESP, for what redis-py hides: byte-exact requests and replies.

    ``read_reply()`` returns bytes for simple and bulk strings, int, None, list, dict (RESP3 maps),
    :class:`ErrorReply` for errors and :class:`PushReply` for pushes. It raises ConnectionError when
    the peer closes before a whole reply arrived.
    """

    def __init__(self, port: int, host: str = HOST, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, *args: bytes | str | int) -> Any:
        self.send(encode_command(*args))
        return self.read_reply()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed by peer; unparsed bytes: {bytes(self._buf[:200])!r}")
        self._buf += chunk

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        return line

    def _exact(self, size: int) -> bytes:
        while len(self._buf) < size + 2:
            self._fill()
        data = bytes(self._buf[:size])
        del self._buf[:size + 2]
        return data

    def read_reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return ErrorReply(rest)
        if kind == b":":
            return int(rest)
        if kind in (b"$", b"="):
            return None if rest == b"-1" else self._exact(int(rest))
        if kind in (b"*", b"~", b">"):
            if rest == b"-1":
                return None
            items = [self.read_reply() for _ in range(int(rest))]
            return PushReply(items) if kind == b">" else items
        if kind == b"%":
            return {self._key(self.read_reply()): self.read_reply() for _ in range(int(rest))}
        if kind == b"_":
            return None
        if kind == b"#":
            return rest == b"t"
        if kind == b",":
            return float(rest)
        if kind == b"(":
            return int(rest)
        raise AssertionError(f"not a RESP reply line: {line!r}")

    @staticmethod
    def _key(value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    def read_replies(self, count: int) -> list[Any]:
        return [self.read_reply() for _ in range(count)]

    def read_until_closed(self, timeout: float = 5.0) -> tuple[bytes, bool]:
        """Everything the peer sends until it closes: (bytes, closed?). Not closed means ``timeout`` passed."""
        received = bytes(self._buf)
        self._buf.clear()
        return read_until_closed(self.sock, timeout, received)

    def is_closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the peer closes (EOF or reset) within ``timeout``, ignoring bytes it sends first."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TcpTap:
    """A TCP forwarder to ``target_port`` that records what passes, to see what the proxy sends Redis.

    Point the proxy's upstream at ``tap.url``. ``sent`` holds every byte forwarded towards the target
    (all connections, interleaved), ``received`` every byte coming back; both are capped at
    ``RECORD_LIMIT`` (later bytes are forwarded but not recorded).
    """

    RECORD_LIMIT = 64 * 1024 * 1024

    def __init__(self, target_port: int, host: str = HOST) -> None:
        self.host = host
        self.target_port = target_port
        self.sent = bytearray()
        self.received = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._start(self._accept_loop)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/"

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            try:
                upstream = socket.create_connection((self.host, self.target_port))
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            self._start(self._pump, client, upstream, self.sent)
            self._start(self._pump, upstream, client, self.received)

    def _pump(self, source: socket.socket, sink: socket.socket, record: bytearray) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    if len(record) < self.RECORD_LIMIT:
                        record += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def sent_bytes(self) -> bytes:
        with self._lock:
            return bytes(self.sent)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        self._listener.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in sockets:
            sock.close()

    def __enter__(self) -> TcpTap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


#: DBSIZE without the proxy's own keys (names containing ``key_evt_amqp``: the fleet's lease,
#: token, members, done checkpoints, shared settings, the fallback list), in one atomic step.
_USER_DBSIZE = "return redis.call('DBSIZE') - #redis.call('KEYS', '*key_evt_amqp*')"


def user_dbsize(client: redis.Redis) -> int:
    """The number of keys in ``client``'s db that are not the proxy's own (see above)."""
    return int(client.eval(_USER_DBSIZE, 0))
