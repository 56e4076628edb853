"""Connecting to Redis (issue 12): standard URLs, secrets out of argv, the CLI's own flags.

TLS, unix sockets and Sentinel have their own modules (test_connecting_tls.py,
test_connecting_unix.py, test_connecting_sentinel.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import REPO_ROOT, ProxyProcess, RedisServer, unreachable_amqp_url, wait_for

PASSWORD = "upstream-s3cret"


def info(client: object) -> dict[str, str]:
    text = client.execute_command("key_evt_amqp.info").decode()  # type: ignore[attr-defined]
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def test_password_from_a_file_given_in_the_environment(tmp_path: Path) -> None:
    """The pipeline logs in with the password read from KEY_EVT_AMQP_UPSTREAM_PASSWORD_FILE (the
    URL carries only the user and the db, as query parameters); neither the start line, nor
    ``config_get``, nor the process's argv shows it."""
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    with RedisServer(["--requirepass", PASSWORD]) as rs:
        url = f"redis://{rs.host}:{rs.port}/?username=default&db=2"
        env = {"KEY_EVT_AMQP_UPSTREAM_PASSWORD_FILE": str(secret)}
        with ProxyProcess(url, ["--amqp", unreachable_amqp_url(), "--keymask", "ALL"], env=env) as proxy:
            with proxy.client(username="default", password=PASSWORD) as client:
                wait_for(lambda: info(client)["source_state"] == "subscribed", 15)
                # the proxy logged in: notify-keyspace-events was set on the server
                assert "E" in rs.client().config_get("notify-keyspace-events")["notify-keyspace-events"]
                shown = client.execute_command("key_evt_amqp.config_get")
                assert PASSWORD not in str(shown)
                assert shown[b"upstream"] == f"redis://default:***@{rs.host}:{rs.port}/2".encode()
            cmdline = Path(f"/proc/{proxy.pid}/cmdline").read_bytes()
            assert PASSWORD.encode() not in cmdline
            log = proxy.log_text()
        assert f"relaying to redis://default:***@{rs.host}:{rs.port}/2" in log
        assert PASSWORD not in log


def test_a_wrong_password_file_stops_the_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream", "redis://h", "--upstream-password-file",
         str(tmp_path / "missing")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith("key-evt-amqp: invalid --upstream-password-file '/")
    assert line.endswith("': cannot read it: No such file or directory")


def test_version_and_serve_usage() -> None:
    version = subprocess.run([sys.executable, "-m", "proxy", "--version"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("key-evt-amqp 0."), version
    typo = subprocess.run([sys.executable, "-m", "proxy", "serve", "--upstrem", "redis://h"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30)
    assert typo.returncode == 2
    assert typo.stderr.startswith("usage: key-evt-amqp serve "), typo.stderr
    assert "--upstream-tls-ca" in typo.stderr  # serve's flags, not the top level's COMMAND
