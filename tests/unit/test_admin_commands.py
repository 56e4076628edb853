"""Our commands without a proxy: which names run one (exactly ours, any case), their texts."""

from __future__ import annotations

import asyncio
import logging
import types
from dataclasses import replace

import pytest

from protocol.commands import ADMIN_VERBS, admin_verb
from proxy import admin
from proxy.config import Config
from proxy.metrics import Metrics


def test_every_verb_has_a_handler() -> None:
    assert set(admin.HANDLERS) == ADMIN_VERBS


@pytest.mark.parametrize(
    ("name", "runs"),
    [
        (b"key_evt_amqp.info", True),
        (b"KEY_EVT_AMQP.INFO", True),
        (b"Key_Evt_Amqp.Config_Get", True),
        (b"key_evt_amqp.infox", False),
        (b"key_evt_amqp.INFOx", False),
        (b"key_evt_amqp.config_getxx", False),
        (b"key_evt_amqp.info ", False),
        (b"key_evt_amqp.info\x00", False),
        (b"key_evt_amqp.\xc4\xb0nfo", False),  # no Unicode case folding onto ASCII
        (b"key_evt_amqp.", False),
    ],
)
def test_only_our_exact_names_run(name: bytes, runs: bool) -> None:
    assert (admin_verb(name) in admin.HANDLERS) is runs


def test_unknown_command_text_is_redis_s() -> None:
    assert admin.unknown_command([b"key_evt_amqp.infox"]) == (
        "ERR unknown command 'key_evt_amqp.infox', with args beginning with: ")
    text = admin.unknown_command([b"key_evt_amqp.x", b"a" * 100, b"b" * 100, b"c"])
    assert text.endswith("'" + "a" * 100 + "' '" + "b" * 25 + "' ")


def test_info_values_cannot_add_lines() -> None:
    """An error text with CR/LF (a broker's reply text, say) must not forge an INFO field."""
    runtime = types.SimpleNamespace(info=lambda: {"last_error": "refused\r\nevents_dropped:0", "gaps": 1},
                                    config=Config(), metrics=Metrics())
    reply = admin.run(runtime, [b"key_evt_amqp.info"], resp3=False)  # type: ignore[arg-type]
    assert isinstance(reply, bytes)
    body = reply.split(b"\r\n", 1)[1]
    assert body.split(b"\r\n")[:4] == [b"# key_evt_amqp", b"last_error:refused  events_dropped:0", b"gaps:1", b""]


def test_a_handler_that_fails_later_costs_one_reply_and_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """The one runner both relays use: an exception inside an awaited handler is logged and
    becomes an error reply in the command's place."""

    async def connect(config: object) -> bytes:
        raise RuntimeError("a bug")

    runtime = types.SimpleNamespace(config=Config(), connect=connect, metrics=Metrics())
    pending = admin.run(runtime, [b"KEY_EVT_AMQP.Connect"], resp3=False)  # type: ignore[arg-type]
    assert not isinstance(pending, bytes)
    with caplog.at_level(logging.ERROR, logger="key_evt_amqp.admin"):
        reply = asyncio.run(pending)
    assert reply == b"-ERR key_evt_amqp.connect failed: internal error (see the proxy's log)\r\n"
    assert "key_evt_amqp.connect failed" in caplog.text and "a bug" in caplog.text
    assert runtime.metrics.admin == {("connect", "error"): 1}


def test_config_changes_show_old_and_new_values_and_never_a_password() -> None:
    before = Config(amqp_password="old-secret")
    after = replace(before, routing_key="rk", amqp_password="new-secret", keymasks=(b"^a",))
    text = admin.config_changes(before, after)
    assert text == ("amqp_password *** -> ***, routing_key 'redis_keyspace_events' -> 'rk', "
                    "keymasks [] -> ['^a']")
    assert "secret" not in text
    assert admin.config_changes(before, before) == ""
