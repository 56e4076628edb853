"""Settings: sources and their priority, validation, the module's positional list, the CLI."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest

from protocol.requests import split_args
from proxy import cli
from proxy.config import DEFAULT_FALLBACK_KEY, Config, RedisAddress
from proxy.settings import ConfigError, apply_module_args, load, split_module_args


def error_of(argv: list[str], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(argv, environ or {})
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "key-evt-amqp.toml"
    path.write_text(text)
    return str(path)


# -- sources and priority ------------------------------------------------------------------------


def test_defaults() -> None:
    config = load([], {})
    assert config == Config()
    assert config.amqp_port == 5672  # not the module's 5627 typo
    assert config.keymasks == ()
    assert config.fallback_key == DEFAULT_FALLBACK_KEY


def test_priority_defaults_file_environment_flags(tmp_path: Path) -> None:
    path = write(tmp_path, 'exchange = "from-file"\nrouting_key = "rk-file"\nheartbeat = 7\n')
    environ = {"KEY_EVT_AMQP_ROUTING_KEY": "rk-env", "KEY_EVT_AMQP_HEARTBEAT": "8"}
    config = load(["--config", path, "--heartbeat", "9"], environ)
    assert config.exchange == "from-file"
    assert config.routing_key == "rk-env"
    assert config.heartbeat == 9
    assert config.delivery_mode == 1  # default


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "delivery_mode = 2\n")
    assert load([], {"KEY_EVT_AMQP_CONFIG": path}).delivery_mode == 2
    other = tmp_path / "other.toml"
    other.write_text("delivery_mode = 1\nfallback_size = -1\n")
    config = load(["--config", str(other)], {"KEY_EVT_AMQP_CONFIG": path})
    assert (config.delivery_mode, config.fallback_size) == (1, -1)


def test_every_flag(tmp_path: Path) -> None:
    config = load(
        [
            "--listen", "0.0.0.0:7000",
            "--upstream", "redis://bob:p%40ss@redis.local:6390/3",
            "--amqp", "amqp://alice:s%3Acret@rabbit:5673/%2Fprod",
            "--heartbeat", "0",
            "--exchange", "events",
            "--routing-key", "keys",
            "--delivery-mode", "2",
            "--fallback-size", "-1",
            "--fallback-key", "backlog",
            "--events", "A",
            "--keymask", "^user:", "--keymask", "session$",
            "--publish-window", "10",
            "--publish-timeout", "1.5",
            "--connect-timeout", "2",
            "--max-clients", "50",
            "--client-buffer-limit", "65536",
            "--shutdown-timeout", "0.5",
            "--log-level", "debug",
        ],
        {},
    )  # fmt: skip
    assert config == Config(
        listen_host="0.0.0.0",
        listen_port=7000,
        upstream=RedisAddress("redis.local", 6390, "bob", "p@ss", 3),
        amqp_host="rabbit",
        amqp_port=5673,
        amqp_user="alice",
        amqp_password="s:cret",
        amqp_vhost="/prod",
        heartbeat=0,
        exchange="events",
        routing_key="keys",
        delivery_mode=2,
        fallback_size=-1,
        fallback_key=b"backlog",
        events="A",
        keymasks=(b"^user:", b"session$"),
        publish_window=10,
        publish_timeout=1.5,
        connect_timeout=2.0,
        max_clients=50,
        client_buffer_limit=65536,
        shutdown_timeout=0.5,
        log_level="DEBUG",
    )


def test_environment_names() -> None:
    environ = {
        "KEY_EVT_AMQP_LISTEN": "[::1]:6381",
        "KEY_EVT_AMQP_UPSTREAM": "redis://10.0.0.1:7000",
        "KEY_EVT_AMQP_KEYMASK": "^a,b$,c",
        "KEY_EVT_AMQP_DELIVERY_MODE": "2",
        "KEY_EVT_AMQP": "not ours: no underscore after the prefix",
    }
    config = load([], environ)
    assert (config.listen_host, config.listen_port) == ("::1", 6381)
    assert config.upstream == RedisAddress("10.0.0.1", 7000)
    assert config.keymasks == (b"^a", b"b$", b"c")
    assert config.delivery_mode == 2


def test_keymasks_from_each_source(tmp_path: Path) -> None:
    path = write(tmp_path, 'keymask = ["^x", "y"]\n')
    assert load(["--config", path], {}).keymasks == (b"^x", b"y")
    assert load(["--config", write(tmp_path, 'keymask = "z"\n')], {}).keymasks == (b"z",)
    # A source replaces the masks of lower ones; an empty variable means "no mask".
    assert load(["--config", path], {"KEY_EVT_AMQP_KEYMASK": ""}).keymasks == ()
    assert load(["--keymask", "a", "--keymask", "ALL", "--keymask", "b"], {}).keymasks == (b"ALL",)
    assert load(["--keymask", "a", "--keymask", "a"], {}).keymasks == (b"a",)
    assert load(["--keymask", ""], {}).keymasks == (b"",)  # the empty mask: every key


def test_keymask_keeps_undecodable_argv_bytes() -> None:
    raw = b"^\xff\xfe"
    mask = raw.decode("utf-8", "surrogateescape")  # how Python hands such argv to us
    assert load(["--keymask", mask], {}).keymasks == (raw,)


def test_toml_numbers_and_strings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'listen = "127.0.0.1:7001"\npublish_timeout = 2\nfallback_size = 0\n'
        'module_args = ["xe", "rabbit"]\n',
    )
    config = load(["--config", path], {})
    assert (config.listen_port, config.publish_timeout, config.fallback_size) == (7001, 2.0, 0)
    assert (config.events, config.amqp_host) == ("xe", "rabbit")


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--delivery-mode", "3"], "invalid --delivery-mode '3': expected 1 or 2"),
        (["--delivery-mode", "0"], "invalid --delivery-mode '0': expected 1 or 2"),
        (["--delivery-mode", "258"], "invalid --delivery-mode '258'"),
        (["--heartbeat", "-1"], "invalid --heartbeat '-1'"),
        (["--heartbeat", "1.5"], "invalid --heartbeat '1.5'"),
        (["--heartbeat", "65536"], "invalid --heartbeat '65536'"),
        (["--listen", "127.0.0.1:0"], "invalid --listen '127.0.0.1:0': expected a port"),
        (["--listen", "127.0.0.1:65536"], "invalid --listen '127.0.0.1:65536'"),
        (["--listen", "127.0.0.1"], "invalid --listen '127.0.0.1': expected HOST:PORT"),
        (["--listen", ":6380"], "invalid --listen ':6380': expected HOST:PORT"),
        (["--listen", "::1:6380"], "brackets"),
        (["--listen", "host:abc"], "invalid --listen 'host:abc'"),
        (["--upstream", "http://h:1"], "invalid --upstream 'http://h:1'"),
        (["--upstream", "redis://h:70000"], "expected a port"),
        (["--upstream", "redis://h:1/x"], "db a number"),
        (["--upstream", "redis://:6379"], "invalid --upstream"),
        (["--upstream", "redis://h:1?ssl=1"], "unknown URL parameter"),
        (["--amqp", "amqpx://h"], "expected amqp[s]://"),
        (["--amqp", "amqp://h/a/b"], "%2F"),
        (["--amqp", "amqp://h:abc/"], "expected a port"),
        (["--events", "xeK"], "invalid --events 'xeK': unknown event class 'K'"),
        (["--events", "q"], "'q'"),
        (["--publish-window", "0"], "invalid --publish-window '0'"),
        (["--publish-timeout", "0"], "invalid --publish-timeout '0'"),
        (["--publish-timeout", "nan"], "invalid --publish-timeout 'nan'"),
        (["--max-clients", "-5"], "invalid --max-clients '-5'"),
        (["--fallback-size", "ten"], "invalid --fallback-size 'ten'"),
        (["--fallback-key", ""], "invalid --fallback-key ''"),
        (["--log-level", "loud"], "invalid --log-level 'loud'"),
        (["--exchange", "x" * 256], "longer than 255 bytes"),
        (["--nope"], "unrecognized arguments: --nope"),
        (["--heartbeat"], "expected one argument"),
        # One integer rule everywhere, Redis's string2ll: no sign but '-', no blank, no '_', no
        # leading zero, within 64 bits (issue #8).
        (["--heartbeat", "030"], "invalid --heartbeat '030'"),
        (["--heartbeat", "+30"], "invalid --heartbeat '+30'"),
        (["--fallback-size", "1_000"], "invalid --fallback-size '1_000'"),
        (["--fallback-size", " 5"], "invalid --fallback-size ' 5'"),
        (["--fallback-size", "-0"], "invalid --fallback-size '-0'"),
        (["--fallback-size", "9223372036854775808"], "invalid --fallback-size"),
        (["--fallback-size", "\u0663"], "invalid --fallback-size"),
        (["--listen", "127.0.0.1:06380"], "invalid --listen '127.0.0.1:06380'"),
        (["--max-clients", "0100"], "invalid --max-clients '0100'"),
        (["--upstream", "redis://h:1/01"], "db a number"),
    ],
)
def test_flag_errors(argv: list[str], expected: str) -> None:
    assert expected in error_of(argv)


def test_environment_errors_name_the_variable() -> None:
    message = error_of([], {"KEY_EVT_AMQP_DELIVERY_MODE": "3"})
    assert message == "invalid KEY_EVT_AMQP_DELIVERY_MODE '3': expected 1 or 2"


def test_file_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "delivery_mode = 3\n")
    assert error_of(["--config", path]) == f"{path}: invalid delivery_mode '3': expected 1 or 2"
    assert "unknown setting 'delivery-mod'" in error_of(
        ["--config", write(tmp_path, "delivery-mod = 1\n")]
    )
    assert "expected a string or a number" in error_of(
        ["--config", write(tmp_path, "heartbeat = true\n")]
    )
    assert "invalid config file" in error_of(["--config", write(tmp_path, "heartbeat = \n")])
    assert "cannot read config file" in error_of(["--config", str(tmp_path / "missing.toml")])
    assert "expected strings" in error_of(["--config", write(tmp_path, "keymask = [1]\n")])


@pytest.mark.parametrize(
    "argv",
    [
        ["--amqp", "amqp://user:hunter2@h:0/"],
        ["--amqp", "amqps://user:hunter2@h/?heartbeat=x"],
        ["--amqp", "amqp://user:hunter2@h1,h2:0/"],
        ["--amqp", "amqp://user:hunter2@h1", "--amqp", "amqp://user:other@h2"],
        ["--amqp", "amqp://user:hunter2@h/", "--amqp-password-file", "/nonexistent/pw"],
        ["--amqp", "user:hunter2@h"],
        ["--upstream", "redis://user:hunter2@h:1/db"],
        ["--upstream", "redis://:hunter2@h:99999"],
        ["--module-args", "xe h 5672 user hunter2 -1"],
        ["--module-args", "xe h 5672 user \"hunter2\\xff\" 1"],
    ],
)
def test_passwords_never_in_errors(argv: list[str]) -> None:
    assert "hunter2" not in error_of(argv)


def test_long_bad_values_are_cut() -> None:
    assert len(error_of(["--delivery-mode", "9" * 10_000])) < 200


def test_newlines_in_bad_values_stay_escaped() -> None:
    assert "\\n" in error_of(["--log-level", "a\nb"])


# -- URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h", RedisAddress("h", 6379)),
        ("redis://h:1/", RedisAddress("h", 1)),
        ("redis://h:1/15", RedisAddress("h", 1, db=15)),
        ("redis://:pw@h:1", RedisAddress("h", 1, password="pw")),
        ("redis://u%3Ax:p%2Fw@h:1/2", RedisAddress("h", 1, "u:x", "p/w", 2)),
        ("redis://[::1]:6379/0", RedisAddress("::1", 6379)),
    ],
)
def test_upstream_urls(url: str, expected: RedisAddress) -> None:
    assert load(["--upstream", url], {}).upstream == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://h", ("h", 5672, "guest", "guest", "/")),
        ("amqp://h/", ("h", 5672, "guest", "guest", "/")),
        ("amqp://h/%2F", ("h", 5672, "guest", "guest", "/")),
        ("amqp://h/prod", ("h", 5672, "guest", "guest", "prod")),
        ("amqp://u:p@h:5673/a%2Fb", ("h", 5673, "u", "p", "a/b")),
        ("amqp://u@h", ("h", 5672, "u", "", "/")),
        ("amqp://u%40x:p%40ss@[::1]:1", ("::1", 1, "u@x", "p@ss", "/")),
    ],
)
def test_amqp_urls(url: str, expected: tuple[object, ...]) -> None:
    c = load(["--amqp", url], {})
    assert (c.amqp_host, c.amqp_port, c.amqp_user, c.amqp_password, c.amqp_vhost) == expected


def test_amqp_url_is_taken_whole() -> None:
    # A higher source's URL without credentials does not inherit a lower source's ones.
    environ = {"KEY_EVT_AMQP_AMQP": "amqp://u:p@old:1/v"}
    c = load(["--amqp", "amqp://new"], environ)
    assert (c.amqp_host, c.amqp_port, c.amqp_user, c.amqp_vhost) == ("new", 5672, "guest", "/")


# -- the module's positional list ----------------------------------------------------------------

README_LOAD = b"xe 127.0.0.1 5672 user pass 20 exchange_name routing_key 2 10000000 ALL".split()


def test_readme_load_example() -> None:
    config = apply_module_args(Config(), README_LOAD, with_flags=True)
    assert config == Config(
        events="xe",
        amqp_host="127.0.0.1",
        amqp_port=5672,
        amqp_user="user",
        amqp_password="pass",
        heartbeat=20,
        exchange="exchange_name",
        routing_key="routing_key",
        delivery_mode=2,
        fallback_size=10_000_000,
        keymasks=(b"ALL",),
    )


def test_readme_config_set_example() -> None:
    # key_evt_amqp.config_set takes the same list without the flags.
    config = apply_module_args(Config(events="g"), README_LOAD[1:], with_flags=False)
    loaded = apply_module_args(Config(), README_LOAD, with_flags=True)
    assert config == dataclasses.replace(loaded, events="g")


@pytest.mark.parametrize("count", range(0, 10))
def test_any_prefix_changes_only_the_positions_given(count: int) -> None:
    args = b"rabbit 5673 u p 5 ex rk 2 -1".split()[:count]
    before = Config(keymasks=(b"^keep",))
    after = apply_module_args(before, args, with_flags=False)
    fields = ("amqp_host", "amqp_port", "amqp_user", "amqp_password", "heartbeat", "exchange",
              "routing_key", "delivery_mode", "fallback_size")  # fmt: skip
    new = ("rabbit", 5673, "u", "p", 5, "ex", "rk", 2, -1)
    for i, (name, value) in enumerate(zip(fields, new)):
        assert getattr(after, name) == (value if i < count else getattr(before, name)), name
    assert after.keymasks == (b"^keep",)  # masks change only when one is given
    assert after.events == before.events


def test_flags_alone() -> None:
    assert apply_module_args(Config(), [b"A"], with_flags=True).events == "A"
    assert apply_module_args(Config(), [b""], with_flags=True).events == ""
    assert apply_module_args(Config(), [], with_flags=True) == Config()


def test_masks_replace_the_current_ones() -> None:
    base = Config(keymasks=(b"^old",))
    args = b"h 1 u p 1 ex rk 1 0".split()
    assert apply_module_args(base, [*args, b"^a", b"b$", b"^a"], with_flags=False).keymasks == (
        b"^a",
        b"b$",
    )
    assert apply_module_args(base, [*args, b"^a", b"ALL", b"c"], with_flags=False).keymasks == (
        b"ALL",
    )
    # Masks are bytes as given: NUL and newlines included.
    assert apply_module_args(base, [*args, b"a\x00\nb"], with_flags=False).keymasks == (
        b"a\x00\nb",
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([b"h", b"abc"], "invalid port 'abc': expected a port from 1 to 65535"),
        ([b"h", b"70000"], "invalid port '70000'"),
        ([b"h", b"0"], "invalid port '0'"),
        ([b""], "invalid host ''"),
        ([b"h", b"1", b"u", b"p", b"ten"], "invalid heartbeat 'ten'"),
        ([b"h", b"1", b"u", b"p", b"-1"], "invalid heartbeat '-1'"),
        ([b"h", b"1", b"u", b"p", b"1", b"e", b"r", b"0"], "invalid delivery_mode '0'"),
        ([b"h", b"1", b"u", b"p", b"1", b"e", b"r", b"3"], "invalid delivery_mode '3'"),
        ([b"h", b"1", b"u", b"p", b"1", b"e", b"r", b"258"], "invalid delivery_mode '258'"),
        ([b"h", b"1", b"u", b"p", b"1", b"e", b"r", b"abc"], "invalid delivery_mode 'abc'"),
        ([b"h", b"1", b"u", b"p", b"1", b"e", b"r", b"1", b"x"], "invalid fallback_storage_size"),
        ([b"h", b"1", b"\xff"], "invalid username: not UTF-8"),
        ([b"h", b"05672"], "invalid port '05672'"),
        ([b"h", b"+5672"], "invalid port '+5672'"),
        ([b"h", b"1", b"u", b"p", b"1", b"e", b"r", b"01"], "invalid delivery_mode '01'"),
        ([b"h", b"1", b"u", b"p", b"1", b"e", b"r", b"1", b" 5"], "invalid fallback_storage_size ' 5'"),
        ([b"h", b"1", b"u", b"p", b"1", b"e", b"r", b"1", b"1_000"], "invalid fallback_storage_size"),
        ([b"h", b"1", b"u", b"p", b"1", b"e", b"r", b"1", "\u0663".encode()], "invalid fallback_storage_size"),
    ],
)
def test_module_arg_errors(args: list[bytes], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_module_args(Config(), args, with_flags=False)
    assert str(info.value).startswith(expected)


def test_module_arg_error_applies_nothing() -> None:
    # The module applied positions 1-7 before rejecting delivery_mode 3; we apply none.
    before = Config(keymasks=(b"^k",))
    args = b"newhost 1234 u p 9 ex rk 3 5 ALL".split()
    with pytest.raises(ConfigError, match="delivery_mode '3'"):
        apply_module_args(before, args, with_flags=False)
    assert before == Config(keymasks=(b"^k",))  # frozen: nothing could change in place anyway
    with pytest.raises(ConfigError, match="event flags 'xq'"):
        apply_module_args(before, [b"xq", *args[:2]], with_flags=True)


def test_module_arg_password_never_shown() -> None:
    with pytest.raises(ConfigError) as info:
        apply_module_args(Config(), [b"h", b"1", b"u", b"s3cret\xff"], with_flags=False)
    assert str(info.value) == "invalid password: not UTF-8"


def test_module_args_flag_applies_last(tmp_path: Path) -> None:
    path = write(tmp_path, 'module_args = "xe filehost"\nexchange = "file-ex"\n')
    argv = ["--config", path, "--exchange", "flag-ex", "--module-args", " ".join(
        a.decode() for a in README_LOAD
    )]  # fmt: skip
    config = load(argv, {"KEY_EVT_AMQP_AMQP": "amqp://envhost:1/v"})
    assert config.exchange == "exchange_name"  # module args beat the flag
    assert config.amqp_host == "127.0.0.1"
    assert config.amqp_vhost == "v"  # a position the module list has not: from the environment
    assert config.keymasks == (b"ALL",)
    # Only the highest source's module args count: the file's "filehost" is not applied.
    assert load(["--config", path], {}).amqp_host == "filehost"


def test_module_args_errors_name_the_source() -> None:
    message = error_of(["--module-args", "xe h 5672 u p 20 ex rk 3"])
    assert message == "invalid --module-args: invalid delivery_mode '3': expected 1 or 2"
    message = error_of([], {"KEY_EVT_AMQP_MODULE_ARGS": "xe h 99999"})
    assert message.startswith("invalid KEY_EVT_AMQP_MODULE_ARGS: invalid port '99999'")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", []),
        ("  xe  127.0.0.1\t5672 ", [b"xe", b"127.0.0.1", b"5672"]),
        ('xe "" h', [b"xe", b"", b"h"]),
        ('"a b" c', [b"a b", b"c"]),
        ('"\\x00\\n\\"q\\\\"', [b'\x00\n"q\\']),
        ("'it\\'s' x", [b"it's", b"x"]),
        ("\\. ^pre.*$", [b"\\.", b"^pre.*$"]),  # backslash is literal outside quotes
        ('a"b c"', [b"ab c"]),
        ("ключ", ["ключ".encode()]),
    ],
)
def test_split_module_args(line: str, expected: list[bytes]) -> None:
    assert split_module_args(line) == expected


@pytest.mark.parametrize("line", ['"open', "'open", '"a"b', "'a'b"])
def test_split_module_args_errors(line: str) -> None:
    with pytest.raises(ConfigError):
        split_module_args(line)


def test_split_module_args_error_texts() -> None:
    with pytest.raises(ConfigError, match="^unbalanced quotes in module arguments$"):
        split_module_args('xe "open')
    with pytest.raises(ConfigError, match="^a closing quote must be followed by a space$"):
        split_module_args('xe "a"b')


def test_split_module_args_splits_like_redis() -> None:
    """The same sdssplitargs as inline requests: \\v and \\f separate arguments but do not end one
    (tests/resp/test_requests.py checks this splitter against redis-server's EVAL "return ARGV")."""
    assert split_module_args("a\vb") == [b"a\x0bb"]
    assert split_module_args("\va\fb c\v\fd") == [b"a\x0cb", b"c\x0b\x0cd"]
    line = 'xe "q"\v\'r\'\f s\vt'
    assert split_module_args(line) == split_args(line.encode()) == [b"xe", b"q", b"r", b"s\x0bt"]


# -- the command line ----------------------------------------------------------------------------


def test_cli_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--delivery-mode", "3"]) == 2
    err = capsys.readouterr().err
    assert err == "key-evt-amqp: invalid --delivery-mode '3': expected 1 or 2\n"


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["nosuch"]) == 2
    assert cli.main(["serve", "--nope"]) == 2
    capsys.readouterr()


def test_cli_help_lists_every_flag_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for flag, default in [
        ("--config", "none"), ("--listen", "127.0.0.1:6380"),
        ("--upstream", "redis://127.0.0.1:6379/0"),
        ("--amqp", "amqp://guest:***@127.0.0.1:5672/%2F"),
        ("--heartbeat", "30"), ("--exchange", "amq.direct"),
        ("--routing-key", "redis_keyspace_events"), ("--delivery-mode", "1"),
        ("--fallback-size", "10000000"),
        ("--fallback-key", "REDIS_MODULE-key_evt_amqp-fallback_storage"), ("--events", "xe"),
        ("--keymask", "none: nothing forwarded"), ("--module-args", "none"),
        ("--publish-window", "20000"),
        ("--publish-timeout", "5.0"), ("--connect-timeout", "5.0"), ("--max-clients", "10000"),
        ("--client-buffer-limit", "1048576"), ("--shutdown-timeout", "5.0"),
        ("--log-level", "INFO"),
    ]:  # fmt: skip
        assert flag in out
        entry = out.split(flag + " ", 2)[2]  # after the usage line: the flag's own help
        assert entry.split("(default: ", 1)[1].startswith(default + ")"), flag


def test_cli_runs_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Config] = []
    server = types.ModuleType("proxy.server")
    server.run = lambda config: seen.append(config) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "proxy.server", server)
    monkeypatch.setenv("KEY_EVT_AMQP_EXCHANGE", "from-env")
    assert cli.main(["serve", "--keymask", "ALL"]) == 0
    assert seen == [Config(exchange="from-env", keymasks=(b"ALL",))]
