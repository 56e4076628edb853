"""Worker processes, the parts without processes: the restart policy, exit statuses in words,
the ``--workers`` setting. tests/e2e/test_workers.py runs the real thing."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from proxy import workers
from proxy.settings import ConfigError, load
from proxy.workers import BURST, FIRST_DELAY_S, MAX_DELAY_S, STABLE_S, WINDOW_S, RestartPolicy


def delays(policy: RestartPolicy, exits: list[tuple[float, float]]) -> list[float]:
    return [policy.exited(now, ran_for) for now, ran_for in exits]


def test_the_first_exits_in_a_window_restart_at_once_then_the_delay_doubles_to_its_cap() -> None:
    policy = RestartPolicy()
    # A worker that dies 0.1 s after each start, restarted as soon as the policy allows.
    now, got = 0.0, []
    for _ in range(BURST + 8):
        now += 0.1
        got.append(policy.exited(now, 0.1))
        now += got[-1]
    assert got[:BURST] == [0.0] * BURST
    backoff = got[BURST:]
    assert backoff[0] == FIRST_DELAY_S
    assert all(b == min(a * 2, MAX_DELAY_S) for a, b in zip(backoff, backoff[1:])), backoff
    assert backoff[-1] == MAX_DELAY_S
    assert policy.unstable == BURST + 8  # what the restart log line says


def test_exits_spread_wider_than_the_window_never_back_off() -> None:
    policy = RestartPolicy()
    spaced = WINDOW_S / BURST + 0.1  # never more than BURST exits within WINDOW_S
    assert delays(policy, [(i * spaced, 1.0) for i in range(1, 30)]) == [0.0] * 29


def test_backoff_lasts_until_a_stable_run_not_until_the_window_empties() -> None:
    policy = RestartPolicy()
    delays(policy, [(0.1 * i, 0.1) for i in range(1, BURST + 2)])
    assert policy.delay == FIRST_DELAY_S
    # Long after the window: still crashing at start, so the delay keeps growing...
    assert policy.exited(1000.0, 0.1) == 2 * FIRST_DELAY_S
    # ... until the worker ran STABLE_S: that exit is restarted at once, and counting restarts.
    assert policy.exited(2000.0, STABLE_S) == 0.0
    assert policy.unstable == 0
    assert delays(policy, [(2000.0 + i, 0.1) for i in range(1, BURST)]) == [0.0] * (BURST - 1)


def test_exit_text() -> None:
    assert workers.exit_text(0) == "exited with status 0"
    assert workers.exit_text(3 << 8) == "exited with status 3"
    assert workers.exit_text(signal.SIGKILL) == "was killed by SIGKILL"
    assert workers.exit_text(signal.SIGSEGV | 0x80) == "was killed by SIGSEGV"  # core dumped


def test_workers_setting_from_each_source(tmp_path: Path) -> None:
    assert load([], {}).workers == 1
    assert load(["--workers", "3"], {}).workers == 3
    assert load([], {"KEY_EVT_AMQP_WORKERS": "4"}).workers == 4
    path = tmp_path / "k.toml"
    path.write_text("workers = 5\n")
    assert load(["--config", str(path)], {}).workers == 5
    assert load(["--workers", "auto"], {}).workers == len(os.sched_getaffinity(0))
    assert load(["--workers", "1024"], {}).workers == 1024


@pytest.mark.parametrize("text", ["0", "-1", "x", "", "1025", "2.0", "02", " 2", "AUTO", "auto "])
def test_workers_setting_refuses(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(["--workers", text], {})
    assert str(info.value) == (f"invalid --workers {text!r}: expected a number of processes "
                               "from 1 to 1024, or auto")
    with pytest.raises(ConfigError, match="^invalid KEY_EVT_AMQP_WORKERS "):
        load([], {"KEY_EVT_AMQP_WORKERS": text})


@pytest.mark.parametrize("reuse_port", [False, True])
def test_check_port_refuses_a_port_someone_listens_on(reuse_port: bool) -> None:
    """With or without SO_REUSEPORT (another proxy's workers): the port is taken."""
    with socket.create_server(("127.0.0.1", 0), reuse_port=reuse_port) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            workers.check_port("127.0.0.1", port)
    workers.check_port("127.0.0.1", port)  # free again: binds and lets go
    workers.check_port("127.0.0.1", port)
