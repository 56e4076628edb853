"""A TCP relay the tests control, placed between the proxy and RabbitMQ (or any server).

``FaultRelay(target_port)`` listens on ``.port`` and forwards every connection to the target.

- ``cut()``: abort every live connection (RST both ways) and refuse new ones until ``restore()``;
- ``blackhole()``: keep the connections open but drop every byte in both directions (a network
  partition as TCP sees it: writes succeed, nothing ever arrives), new ones too;
- ``stall()``: stop reading from the client (its bytes wait in the TCP buffers) while the server's
  bytes still flow to it: what a RabbitMQ connection blocked by a resource alarm looks like;
- ``restore()``: forward again (connections black-holed before stay broken: their streams lost
  bytes, the client must notice and reconnect);
- ``close()``: stop everything.

Thread-based and blocking on purpose: nothing here shares the event loop of the code under test.
"""

from __future__ import annotations

import socket
import struct
import threading

__all__ = ["FaultRelay"]

HOST = "127.0.0.1"
_FORWARD, _CUT, _BLACKHOLE, _STALL = "forward", "cut", "blackhole", "stall"


def _rst_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class FaultRelay:
    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        self.target = (target_host, target_port)
        self.mode = _FORWARD
        self.accepted = 0
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        self._flowing = threading.Event()
        self._flowing.set()
        self._thread = threading.Thread(target=self._accept_loop, name="fault-relay", daemon=True)
        self._thread.start()

    # control
    def cut(self) -> None:
        with self._lock:
            self.mode = _CUT
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            _rst_close(client)
            _rst_close(upstream)

    def blackhole(self) -> None:
        with self._lock:
            self.mode = _BLACKHOLE

    def stall(self) -> None:
        with self._lock:
            self.mode = _STALL
            self._flowing.clear()

    def restore(self) -> None:
        with self._lock:
            self.mode = _FORWARD
            self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._flowing.set()
        try:
            self._listener.close()
        except OSError:
            pass

    def __enter__(self) -> FaultRelay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # machinery
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == _CUT:
                _rst_close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _rst_close(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            for src, dst, outbound in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, outbound), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        try:
            while True:
                while outbound and not self._flowing.wait(0.2):
                    if self._closed or src.fileno() < 0:
                        return
                data = src.recv(65536)
                if not data:
                    break
                if self.mode in (_FORWARD, _STALL):
                    dst.sendall(data)
                # in a black hole (or after a cut) the bytes are dropped
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
