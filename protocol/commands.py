"""Which commands the proxy must look at, and how.

Almost every command is relayed as bytes without a look. The relay only needs to notice:
- our own ``key_evt_amqp.*`` commands, which never reach Redis (a ``key_evt_amqp.*`` name we do
  not implement gets the "unknown command" text the module gave);
- commands after which Redis's replies can no longer be counted one per command (pub/sub, MONITOR,
  ``CLIENT REPLY``, ``CLIENT TRACKING``): the connection then becomes a plain byte pipe;
- ``MULTI``/``EXEC``/``DISCARD``/``RESET`` (our commands are refused inside a transaction) and
  ``HELLO`` (the protocol version our own replies must use).

:func:`encode_command` is how the proxy writes any command of its own (or re-encodes a client's).
"""

from __future__ import annotations

import enum

from hiredis import pack_command

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
    "config_set", "config_get", "config_reset", "connect", "disconnect", "fallback_storage_size_set",
    "keymask_clean", "keymask_add", "keymask_set", "events_set", "info", "fleet",
    "route_add", "route_list", "route_clean", "format_set",
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


def encode_command(*args: bytes | str | int) -> bytes:
    """One command in Redis's multibulk form: ``encode_command("GET", b"k")`` is
    ``*2\r\n$3\r\nGET\r\n$1\r\nk\r\n``. A ``str`` is sent as UTF-8, an ``int`` in decimal."""
    # hiredis packs in C; a bool or a bytearray is refused with TypeError (say what you mean).
    # Its stub (3.x) declares a 1-tuple (`Tuple[X]` for `Tuple[X, ...]`) and no return type.
    packed: bytes = pack_command(args)  # type: ignore[arg-type]
    return packed


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


#: Commands that change nothing, so sending one twice is harmless: the ``readonly`` commands of
#: Redis 7.0 (``COMMAND`` flags), ``OBJECT`` and ``XINFO`` (every subcommand is ``readonly`` or
#: ``HELP``), and ``PING``/``ECHO``/``TIME``. The cluster relay resends these when their node
#: connection is lost before the reply (any other command only when it never left the proxy).
#: A table, not ``COMMAND`` at start, for the reasons of :mod:`protocol.slots`; a command missing
#: here is merely not resent. tests/e2e/test_cluster_commands.py checks it against the server.
READ_ONLY = frozenset(n.encode() for n in """bitcount bitfield_ro bitpos dbsize dump eval_ro
    evalsha_ro exists expiretime fcall_ro geodist geohash geopos georadius_ro georadiusbymember_ro
    geosearch get getbit getrange hexists hget hgetall hkeys hlen hmget hrandfield hscan hstrlen
    hvals keys lcs lindex llen lolwut lpos lrange mget pexpiretime pfcount pttl randomkey scan scard
    sdiff sinter sintercard sismember smembers smismember sort_ro srandmember sscan strlen substr
    sunion touch ttl type xlen xpending xrange xread xrevrange zcard zcount zdiff zinter zintercard
    zlexcount zmscore zrandmember zrange zrangebylex zrangebyscore zrank zrevrange zrevrangebylex
    zrevrangebyscore zrevrank zscan zscore zunion
    object xinfo ping echo time""".split())
