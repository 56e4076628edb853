"""``--upstream`` URLs (proxy/redis_url.py), the password file, the TLS options, and the CLI's
``--version`` and ``serve`` usage."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import cli
from proxy.config import Config, RedisAddress, RedisTLS, Sentinels
from proxy.redis_url import parse_redis_url, redact_redis_url
from proxy.settings import ConfigError, load


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://h", RedisAddress("h", 6379)),
    ("redis://h:7000/3", RedisAddress("h", 7000, db=3)),
    ("redis://us%40er:p%3A%40ss@h:1/2", RedisAddress("h", 1, "us@er", "p:@ss", 2)),
    ("redis://:pw@h", RedisAddress("h", 6379, None, "pw")),
    ("redis://[::1]:6390/0", RedisAddress("::1", 6390)),
    ("redis://h/?db=4&username=u&password=x%2Fy", RedisAddress("h", 6379, "u", "x/y", 4)),
    ("redis://a:b@h/1?password=c&db=2", RedisAddress("h", 6379, "a", "c", 2)),  # parameters win
    ("rediss://h:6380", RedisAddress("h", 6380, tls=RedisTLS())),
    ("REDISS://h", RedisAddress("h", 6379, tls=RedisTLS())),
    ("unix:///run/redis.sock", RedisAddress(unix_path="/run/redis.sock")),
    ("unix://u:p@/run/r%20s.sock?db=5", RedisAddress(unix_path="/run/r s.sock", username="u", password="p", db=5)),
    ("redis+unix:///tmp/r.sock?password=z", RedisAddress(unix_path="/tmp/r.sock", password="z")),
    ("redis+sentinel://s1:26380,s2/mymaster",
     RedisAddress("s1", 26380, sentinel=Sentinels((("s1", 26380), ("s2", 26379)), "mymaster"))),
    ("redis+sentinel://u:p@[::1]:5,s2:6/m%20x/3?sentinel_password=sp&sentinel_username=su",
     RedisAddress("::1", 5, "u", "p", 3, sentinel=Sentinels((("::1", 5), ("s2", 6)), "m x", "su", "sp"))),
    ("rediss+sentinel://s1/m", RedisAddress("s1", 26379, tls=RedisTLS(), sentinel=Sentinels((("s1", 26379),), "m"))),
])
def test_parse(url: str, expected: RedisAddress) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(("url", "reason"), [
    ("h:6379", "expected a URL"),
    ("http://h", "unknown scheme 'http://'"),
    ("redis://h:0", "port from 1 to 65535"),
    ("redis://h:70000", "port from 1 to 65535"),
    ("redis://h:x", "port from 1 to 65535"),
    ("redis://h/-1", "db a number >= 0"),
    ("redis://h/1/2", "nothing more"),
    ("redis://h/?db=x", "db a number >= 0"),
    ("redis://h/?ssl=1", "unknown URL parameter 'ssl'"),
    ("redis://h/?db=1&db=2", "given twice"),
    ("redis:///0", "the host is missing"),
    ("unix://host/path", "three slashes"),
    ("unix://", "the path is missing"),
    ("redis+sentinel://s1,s2", "the master's name is missing"),
    ("redis+sentinel://s1:0/m", "port from 1 to 65535"),
    ("redis+sentinel://s1,/m", "host:port,host:port"),
    ("redis+sentinel://s1/m/0/x", "the master's name is missing"),
    ("redis://h#frag", "fragment"),
])
def test_refused(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_redis_url(url)


def test_masked_url_round_trip() -> None:
    for url in ("redis://u:pw@h:1/2", "rediss://h:6380/0", "unix://u:pw@/tmp/r.sock?db=3",
                "redis+sentinel://u:pw@a:1,[::1]:2/mm/4?sentinel_username=su&sentinel_password=sp"):
        address = parse_redis_url(url)
        masked = address.masked_url()
        assert "pw" not in masked and "sp" not in masked
        unmasked = parse_redis_url(masked.replace("***", "pw"))
        assert unmasked.host == address.host and unmasked.db == address.db
        assert unmasked.sentinel == (None if address.sentinel is None else
                                     Sentinels(address.sentinel.nodes, "mm", "su", "pw"))


def test_redaction_hides_every_password() -> None:
    shown = redact_redis_url("redis+sentinel://u:secret1@a,b/m?password=secret2&x=1&sentinel_password=secret3")
    assert "secret" not in shown
    assert shown.startswith("redis+sentinel://u:***@a,b/m?password=***&x=1")
    with pytest.raises(ConfigError) as info:
        load(["--upstream", "redis://u:secret1@h/?password=secret2&bogus=1"], {})
    assert "secret" not in str(info.value) and "bogus" in str(info.value)


def test_password_file_and_its_environment_variable(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t\n")
    config = load(["--upstream", "redis://u@h/1", "--upstream-password-file", str(secret)], {})
    assert config.upstream == RedisAddress("h", 6379, "u", "s3cr3t", 1)
    config = load([], {"KEY_EVT_AMQP_UPSTREAM": "redis://h", "KEY_EVT_AMQP_UPSTREAM_PASSWORD_FILE": str(secret)})
    assert config.upstream.password == "s3cr3t"
    assert "s3cr3t" not in str(config.masked()) and "***" in str(config.masked()["upstream"])
    with pytest.raises(ConfigError, match="given twice"):
        load(["--upstream", "redis://:pw@h", "--upstream-password-file", str(secret)], {})
    with pytest.raises(ConfigError, match="cannot read it: No such file"):
        load(["--upstream-password-file", str(tmp_path / "missing")], {})


def test_tls_options(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    ca_file, pem = tmp_path / "ca.pem", tmp_path / "client.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("client")
    client.private_key_and_cert_chain_pem.write_to_path(str(pem))
    config = load(["--upstream", "rediss://h:6380", "--upstream-tls-ca", str(ca_file),
                   "--upstream-tls-cert", str(pem), "--upstream-tls-key", str(pem),
                   "--upstream-tls-server-name", "redis.internal"], {})
    assert config.upstream.tls == RedisTLS(str(ca_file), str(pem), str(pem), "redis.internal", True)
    insecure = load(["--upstream", "rediss://h", "--upstream-tls-insecure"], {})
    assert insecure.upstream.tls == RedisTLS(verify=False)
    toml = tmp_path / "c.toml"
    toml.write_text('upstream = "rediss://h"\nupstream_tls_insecure = true\n')
    assert load(["--config", str(toml)], {}).upstream.tls == RedisTLS(verify=False)
    assert load([], {"KEY_EVT_AMQP_UPSTREAM": "rediss://h",
                     "KEY_EVT_AMQP_UPSTREAM_TLS_INSECURE": "false"}).upstream.tls == RedisTLS()
    with pytest.raises(ConfigError, match="need a TLS upstream"):
        load(["--upstream", "redis://h", "--upstream-tls-ca", str(ca_file)], {})
    with pytest.raises(ConfigError, match="go together"):
        load(["--upstream", "rediss://h", "--upstream-tls-cert", str(pem)], {})
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    with pytest.raises(ConfigError, match="upstream TLS: "):
        load(["--upstream", "rediss://h", "--upstream-tls-ca", str(not_pem)], {})


def test_defaults_unchanged() -> None:
    assert load([], {}).upstream == Config().upstream == RedisAddress()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("key-evt-amqp ")


def test_misspelled_serve_flag_shows_serves_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--upstrem", "redis://h"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: key-evt-amqp serve ")
    assert "unrecognized arguments: --upstrem" in err


def test_listen_unix_and_client_tls_settings(tmp_path: Path) -> None:
    import trustme

    config = load(["--listen", "unix:/run/kea.sock", "--listen-perm", "600"], {})
    assert (config.listen_unix, config.listen_perm) == ("/run/kea.sock", 0o600)
    assert config.listen_port == Config().listen_port
    for bad, reason in ((["--listen", "unix:kea.sock"], "unix:/absolute/path.sock"),
                        (["--listen", "unix:/" + "x" * 120], "at most 107 bytes"),
                        (["--listen-perm", "999"], "octal file mode")):
        with pytest.raises(ConfigError, match=reason):
            load(bad, {})
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    pem = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    config = load(["--tls-cert", str(pem), "--tls-key", str(pem)], {})
    assert (config.tls_cert, config.tls_key, config.tls_ca) == (str(pem), str(pem), None)
    with pytest.raises(ConfigError, match="go together"):
        load(["--tls-cert", str(pem)], {})
    with pytest.raises(ConfigError, match="needs --tls-cert"):
        load(["--tls-ca", str(pem)], {})
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="client TLS: "):
        load(["--tls-cert", str(garbage), "--tls-key", str(garbage)], {})
