"""The README's examples, run as written (so they stay true): every ``sh`` block is marked
``<!-- example: NAME -->`` (run here) or ``<!-- example: not run here (why) -->``.

The commands run with three substitutions only, each to keep the tests off the shared servers: the
proxy's port 6380 becomes a free port, Redis (``127.0.0.1:6379``) a private redis-server, and
``make run`` the proxy started with the Makefile's own ``ARGS`` default (``make run`` would start it
in front of the Redis on 6379). The broker is the shared RabbitMQ, as in the README.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from harness import REPO_ROOT, ProxyProcess, RedisServer, free_port, wait_for
from rabbit import RabbitQueue

README = (REPO_ROOT / "README.md").read_text()
BLOCK = re.compile(r"(<!-- example: ([^>]*?) -->\n)?```sh\n(.*?)```", re.DOTALL)
KEA = str(REPO_ROOT / ".venv" / "bin" / "key-evt-amqp")
READY = "; Ctrl-C to stop"


def examples() -> dict[str, list[str]]:
    """Marked blocks by name: their commands (continuation lines joined, comments kept apart)."""
    found = {}
    for _, name, body in BLOCK.findall(README):
        found[name] = [line for line in body.replace("\\\n", " ").splitlines() if line.strip()]
    return found


def command(line: str, port: int, redis_url: str) -> list[str]:
    text = line.split("  #", 1)[0].strip()
    text = text.replace("6380", str(port)).replace("redis://127.0.0.1:6379/0", redis_url)
    argv = shlex.split(text)
    if argv[0] in ("key-evt-amqp", ".venv/bin/key-evt-amqp"):
        argv[0] = KEA
    return argv


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KEY_EVT_AMQP_") and k != "NO_COLOR"}


def start_tail(argv: list[str]) -> subprocess.Popen[str]:
    tail = subprocess.Popen(argv, cwd=REPO_ROOT, env=clean_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert tail.stderr is not None
    line = tail.stderr.readline()
    assert READY in line, line + tail.stderr.read()
    return tail


def run(argv: list[str]) -> str:
    return subprocess.run(argv, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=30,
                          check=True).stdout


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_every_sh_block_is_marked() -> None:
    blocks = BLOCK.findall(README)
    assert len(blocks) == README.count("```sh")
    unmarked = [body.splitlines()[0] for marker, _, body in blocks if not marker]
    assert not unmarked, f"README sh blocks without an example marker: {unmarked}"
    run_here = {name for _, name, _ in blocks if not name.startswith("not run here")}
    assert run_here == {"quickstart", "serve", "module-args", "watching", "monitoring", "routing"}


def test_quick_start_as_written(private_redis: RedisServer) -> None:
    make_run, tail_line, set_line, info_line = examples()["quickstart"]
    assert make_run.startswith("make run ")
    args = re.search(r"^ARGS \?= (.*)$", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE)
    assert args is not None
    with ProxyProcess(private_redis.url, shlex.split(args[1])) as proxy:  # what `make run` starts
        tail = start_tail(command(tail_line, proxy.port, private_redis.url))
        try:
            assert run(command(set_line, proxy.port, private_redis.url)).strip() == "OK"
            assert run(command(info_line, proxy.port, private_redis.url)).startswith("# key_evt_amqp")
            shown = re.search(r"tail prints `(.*)`", set_line)
            assert shown is not None
            expected = re.compile(re.escape(shown[1]).replace(re.escape("..."), ".*"))
            assert tail.stdout is not None
            line = tail.stdout.readline()
            assert expected.search(line), (line, shown[1])
        finally:
            tail.send_signal(signal.SIGINT)
            tail.communicate(timeout=10)


def test_serve_and_module_args_examples(private_redis: RedisServer) -> None:
    serve, same, helps = examples()["serve"]
    port = free_port()
    argv = command(serve, port, private_redis.url)
    assert "redis://127.0.0.1:6379/0" not in argv  # never the shared Redis
    proxy = subprocess.Popen(argv, cwd=REPO_ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: run(["redis-cli", "-p", str(port), "ping"]).strip() == "PONG", 15, message="serve")
        config = run(["redis-cli", "-p", str(port), "key_evt_amqp.config_get"])
        assert "redis_keyspace_events" in config and "xe" in config
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.communicate(timeout=15)
    assert proxy.returncode == 0
    assert same.startswith("python -m proxy serve ...") and helps.startswith("key-evt-amqp serve --help")
    assert "--metrics-listen" in run(command(helps, port, private_redis.url))
    assert run([sys.executable, "-m", "proxy", "serve", "--help"]) == run(command(helps, port, private_redis.url))

    comment, module_line = examples()["module-args"]
    assert comment.startswith("# redis.conf had: loadmodule")
    port = free_port()
    argv = command(module_line, port, private_redis.url) + ["--listen", f"127.0.0.1:{port}",
                                                             "--upstream", private_redis.url]
    proxy = subprocess.Popen(argv, cwd=REPO_ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: run(["redis-cli", "-p", str(port), "ping"]).strip() == "PONG", 15, message="serve")
        config = run(["redis-cli", "-p", str(port), "key_evt_amqp.config_get"])
        assert "exchange_name" in config and "routing_key" in config and "\nALL\n" in config
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.communicate(timeout=15)


def test_watching_and_monitoring_examples(private_redis: RedisServer) -> None:
    filtered, as_json, after_config_set = examples()["watching"]
    metrics = free_port()
    with ProxyProcess(private_redis.url, ("--events", "A", "--keymask", "ALL", "--metrics-listen",
                                          str(metrics))) as proxy:
        first = start_tail(command(filtered, proxy.port, private_redis.url))
        assert "| jq" in as_json
        piped = subprocess.Popen(["sh", "-c", as_json.split("  #")[0].replace("key-evt-amqp", KEA, 1)],
                                 cwd=REPO_ROOT, env=clean_env(), text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        time.sleep(1.5)  # the piped tail binds its queue (its ready line is on the pipe's stderr)
        with proxy.client() as client:
            client.set("user:1", "a")
            client.set("order:1", "a")
            client.delete("user:1")
        try:
            assert first.stdout is not None
            lines = [first.stdout.readline(), first.stdout.readline()]
            assert 'set "user:1"' in lines[0] and 'del "user:1"' in lines[1], lines
        finally:
            first.send_signal(signal.SIGINT)
            # Ctrl-C for the tail in the pipe only: jq then reads the end and writes what it has.
            subprocess.run(["pkill", "-INT", "-P", str(piped.pid), "-f", "key-evt-amqp tail"], check=False)
        first.communicate(timeout=10)
        keys, _ = piped.communicate(timeout=10)
        assert keys.split() == ["user:1", "order:1", "user:1"], keys

        # config_set from the commands table changes the destination; tail follows it there.
        table = re.search(r"`(key_evt_amqp\.config_set [^`]*)` \(\*\*changes the destination\*\*", README)
        assert table is not None
        after = start_tail(command(after_config_set, proxy.port, private_redis.url))
        with proxy.client() as client:
            assert client.execute_command(*table[1].split()) == b"OK"
            client.set("moved", "1")
        out, err = after.communicate(timeout=20)
        assert after.returncode == 0 and 'set "moved"' in out, err

        for line in examples()["monitoring"]:
            argv = ["sh", "-c", line.split("  #")[0].replace("9100", str(metrics))]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
            if "/metrics" in line:
                assert re.fullmatch(r"key_evt_amqp_events_confirmed_total \d+\.0\n", out), out
            elif "/healthz" in line:
                assert out == "ok\n"
            else:
                assert '"ready": true' in out and '"redis": true' in out, out


def test_routing_example(private_redis: RedisServer) -> None:
    """The routing section's example as written, with queues bound to amq.topic by pattern (a
    catch-all for the rest of the example's keys: messages are mandatory)."""
    serve, add, listing, volatile, other = examples()["routing"]
    port = free_port()
    argv = command(serve, port, private_redis.url)
    assert "redis://127.0.0.1:6379/0" not in argv
    with RabbitQueue(exchange="amq.topic", binding="users.user.*") as users, \
            RabbitQueue(exchange="amq.topic", binding="redis.0.set") as plain:
        proxy = subprocess.Popen(argv, cwd=REPO_ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: run(["redis-cli", "-p", str(port), "ping"]).strip() == "PONG", 15, message="serve")
            assert run(command(add, port, private_redis.url)).strip() == "OK"
            assert run(command(listing, port, private_redis.url)).split() == [
                "^session:", "sessions.{event}", "^user:", "users.{prefix}.{event}"]
            run(command(volatile, port, private_redis.url))
            run(command(other, port, private_redis.url))
            got_users = users.drain(expected=3, timeout=20)
            got_plain = plain.drain(expected=1, timeout=20)
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.communicate(timeout=15)
    assert [m.routing_key for m in got_users] == ["users.user.set", "users.user.expire", "users.user.expired"]
    assert [json.loads(m.body)["key"] for m in got_users] == ["user:1"] * 3
    assert [(m.routing_key, json.loads(m.body)["event"]) for m in got_plain] == [("redis.0.set", "set")]
