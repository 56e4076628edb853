"""Which commands the proxy must look at, and how.

Almost every command is relayed as bytes without a look. The relay only needs to notice:
- our own ``key_evt_amqp.*`` commands, which never reach Redis (a ``key_evt_amqp.*`` name we do
  not implement gets the "unknown command" text the module gave);
- commands after which Redis's replies can no longer be counted one per command (pub/sub, MONITOR,
  ``CLIENT REPLY``, ``CLIENT TRACKING``): the connection then becomes a plain byte pipe;
- ``MULTI``/``EXEC``/``DISCARD``/``RESET`` (our commands are refused inside a transaction) and
  ``HELLO`` (the protocol version our own replies must use).
"""

from __future__ import annotations

import enum

from protocol.integers import string2ll

ADMIN_PREFIX = b"key_evt_amqp."
_PREFIX_LEN = len(ADMIN_PREFIX)
#: Longer names are never ours (so an unfinished command with a longer name may be relayed).
MAX_ADMIN_NAME = 64


class Effect(enum.Enum):
    ADMIN = "admin"
    UNCOUNTABLE = "uncountable"  # replies stop matching commands one to one
    MULTI = "multi"
    END_MULTI = "end-multi"  # EXEC, DISCARD
    RESET = "reset"
    HELLO = "hello"
    CLIENT = "client"  # CLIENT REPLY / TRACKING make the stream uncountable; others do not
    QUIT = "quit"  # Redis answers, then closes: not a lost connection


#: Our commands, by the verb after the prefix.
ADMIN_VERBS = frozenset({
    "config_set", "config_get", "connect", "disconnect", "fallback_storage_size_set",
    "keymask_clean", "keymask_add", "keymask_set", "events_set", "info",
})


#: Lower-case command names the relay must notice; every other name costs one set lookup.
NOTICED: dict[bytes, Effect] = {
    b"subscribe": Effect.UNCOUNTABLE,
    b"psubscribe": Effect.UNCOUNTABLE,
    b"ssubscribe": Effect.UNCOUNTABLE,
    b"monitor": Effect.UNCOUNTABLE,
    b"sync": Effect.UNCOUNTABLE,
    b"psync": Effect.UNCOUNTABLE,
    b"multi": Effect.MULTI,
    b"exec": Effect.END_MULTI,
    b"discard": Effect.END_MULTI,
    b"reset": Effect.RESET,
    b"hello": Effect.HELLO,
    b"client": Effect.CLIENT,
    b"quit": Effect.QUIT,
}
NOTICED.update({ADMIN_PREFIX + verb.encode(): Effect.ADMIN for verb in ADMIN_VERBS})

_UNCOUNTABLE_CLIENT_SUBCOMMANDS = frozenset({b"reply", b"tracking"})


def effect_of(args: list[bytes]) -> Effect | None:
    """What the relay must do about this command, or None to relay it blindly."""
    name = args[0].lower()
    if name[:_PREFIX_LEN] == ADMIN_PREFIX and len(name) <= MAX_ADMIN_NAME:
        return Effect.ADMIN
    effect = NOTICED.get(name)
    if effect is Effect.CLIENT:
        if len(args) > 1 and bytes(args[1]).lower() in _UNCOUNTABLE_CLIENT_SUBCOMMANDS:
            return Effect.UNCOUNTABLE
        return None
    return effect


def admin_verb(name: bytes) -> str:
    """``b"KEY_EVT_AMQP.Keymask_Add"`` -> ``"keymask_add"``."""
    return name[_PREFIX_LEN:].decode("ascii", "replace").lower()


def hello_version(args: list[bytes]) -> int | None:
    """The protocol version a HELLO asks for, or None when it asks for none (or a bad one)."""
    if len(args) < 2:
        return None
    return string2ll(args[1])
