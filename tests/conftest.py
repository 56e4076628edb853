"""Shared fixtures: a private Redis per test module and the proxy in front of it.

- ``redis_server``: a :class:`harness.RedisServer` on a free port, one per test module.
- ``fresh_redis``: a client straight to that Redis after ``FLUSHALL`` (per test).
- ``proxy``: a :class:`harness.ProxyProcess` in front of ``redis_server``, one per test module, started
  with ``proxy_extra_args``. By default these point AMQP at a port where nothing listens (password
  ``harness.TEST_AMQP_PASSWORD``): the admin commands must answer without a broker, and no test may
  publish to the shared RabbitMQ. A module that needs a broker overrides ``proxy_extra_args``.
- ``proxy_client``: a redis-py client to the proxy (per test, closed afterwards).

A test that kills or restarts processes should build its own with the harness classes rather than
disturb these shared ones.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import SUMMARY  # noqa: E402
from harness import ProxyProcess, RedisServer, unreachable_amqp_url  # noqa: E402


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY:
        terminalreporter.section("cluster failover measurements")
        for line in SUMMARY:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def fresh_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="module")
def proxy_extra_args() -> tuple[str, ...]:
    return ("--amqp", unreachable_amqp_url())


@pytest.fixture(scope="module")
def proxy(redis_server: RedisServer, proxy_extra_args: tuple[str, ...]) -> Iterator[ProxyProcess]:
    with ProxyProcess(redis_server.url, proxy_extra_args) as process:
        yield process
        if not process.is_running():
            pytest.fail(f"the proxy died during the module:\n{process.log_text()[-4000:]}")


@pytest.fixture
def proxy_client(proxy: ProxyProcess) -> Iterator[redis.Redis]:
    client = proxy.client()
    yield client
    client.close()
