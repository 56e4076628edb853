"""A bystander for load tests, in a process of its own (so the test's threads cannot stall it):
connects, answers one PING, prints `ready`, then PINGs HOST:PORT every INTERVAL seconds until its
standard input closes, then prints one JSON object
of [sent, answered] times (time.monotonic(), the system-wide CLOCK_MONOTONIC, so the test can
line them up with its own clock). Run: python bystander.py HOST PORT INTERVAL [PASSWORD]."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time


def main() -> None:
    host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    password = sys.argv[4] if len(sys.argv) > 4 else ""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    sock = socket.create_connection((host, port), timeout=30)
    if password:
        sock.sendall(b"AUTH %s\r\n" % password.encode())
        assert sock.recv(64) == b"+OK\r\n"
    sock.sendall(b"*1\r\n$4\r\nPING\r\n")  # connected through, before the load starts
    assert sock.recv(64) == b"+PONG\r\n"
    print("ready", flush=True)
    intervals = []
    while not stop.is_set():
        sent = time.monotonic()
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        reply = sock.recv(64)
        intervals.append([sent, time.monotonic()])
        if reply != b"+PONG\r\n":
            print(json.dumps({"error": repr(reply), "intervals": intervals}))
            return
        stop.wait(max(0.0, interval - (time.monotonic() - sent)))
    print(json.dumps({"error": None, "intervals": intervals}))


if __name__ == "__main__":
    main()
