"""The Dockerfile, compose.yaml and the systemd unit, checked against the real flags; the image is
built where a Docker daemon runs."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from harness import REPO_ROOT
from proxy.cli import _parser
from proxy.settings import load

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


def test_compose_services_and_the_proxys_environment_are_real_settings() -> None:
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "rabbitmq", "key-evt-amqp"}
    assert services["redis"]["image"].startswith("redis:")
    assert "management" in services["rabbitmq"]["image"]
    assert "127.0.0.1:15672:15672" in services["rabbitmq"]["ports"]
    proxy = services["key-evt-amqp"]
    assert proxy["build"] == "." and set(proxy["depends_on"]) == {"redis", "rabbitmq"}
    env = {k: str(v) for k, v in proxy["environment"].items()}
    config = load([], env)  # every variable is a real setting (an unknown one is an error)
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 6380)
    assert (config.upstream.host, config.upstream.port) == ("redis", 6379)
    assert (config.amqp_host, config.amqp_port) == ("rabbitmq", 5672)
    assert (config.events, config.keymasks) == ("A", (b"ALL",))  # forwards every event out of the box
    assert (config.metrics_host, config.metrics_port) == ("0.0.0.0", 9100)
    assert "127.0.0.1:6380:6380" in proxy["ports"] and "127.0.0.1:9100:9100" in proxy["ports"]
    assert "/readyz" in " ".join(proxy["healthcheck"]["test"])


def test_dockerfile_runs_serve_as_a_user_with_config_by_environment() -> None:
    assert re.search(r"^FROM python:3\.11-slim$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^USER kea$", DOCKERFILE, re.MULTILINE)
    assert 'ENTRYPOINT ["key-evt-amqp", "serve"]' in DOCKERFILE
    env = dict(re.findall(r"(KEY_EVT_AMQP_\w+)=(\S+)", DOCKERFILE))
    assert load([], env).listen_host == "0.0.0.0"


def test_systemd_unit_command_line_parses() -> None:
    unit = (REPO_ROOT / "packaging" / "key-evt-amqp.service").read_text()
    start = re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE)
    assert start is not None
    argv = shlex.split(start[1])
    assert argv[0].endswith("/bin/key-evt-amqp") and argv[1] == "serve"
    parser, _ = _parser()
    assert vars(parser.parse_args(argv[1:]))["config"] == "/etc/key-evt-amqp.toml"
    assert "KillSignal=SIGTERM" in unit and "DynamicUser=yes" in unit and "Restart=on-failure" in unit


def _docker_runs() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _docker_runs(), reason="no Docker daemon here (`docker info` fails): the image "
                    "cannot be built; the compose file and the Dockerfile are checked above")
def test_the_image_builds_and_answers_help() -> None:
    tag = "key-evt-amqp:test"
    subprocess.run(["docker", "build", "-t", tag, str(REPO_ROOT)], check=True, timeout=900)
    done = subprocess.run(["docker", "run", "--rm", tag, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--metrics-listen" in done.stdout
    user = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"], capture_output=True,
                          text=True, timeout=120)
    assert user.stdout.strip() != "0"
