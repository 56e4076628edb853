"""``key-evt-amqp tail`` against the real broker: a subprocess bound to the proxy's routing key,
events made through the proxy, its output read back (text, JSON, a real terminal, a pipe)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from harness import REPO_ROOT, ProxyProcess, RedisServer, free_port, wait_for

TAIL = [sys.executable, "-m", "proxy", "tail"]
READY = "; Ctrl-C to stop"
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z db=(-?\d+) (\S+) (\".*\") id=(\S+)$")


@pytest.fixture
def routing_key() -> str:
    return f"kea-tail-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def events_proxy(redis_server: RedisServer, routing_key: str) -> Iterator[ProxyProcess]:
    with ProxyProcess(redis_server.url, ("--routing-key", routing_key, "--events", "A",
                                         "--keymask", "ALL")) as proxy:
        yield proxy


def start_tail(routing_key: str, *flags: str, stdout: int | None = subprocess.PIPE) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEY_EVT_AMQP_") and k != "NO_COLOR"}
    tail = subprocess.Popen([*TAIL, *flags], cwd=REPO_ROOT, text=True, stdout=stdout, stderr=subprocess.PIPE,
                            env={**env, "KEY_EVT_AMQP_ROUTING_KEY": routing_key})
    assert tail.stderr is not None
    line = tail.stderr.readline()  # the queue is bound once this line is out
    assert READY in line, line + tail.stderr.read()
    return tail


def test_one_line_per_event_filtered_with_a_summary(events_proxy: ProxyProcess, routing_key: str) -> None:
    tail = start_tail(routing_key, "--event", "set,del", "--key", "user:*", "--db", "3", "--count", "4")
    with events_proxy.client(db=3) as client:
        client.set("user:1", "a")
        client.set("other:1", "a")  # key filtered
        client.lpush("user:list", "x")  # event filtered
        client.set(b"user:bin\n\xff\"q", "a")  # binary key: one line, escaped
        client.delete("user:1")
        client.execute_command("SELECT", 0)
        client.set("user:db0", "a")  # db filtered
        client.set("user:2", "b")  # still db 0 here: filtered
        client.execute_command("SELECT", 3)
        client.set("user:3", "b")
    out, err = tail.communicate(timeout=20)
    assert tail.returncode == 0, err
    lines = out.splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m[1], m[2], m[3]) for m in parsed if m] == [
        ("3", "set", '"user:1"'), ("3", "set", '"user:bin\\n\\xff\\"q"'), ("3", "del", '"user:1"'),
        ("3", "set", '"user:3"')]
    assert len({m[4] for m in parsed if m}) == 4  # message ids, all different
    assert "\x1b[" not in out  # a pipe: no colour
    summary = err.strip().splitlines()[-1]
    assert re.fullmatch(r"key-evt-amqp tail: 8 events received, 4 shown in [\d.]+ s \([\d.]+/s\)", summary), err


def test_json_and_the_gap_marker(events_proxy: ProxyProcess, redis_server: RedisServer, routing_key: str) -> None:
    tail = start_tail(routing_key, "--json", "--event", "set")
    with events_proxy.client() as client:
        client.set("before", "1")
        with redis_server.client() as direct:  # cut the proxy's subscription: a gap marker follows
            wait_for(lambda: direct.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1,
                     message="for the subscription to kill")
        wait_for(lambda: b"source_state:subscribed" in client.execute_command("key_evt_amqp.info")
                 and b"gaps:1" in client.execute_command("key_evt_amqp.info"), message="resubscribed")
        client.set("after", "2")
    entries: list[dict[str, object]] = []
    assert tail.stdout is not None
    while len(entries) < 3:
        entry = json.loads(tail.stdout.readline())
        if entry.get("reason") != "takeover":  # the fixture's proxy followed another on this Redis
            entries.append(entry)
    tail.send_signal(signal.SIGINT)
    _, err = tail.communicate(timeout=10)
    # (on a loaded machine one more message may arrive before the Ctrl-C: counted and shown alike)
    counts = re.search(r"(\d+) events received, (\d+) shown", err)
    assert tail.returncode == 0 and counts and counts[1] == counts[2] and int(counts[1]) >= 3, (err, entries)
    first, gap, last = entries
    assert (first["event"], first["key"], first["db"]) == ("set", "before", 0)
    assert gap["gap"] is True and gap["source"] == f"127.0.0.1:{redis_server.port}"
    assert int(gap["gap_start_ms"]) <= int(gap["gap_end_ms"])  # type: ignore[call-overload]
    assert (last["event"], last["key"]) == ("set", "after")


def read_pty(fd: int, until: bytes, timeout: float = 15.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while until not in data and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                data += os.read(fd, 4096)
            except OSError:
                break
    return data


def test_colour_on_a_terminal_only(events_proxy: ProxyProcess, routing_key: str) -> None:
    main, child = pty.openpty()
    try:
        on_tty = start_tail(routing_key, "--count", "1", stdout=child)
        piped = start_tail(routing_key, "--count", "1")
        with events_proxy.client() as client:
            client.set("colour", "1")
        shown = read_pty(main, b"colour")
        on_tty.communicate(timeout=10)
        assert on_tty.returncode == 0
        out, _ = piped.communicate(timeout=10)
    finally:
        os.close(main)
        os.close(child)
    assert b"\x1b[36mset\x1b[0m" in shown and b'"colour"' in shown, shown
    assert " set " in out and "\x1b[" not in out and '"colour"' in out


def test_unreachable_broker_exits_1(routing_key: str) -> None:
    done = subprocess.run([*TAIL, "--amqp", f"amqp://guest:guest@127.0.0.1:{free_port()}/"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "cannot connect to amqp://guest:***@127.0.0.1:" in done.stderr, done.stderr


def test_unknown_tail_flag_is_a_usage_error() -> None:
    done = subprocess.run([*TAIL, "--nope"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--nope" in done.stderr


