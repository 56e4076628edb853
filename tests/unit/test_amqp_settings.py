"""RabbitMQ settings: AMQP URLs (amqps, vhosts, host lists, query parameters), the password
file, TLS settings, the connect mode, and how the module's positions treat a cluster."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from proxy.config import Config
from proxy.settings import ConfigError, apply_module_args, load


def error_of(argv: list[str], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(argv, environ or {})
    message = str(info.value)
    assert "\n" not in message and "hunter2" not in message
    return message


@pytest.mark.parametrize(
    ("url", "nodes", "tls", "vhost"),
    [
        ("amqps://h", (("h", 5671),), True, "/"),
        ("AMQPS://h:5000/", (("h", 5000),), True, "/"),
        ("amqp://h/%2F", (("h", 5672),), False, "/"),
        ("amqp://h/%2fprod", (("h", 5672),), False, "/prod"),
        ("amqp://h/a%20b%25c", (("h", 5672),), False, "a b%c"),
        ("amqp://h/..", (("h", 5672),), False, ".."),  # not resolved as a path
        ("amqp://h1:5672,h2:5673,[::1]/vh", (("h1", 5672), ("h2", 5673), ("::1", 5672)), False, "vh"),
        ("amqps://u:p@h1,h2/vh?heartbeat=3", (("h1", 5671), ("h2", 5671)), True, "vh"),
    ],
)
def test_url_forms(url: str, nodes: tuple[tuple[str, int], ...], tls: bool, vhost: str) -> None:
    c = load(["--amqp", url], {})
    assert (c.amqp_nodes, c.amqp_tls, c.amqp_vhost) == (nodes, tls, vhost)


def test_repeated_flag_is_a_cluster() -> None:
    c = load(["--amqp", "amqp://u:p@h1/vh", "--amqp", "amqp://u:p@h2:5673,h3/vh"], {})
    assert c.amqp_nodes == (("h1", 5672), ("h2", 5673), ("h3", 5672))
    assert (c.amqp_user, c.amqp_password, c.amqp_vhost) == ("u", "p", "vh")


def test_cluster_urls_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('amqp = ["amqp://u:p@h1/v", "amqp://u:p@h2/v"]\n')
    assert load(["--config", str(path)], {}).amqp_nodes == (("h1", 5672), ("h2", 5672))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--amqp", "amqp://u:hunter2@h1", "--amqp", "amqp://u:hunter2@h2/other"], "differ in more than their hosts"),
        (["--amqp", "amqp://u:hunter2@h1", "--amqp", "amqps://u:hunter2@h2"], "differ in more than their hosts"),
        (["--amqp", "amqp://u:hunter2@h1,h1:5672"], "node h1:5672 is given twice"),
        (["--amqp", "amqp://u:hunter2@h1,,h2"], "expected amqp[s]://"),
        (["--amqp", "amqp://u:hunter2@h1,h2:0"], "expected a port"),
        (["--amqp", "amqp://u:hunter2@h1,h2:x"], "expected a port"),
        (["--amqp", "amqp://u:hunter2@h1:70000"], "expected a port"),
        (["--amqp", "amqp://u:hunter2@h/a/b"], "%2F"),
        (["--amqp", "amqp://u:hunter2@h/v#x"], "no #fragment"),
        (["--amqp", "amqp://u:hunter2@h/?cafile=x"], "unknown URL parameter 'cafile' (known: heartbeat,"),
        (["--amqp", "amqp://u:hunter2@h/?heartbeat=1&heartbeat=2"], "heartbeat is given twice"),
        (["--amqp", "amqp://u:hunter2@h/?heartbeat=70000"], "URL parameter heartbeat='70000': expected whole"),
        (["--amqp", "amqp://u:hunter2@h/?connection_timeout=0"], "expected milliseconds"),
        (["--amqp", "amqp://u:hunter2@h/?frame_max=100"], "from 4096 bytes"),
        (["--amqp", "amqp://u:hunter2@h/?channel_max=-1"], "from 0 to 65535"),
        (["--amqp", "amqp://u:hunter2@h/?certfile=c.pem"], "certfile needs amqps://"),
        (["--amqp", "amqps://u:hunter2@h/?verify=no"], "expected verify_peer or verify_none"),
        (["--amqp", "amqp://u:hunter2@h", "--amqp-tls-ca", "ca.pem"], "--amqp-tls-ca needs an amqps:// URL"),
        (["--amqp", "amqp://u:hunter2@h", "--amqp-tls-verify", "off"], "--amqp-tls-verify needs an amqps://"),
        (["--amqp", "amqps://u:hunter2@h", "--amqp-tls-verify", "no"], "expected on or off"),
        (["--amqp", "amqps://u:hunter2@h", "--amqp-tls-ca", "/nonexistent/ca.pem"],
         "invalid --amqp-tls-ca '/nonexistent/ca.pem': No such file or directory"),
        (["--amqp", "amqps://u:hunter2@h", "--amqp-tls-key", "/nonexistent/k.pem"], "--amqp-tls-key needs --amqp-tls-cert"),
        (["--amqp-connect", "eager"], "expected start or lazy"),
    ],
)
def test_bad_urls_and_tls_settings(argv: list[str], expected: str) -> None:
    assert expected in error_of(argv)


def test_query_parameters() -> None:
    c = load(["--amqp", "amqp://h/?heartbeat=7&connection_timeout=2500&channel_max=3&frame_max=8192"], {})
    assert (c.heartbeat, c.amqp_connect_timeout, c.amqp_frame_max) == (7, 2.5, 8192)
    c = load(["--amqp", "amqps://h/?server_name_indication=rabbit.local&verify=verify_none"], {})
    assert (c.amqp_tls_server_name, c.amqp_tls_verify) == ("rabbit.local", False)


def test_heartbeat_flag_and_url_parameter_by_source() -> None:
    # The same source: the single setting beats the URL's parameter.
    assert load(["--amqp", "amqp://h/?heartbeat=7", "--heartbeat", "9"], {}).heartbeat == 9
    assert load(["--heartbeat", "9", "--amqp", "amqp://h/?heartbeat=7"], {}).heartbeat == 9
    # A higher source wins, whichever of the two it gives.
    environ = {"KEY_EVT_AMQP_HEARTBEAT": "9"}
    assert load(["--amqp", "amqp://h/?heartbeat=7"], environ).heartbeat == 7
    environ = {"KEY_EVT_AMQP_AMQP": "amqp://h/?heartbeat=7"}
    assert load(["--heartbeat", "9"], environ).heartbeat == 9


@pytest.mark.parametrize(
    ("config", "url"),
    [
        (Config(), "amqp://guest:***@127.0.0.1:5672/%2F"),
        (Config(amqp_vhost="vh"), "amqp://guest:***@127.0.0.1:5672/vh"),  # was shown as ...:5672vh
        (Config(amqp_vhost="a/b c", amqp_user="u@x"), "amqp://u%40x:***@127.0.0.1:5672/a%2Fb%20c"),
        (Config(amqp_tls=True, amqp_host="::1", amqp_port=5671, amqp_other_nodes=(("h2", 5671),),
                amqp_frame_max=8192, amqp_connect_timeout=2.5),
         "amqps://guest:***@[::1]:5671,h2:5671/%2F?connection_timeout=2500&frame_max=8192"),
    ],
)
def test_masked_url(config: Config, url: str) -> None:
    assert config.amqp_masked_url() == url
    assert "guest:guest" not in url
    again = load(["--amqp", url.replace("***", "pw")], {})
    assert dataclasses.replace(again, amqp_password=config.amqp_password) == config


def test_password_file_from_flag_environment_and_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_bytes(b"s3cr\xc3\xa9t\n")
    c = load(["--amqp", "amqp://u:url-pw@h/", "--amqp-password-file", str(secret)], {})
    assert (c.amqp_user, c.amqp_password) == ("u", "s3cr\u00e9t")
    assert c.masked()["amqp_password"] == "***"
    environ = {"KEY_EVT_AMQP_AMQP_PASSWORD_FILE": str(secret), "KEY_EVT_AMQP_AMQP": "amqp://u@h/"}
    assert load([], environ).amqp_password == "s3cr\u00e9t"
    # a password file from a lower source still beats the URL's password of a higher one
    toml = tmp_path / "c.toml"
    toml.write_text(f'amqp_password_file = "{secret}"\n')
    assert load(["--config", str(toml), "--amqp", "amqp://u:url-pw@h/"], {}).amqp_password == "s3cr\u00e9t"
    secret.write_bytes(b"two\r\n\r\n")
    assert load(["--amqp-password-file", str(secret)], {}).amqp_password == "two\r\n"  # one newline only


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "the file is empty"), (b"\n", "the file is empty"), (b"\xff", "not UTF-8"),
    (b"x" * 70000, "longer than 65536 bytes"), (None, "cannot read it: No such file or directory"),
])
def test_password_file_errors(tmp_path: Path, content: bytes | None, expected: str) -> None:
    secret = tmp_path / "pw"
    if content is not None:
        secret.write_bytes(content)
    message = error_of(["--amqp-password-file", str(secret)])
    assert message.startswith(f"invalid --amqp-password-file '{secret}': ") and expected in message
    message = error_of([], {"KEY_EVT_AMQP_AMQP_PASSWORD_FILE": str(secret)})
    assert message.startswith("invalid KEY_EVT_AMQP_AMQP_PASSWORD_FILE")


def test_connect_mode() -> None:
    assert load([], {}).amqp_connect == "start"
    assert load(["--amqp-connect", "lazy"], {}).amqp_connect == "lazy"


def test_module_positions_on_a_cluster() -> None:
    cluster = load(["--amqp", "amqp://u:p@h1,h2/vh"], {})
    # The first node given again (a script repeating the whole list) keeps the cluster; another
    # host or port names one broker, as for the module.
    same = apply_module_args(cluster, [b"h1", b"5672", b"u2"], with_flags=False)
    assert (same.amqp_nodes, same.amqp_user) == (cluster.amqp_nodes, "u2")
    after = apply_module_args(cluster, [b"h9", b"5673", b"u", b"p"], with_flags=False)
    assert after.amqp_nodes == (("h9", 5673),)
    assert apply_module_args(cluster, [b"h2"], with_flags=False).amqp_nodes == (("h2", 5672),)


def test_tls_verify_off_is_accepted_only_when_asked() -> None:
    c = load(["--amqp", "amqps://h", "--amqp-tls-verify", "off"], {})
    assert (c.amqp_tls, c.amqp_tls_verify) == (True, False)
    assert load(["--amqp", "amqps://h/?verify=verify_none"], {}).amqp_tls_verify is False
    assert load(["--amqp", "amqps://h"], {}).amqp_tls_verify is True
