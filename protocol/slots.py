"""Redis Cluster key slots, and which arguments of a command are keys.

Sans-IO. :func:`key_slot` is Redis's own ``keyHashSlot``: CRC16 (XMODEM) of the key, or of the
``{hash tag}`` in it (the bytes between the first ``{`` and the first ``}`` after it, when there
are any), modulo 16384.

:func:`keys_of` returns the keys of a command from a fixed table, not from ``COMMAND INFO`` loaded
at start: the table is deterministic, testable without a server, and the proxy must route the
very first command before any round trip. It covers the commands of Redis 7.0 that take keys (the
legacy ``first/last/step`` positions, plus the ``numkeys`` and ``STREAMS`` forms). A command it
does not know returns :data:`UNKNOWN`; the caller decides (the cluster relay refuses it).
"""

from __future__ import annotations

from typing import Final

SLOTS: Final = 16384

_TABLE: list[int] = []
for _byte in range(256):
    _crc = _byte << 8
    for _ in range(8):
        _crc = ((_crc << 1) ^ 0x1021) if _crc & 0x8000 else (_crc << 1)
    _TABLE.append(_crc & 0xFFFF)
del _byte, _crc


def crc16(data: bytes) -> int:
    """CRC16-XMODEM (polynomial 0x1021, initial value 0), as Redis's ``crc16.c``."""
    crc = 0
    table = _TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFF00) ^ table[(crc >> 8) ^ byte]
    return crc


def key_slot(key: bytes) -> int:
    """The cluster slot of ``key`` (0..16383), hash tags honoured."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:  # `{}` (empty tag) hashes the whole key
            key = key[start + 1:end]
    return crc16(key) & (SLOTS - 1)


class _Unknown:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"


#: Returned by :func:`keys_of` for a command the table does not know.
UNKNOWN: Final = _Unknown()

# (first, last, step): Redis's legacy key spec; ``last`` < 0 counts from the end (-1 = last arg).
_RANGES: dict[bytes, tuple[int, int, int]] = {}


def _add(names: str, spec: tuple[int, int, int]) -> None:
    for name in names.split():
        _RANGES[name.encode()] = spec


_add("""get set setnx setex psetex append strlen getrange substr setrange getset getdel getex incr
    decr incrby decrby incrbyfloat getbit setbit bitcount bitpos bitfield bitfield_ro type ttl pttl
    expire pexpire expireat pexpireat expiretime pexpiretime persist dump restore hget hset hsetnx
    hmset hmget hdel hlen hstrlen hkeys hvals hgetall hexists hincrby hincrbyfloat hrandfield hscan
    lpush rpush lpushx rpushx lpop rpop llen lindex lset lrange ltrim lrem linsert lpos sadd srem
    smembers sismember smismember scard spop srandmember sscan zadd zincrby zrem zcard zcount
    zlexcount zscore zmscore zrank zrevrank zrange zrangebyscore zrevrangebyscore zrangebylex
    zrevrangebylex zrevrange zremrangebyrank zremrangebyscore zremrangebylex zpopmin zpopmax
    zrandmember zscan pfadd xadd xlen xrange xrevrange xdel xtrim xack xclaim xautoclaim xpending
    xsetid geoadd geodist geohash geopos georadius_ro georadiusbymember_ro geosearch sort_ro
    spublish""", (1, 1, 1))
_add("""del unlink exists touch mget watch sinter sunion sdiff sinterstore sunionstore sdiffstore
    pfcount pfmerge pfdebug""", (1, -1, 1))
_add("rename renamenx rpoplpush lmove smove copy zrangestore geosearchstore lcs brpoplpush blmove",
     (1, 2, 1))
_add("mset msetnx", (1, -1, 2))
_add("blpop brpop bzpopmin bzpopmax", (1, -2, 1))
_add("bitop", (2, -1, 1))
_add("object", (2, 2, 1))  # OBJECT ENCODING key (OBJECT HELP: see _subcommand_keyless)

#: ``name -> index of numkeys``; the keys follow it (after a destination at 1 for the *store forms).
_NUMKEYS: dict[bytes, int] = {
    b"eval": 2, b"evalsha": 2, b"eval_ro": 2, b"evalsha_ro": 2, b"fcall": 2, b"fcall_ro": 2,
    b"zunion": 1, b"zinter": 1, b"zdiff": 1, b"zintercard": 1, b"sintercard": 1, b"lmpop": 1,
    b"zmpop": 1, b"blmpop": 2, b"bzmpop": 2, b"zunionstore": 2, b"zinterstore": 2, b"zdiffstore": 2,
}
_DEST_FIRST = frozenset({b"zunionstore", b"zinterstore", b"zdiffstore"})

#: Commands that take no key (the caller decides where they go).
KEYLESS: Final = frozenset(n.encode() for n in """ping echo time lastsave command select auth hello
    client config info dbsize keys scan flushall flushdb randomkey publish pubsub subscribe
    unsubscribe psubscribe punsubscribe multi exec discard unwatch script function wait memory
    slowlog latency lolwut role quit reset readonly readwrite cluster asking debug save bgsave
    bgrewriteaof shutdown monitor sync psync replicaof slaveof failover swapdb move acl module
    object xinfo xgroup sunsubscribe ssubscribe""".split())


def keys_of(args: list[bytes]) -> list[bytes] | _Unknown:
    """The key arguments of ``args`` (a command, name first), in order; ``[]`` for a keyless
    command (or a form of it without keys), :data:`UNKNOWN` for a command the table lacks."""
    name = args[0].lower()
    spec = _RANGES.get(name)
    if spec is not None:
        first, last, step = spec
        n = len(args)
        end = n + last if last < 0 else last
        if name == b"object" and n > 1 and args[1].lower() == b"help":
            return []
        return list(args[first:min(end, n - 1) + 1:step])
    at = _NUMKEYS.get(name)
    if at is not None:
        return _numkeys(args, name, at)
    if name in (b"xread", b"xreadgroup"):
        return _streams(args)
    if name in (b"georadius", b"georadiusbymember", b"sort"):
        return _with_store(args)
    if name in (b"xinfo", b"xgroup", b"memory"):
        sub = args[1].lower() if len(args) > 2 else b""
        wants_key = sub in (b"stream", b"groups", b"consumers", b"create", b"setid", b"destroy",
                            b"createconsumer", b"delconsumer", b"usage")
        return [args[2]] if wants_key else []
    if name in KEYLESS:
        return []
    return UNKNOWN


def _numkeys(args: list[bytes], name: bytes, at: int) -> list[bytes]:
    try:
        count = int(args[at])
    except (IndexError, ValueError):
        return []  # Redis answers the syntax error, from any node
    keys = list(args[at + 1:at + 1 + max(count, 0)])
    return [args[1], *keys] if name in _DEST_FIRST else keys


def _streams(args: list[bytes]) -> list[bytes]:
    for i in range(1, len(args)):
        if args[i].lower() == b"streams":
            rest = args[i + 1:]
            return list(rest[:len(rest) // 2])
    return []


def _with_store(args: list[bytes]) -> list[bytes]:
    keys = [args[1]] if len(args) > 1 else []
    for i in range(2, len(args) - 1):
        if args[i].lower() in (b"store", b"storedist"):
            keys.append(args[i + 1])
    return keys
