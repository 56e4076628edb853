"""Which names run one of our commands: exactly ours, in any case; nothing longer (issue #8)."""

from __future__ import annotations

import pytest

from protocol.commands import ADMIN_VERBS, admin_verb
from proxy import admin


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
