"""The shared settings' hash fields, without Redis: every setting a command changes goes to its
field and back unchanged; a field that cannot be read is named in ``problems`` and left out,
never raised. And where each start value came from (``settings.load``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.integers import LLONG_MAX, LLONG_MIN
from proxy.config import Config
from proxy.fleet.shared_fields import ENABLED, VERSION, SharedState, decode, encode, encode_enabled
from proxy.settings import COMMAND_SETTINGS, apply_module_args, load, module_arg_fields

EDGE = Config(
    amqp_host="broker-2.example", amqp_port=65535, amqp_user="ü ser:@/", amqp_password="p a:s@s,w\u00f6rd",
    heartbeat=0, exchange="", routing_key="r" * 255, delivery_mode=2, fallback_size=LLONG_MIN,
    events="", keymasks=(b"", b"a b", b"3:x,", b"\xff\x00\r\n", b":", b","),
    routes=((b"\xff a,", "r.{key}", None), (b"", "{db}.{event}", ""), (b"^x", "x", "amq.topic")),
    event_format="json",
)


def test_every_command_setting_is_shared() -> None:
    assert set(COMMAND_SETTINGS) == {
        "amqp_host", "amqp_port", "amqp_user", "amqp_password", "heartbeat", "exchange",
        "routing_key", "delivery_mode", "fallback_size", "events", "keymasks", "routes", "event_format"}


@pytest.mark.parametrize("config", [Config(), EDGE, replace(EDGE, fallback_size=LLONG_MAX, events="A")],
                         ids=["defaults", "edges", "edges-2"])
def test_every_setting_goes_to_its_field_and_back(config: Config) -> None:
    values = {name: getattr(config, name) for name in COMMAND_SETTINGS}
    fields = encode(values)
    assert set(fields) == {name.encode() for name in COMMAND_SETTINGS}
    state = decode({**fields, VERSION: b"12", ENABLED: encode_enabled(False)})
    assert state == SharedState(values, enabled=False, version=12, problems=())


def test_masks_are_netstrings() -> None:
    assert encode({"keymasks": (b"a b", b"c")}) == {b"keymasks": b"3:a b,1:c,"}
    assert encode({"keymasks": ()}) == {b"keymasks": b""}
    assert decode({b"keymasks": b""}).values == {"keymasks": ()}
    # Read as a command would take them: ALL replaces the rest, repeats go.
    assert decode({b"keymasks": b"1:a,3:ALL,"}).values == {"keymasks": (b"ALL",)}
    assert decode({b"keymasks": b"1:a,1:a,"}).values == {"keymasks": (b"a",)}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=30), max_size=8))
def test_any_masks_go_and_come_back(masks: list[bytes]) -> None:
    config = apply_module_args(Config(), [b"h", b"1", b"u", b"p", b"0", b"e", b"r", b"1", b"0", *masks],
                               with_flags=False) if masks else Config()
    assert decode(encode({"keymasks": config.keymasks})).values == {"keymasks": config.keymasks}


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from([*(n.encode() for n in COMMAND_SETTINGS), VERSION, ENABLED, b"x"]),
                       st.binary(max_size=40)))
def test_any_hash_content_is_read_without_raising(fields: dict[bytes, bytes]) -> None:
    state = decode(fields)
    assert len(state.values) + len(state.problems) + (VERSION in fields) + (ENABLED in fields) >= len(fields)
    if state.values:
        replace(Config(), **state.values)  # type: ignore[arg-type]  # whatever was read is a valid setting


@pytest.mark.parametrize(("fields", "problem"), [
    ({b"heartbeat": b"abc"}, "invalid heartbeat 'abc': expected whole seconds"),
    ({b"amqp_port": b"0"}, "invalid amqp_port '0': expected a port"),
    ({b"delivery_mode": b"05"}, "invalid delivery_mode '05'"),
    ({b"events": b"Q"}, "invalid events 'Q'"),
    ({b"amqp_host": b"a host"}, "invalid amqp_host 'a host'"),
    ({b"routing_key": b"\xff"}, "invalid routing_key '\\\\xff': not UTF-8"),
    ({b"keymasks": b"3:ab"}, "invalid keymasks '3:ab': expected netstrings"),
    ({b"keymasks": b"x:abc,"}, "invalid keymasks"),
    ({b"keymasks": b"-1:,"}, "invalid keymasks"),
    ({b"keymasks": b"2:abc,"}, "invalid keymasks"),
    ({b"keymasks": b"99999999999999999999:"}, "invalid keymasks"),
    ({b"future_setting": b"1"}, "unknown setting 'future_setting' (a newer version's, or written by hand)"),
    ({VERSION: b"-1"}, "invalid version '-1'"),
    ({VERSION: b"1.5"}, "invalid version"),
    ({ENABLED: b"yes"}, "invalid amqp_enabled 'yes': expected 0 or 1"),
])
def test_a_field_that_cannot_be_read_is_named_and_left_out(fields: dict[bytes, bytes], problem: str) -> None:
    state = decode({**fields, b"exchange": b"still-read"})
    assert state.values == {"exchange": "still-read"}
    assert len(state.problems) == 1 and state.problems[0].startswith(problem), state.problems


def test_a_bad_password_field_is_named_without_its_value() -> None:
    state = decode({b"amqp_password": b"s3cret\xff"})
    assert state.values == {}
    assert state.problems == ("invalid amqp_password: not UTF-8",)


def test_a_long_bad_value_is_cut_in_the_problem() -> None:
    (problem,) = decode({b"heartbeat": b"9" * 10_000}).problems
    assert len(problem) < 200


def test_only_command_settings_are_encoded() -> None:
    with pytest.raises(ValueError, match="listen_port"):
        encode({"listen_port": 1})


def test_module_arg_fields_name_what_apply_module_args_sets() -> None:
    args = [b"h", b"1", b"u", b"p", b"7", b"e", b"r", b"1", b"0", b"m"]  # each unlike EDGE
    for count in range(len(args) + 1):
        given = args[:count]
        changed = apply_module_args(EDGE, given, with_flags=False)
        assert {n for n in COMMAND_SETTINGS if getattr(changed, n) != getattr(EDGE, n)} == set(
            module_arg_fields(given, with_flags=False)), count
    assert module_arg_fields([b"xe", b"h"], with_flags=True) == ("events", "amqp_host")
    assert module_arg_fields([], with_flags=True) == ()


def test_start_origins(tmp_path: Path) -> None:
    path = tmp_path / "kea.toml"
    path.write_text('exchange = "from-file"\nrouting_key = "from-file"\n')
    config = load(["--config", str(path), "--heartbeat", "9", "--amqp", "amqp://u:p@h:1/v"],
                  {"KEY_EVT_AMQP_ROUTING_KEY": "from-env", "KEY_EVT_AMQP_KEYMASK": "a,b"})
    origins = {name: config.start_origin(name) for name in ("exchange", "routing_key", "heartbeat",
               "amqp_host", "amqp_password", "amqp_vhost", "keymasks", "delivery_mode", "listen_port")}
    assert origins == {"exchange": "file", "routing_key": "env", "heartbeat": "flag", "amqp_host": "flag",
                       "amqp_password": "flag", "amqp_vhost": "flag", "keymasks": "env",
                       "delivery_mode": "default", "listen_port": "default"}
    assert config == replace(config, start_origins=())  # where a value came from is not a setting
    assert "start_origins" not in config.masked()


def test_start_origins_of_module_args() -> None:
    config = load(["--heartbeat", "9"], {"KEY_EVT_AMQP_MODULE_ARGS": "xe 127.0.0.1 5672 u p"})
    assert [config.start_origin(n) for n in ("events", "amqp_host", "amqp_password", "heartbeat")] == [
        "env", "env", "env", "flag"]
