"""Where each client command goes in cluster mode, and how split replies are put back together.

- Keyed commands go to the master owning their slot; keys in several slots get Redis's own
  ``-CROSSSLOT``, except :data:`SPLIT` commands, sent per slot and merged (not atomic then).
- Keyless commands go to the "home" node (the first master), or to every master (:data:`FANNED`).
- What may be resent if the node connection is lost (:class:`~.links.Resend`): single-slot,
  split and home-node commands outside a transaction (always when read-only, else only if they
  never left the proxy); never fanned parts, transactions, session replays or our own commands.
- Transactions are pinned to the node of their first key (or of WATCH); until a key is seen
  after ``MULTI``, commands are held.
- ``AUTH``/``HELLO``/``CLIENT SETNAME|SETINFO|NO-EVICT|NO-TOUCH`` go to every open node link and
  are replayed on links opened later.
- ``(P)SUBSCRIBE``/``(P)UNSUBSCRIBE``: the connection becomes a pipe to the home node.
- ``key_evt_amqp.*``: answered by the proxy after the authority probe on the home node.
- :data:`UNSUPPORTED`: ``-ERR <name> not supported by key-evt-amqp in cluster mode``, connection kept.
- A name the key table does not know goes to the home node: Redis answers an unknown command in
  its own words, and a module command with keys is redirected (``MOVED``) and followed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from protocol import barrier, merge, replies
from protocol.barrier import Probe
from protocol.commands import ADMIN_PREFIX, READ_ONLY, admin_verb, encode_command
from protocol.reply_scan import Frame
from protocol.slots import UNKNOWN, key_slot, keys_of
from proxy import admin
from proxy.cluster.links import Place, Resend, Sent, Tx

if TYPE_CHECKING:
    from proxy.cluster.relay import ClusterClientConnection as Client

_PREFIX_LEN = len(ADMIN_PREFIX)


ASKING = encode_command(b"ASKING")
DISCARD = encode_command(b"DISCARD")
EXECABORT = replies.error("EXECABORT Transaction discarded because of previous errors.")
OK = replies.simple("OK")
QUEUED = replies.simple("QUEUED")
EMPTY_SCAN = replies.encode([b"0", []])  # cursor 0, no keys

#: Commands split per slot when their keys span several, and how the parts merge.
SPLIT = frozenset({b"mget", b"mset", b"del", b"exists", b"unlink", b"touch"})

UNSUPPORTED = frozenset(n.encode() for n in """monitor sync psync cluster readonly readwrite asking
    migrate move swapdb debug save bgsave bgrewriteaof shutdown replicaof slaveof failover module
    ssubscribe sunsubscribe acl""".split())
_SESSION_CLIENT = frozenset({b"setname", b"setinfo", b"no-evict", b"no-touch"})
_UNSUPPORTED_CLIENT = frozenset({b"reply", b"tracking", b"caching"})
_FANNED_SUBCOMMANDS = {
    b"script": frozenset({b"load", b"flush"}),
    b"function": frozenset({b"load", b"delete", b"flush", b"restore"}),
    b"config": frozenset({b"set", b"resetstat", b"rewrite"}),
}


def dispatch(c: Client, args: list[bytes]) -> None:
    name = args[0].lower()
    special = SPECIAL.get(name)
    if special is not None:
        special(c, args, name)
        return
    if name[:_PREFIX_LEN] == ADMIN_PREFIX:
        _admin(c, args)
        return
    if name in UNSUPPORTED:
        _unsupported(c, name)
        return
    keys = keys_of(args)
    if keys is UNKNOWN or not keys:
        _keyless(c, args, name)
        return
    slot = key_slot(keys[0])  # type: ignore[index]  # keys_of() gave a non-empty list for a keyed command
    for key in keys[1:]:  # type: ignore[index]  # keys_of() gave a non-empty list for a keyed command
        if key_slot(key) != slot:
            if name in SPLIT and c.tx in (Tx.NONE, Tx.WATCHING):
                _split(c, args, name, keys)  # type: ignore[arg-type]  # keys_of() gave a non-empty list for a keyed command
            else:
                _crossslot(c)
            return
    _keyed(c, args, slot, name)


def _resend(name: bytes) -> Resend:
    return Resend.ALWAYS if name in READ_ONLY else Resend.IF_UNSENT


def _keyed(c: Client, args: list[bytes], slot: int, name: bytes) -> None:
    tx = c.tx
    if tx is Tx.NONE or tx is Tx.WATCHING:
        c.link_for_slot(slot).send(Sent(encode_command(*args), c.place(), slot=slot, resend=_resend(name)))
        return
    if tx is Tx.QUEUED:
        c.tx = Tx.PINNED
        c.pin(slot).send(Sent(encode_command(*args), c.place(), slot=slot, follow=False))
        return
    if c.tx_slot >= 0 and slot != c.tx_slot:
        _crossslot(c)
        return
    c.tx_slot = slot
    c.tx_link.send(Sent(encode_command(*args), c.place(), slot=slot, follow=False))  # type: ignore[union-attr]  # Tx.PINNED: tx_link is set


def _in_tx(c: Client, args: list[bytes]) -> bool:
    """Inside MULTI a command is queued on the transaction's node (held until it has one)."""
    tx = c.tx
    if tx is Tx.QUEUED:
        # Held until a key names the node. The client may wait for each reply before sending
        # the next command, so its +QUEUED is ours; a command Redis refuses later makes EXEC
        # answer -EXECABORT, as it would have anyway. An aborted one never runs: nothing kept.
        if c.tx_aborted or c.hold(Sent(encode_command(*args), None, callback=_ignore, follow=False)):
            c.reply_local(QUEUED)
        else:
            c.reply_local(replies.error(
                f"ERR key-evt-amqp: transaction too long before its first key (more than "
                f"{c.server_state.buffer_limit} bytes held); it is aborted"))
        return True
    if tx is Tx.PINNED:
        c.tx_link.send(Sent(encode_command(*args), c.place(), follow=False))  # type: ignore[union-attr]  # Tx.PINNED: tx_link is set
        return True
    return False


def _keyless(c: Client, args: list[bytes], name: bytes = b"") -> None:
    if not _in_tx(c, args):
        resend = _resend(name or args[0].lower())
        c.link(c.home()).send(Sent(encode_command(*args), c.place(), resend=resend))


def _crossslot(c: Client) -> None:
    if c.tx in (Tx.QUEUED, Tx.PINNED):
        c.tx_aborted = True  # as Redis flags a transaction after a refused command
    c.reply_local(replies.error("CROSSSLOT Keys in request don't hash to the same slot"))


def _unsupported(c: Client, name: bytes, what: str = "") -> None:
    text = what or name.decode("utf-8", "replace").upper()
    c.reply_local(replies.error(f"ERR {text} not supported by key-evt-amqp in cluster mode"))


def _split(c: Client, args: list[bytes], name: bytes, keys: list[bytes]) -> None:
    """One sub-command per slot, the parts merged in the client's key order."""
    groups: dict[int, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key_slot(key), []).append(index)
    place = c.place()
    positions = list(groups.values())
    if name == b"mget":
        total = len(keys)
        place.split(len(groups), lambda parts: merge.in_key_order(parts, positions, total))
    elif name == b"mset":
        place.split(len(groups), merge.first)
    else:
        place.split(len(groups), merge.summed)
    resend = _resend(name)
    for part, (slot, indexes) in enumerate(groups.items()):
        if name == b"mset":
            sub = [args[0]]
            for i in indexes:
                sub += args[1 + 2 * i:3 + 2 * i]
        else:
            sub = [args[0], *(keys[i] for i in indexes)]
        c.link_for_slot(slot).send(Sent(encode_command(*sub), place, part=part, slot=slot, resend=resend))


def _fan(c: Client, args: list[bytes], how: Callable[[list[bytes]], bytes]) -> None:
    """The same command to every master; ``how`` merges their replies."""
    if _in_tx(c, args):
        return
    nodes = c.masters()
    place = c.place()
    place.split(len(nodes), how)
    data = encode_command(*args)
    for part, address in enumerate(nodes):
        c.link(address).send(Sent(data, place, part=part))


def _fan_or_home(c: Client, args: list[bytes], name: bytes) -> None:
    sub = args[1].lower() if len(args) > 1 else b""
    if sub in _FANNED_SUBCOMMANDS[name]:
        _fan(c, args, merge.first)
    else:
        _keyless(c, args)


# -- transactions ---------------------------------------------------------------------------------

def _multi(c: Client, args: list[bytes], name: bytes) -> None:
    if _in_tx(c, args):  # nested: Redis answers
        return
    if c.tx is Tx.WATCHING:
        c.tx = Tx.PINNED
        c.tx_link.send(Sent(encode_command(*args), c.place(), follow=False))  # type: ignore[union-attr]  # Tx.PINNED: tx_link is set
    else:
        c.tx = Tx.QUEUED  # MULTI always succeeds here: answered now, sent with the first key
        c.hold(Sent(encode_command(*args), None, callback=_ignore, follow=False))
        c.reply_local(OK)


def _exec(c: Client, args: list[bytes], name: bytes) -> None:
    if c.tx is Tx.QUEUED:
        c.pin(-1)  # no key in the whole transaction: the home node runs it
        c.tx = Tx.PINNED
    if c.tx is Tx.PINNED:
        link = c.tx_link
        assert link is not None
        if c.tx_aborted and name == b"exec":
            link.send(Sent(DISCARD, None, callback=_ignore))
            c.reply_local(EXECABORT)
        else:
            link.send(Sent(encode_command(*args), c.place(), follow=False))
        c.tx_reset()
    elif c.tx is Tx.WATCHING:
        c.tx_link.send(Sent(encode_command(*args), c.place(), follow=False))  # type: ignore[union-attr]  # Tx.PINNED: tx_link is set
    else:
        _keyless(c, args)


def _watch(c: Client, args: list[bytes], name: bytes) -> None:
    if len(args) < 2 or _in_tx(c, args):
        _keyless(c, args)
        return
    slot = key_slot(args[1])
    if any(key_slot(key) != slot for key in args[2:]) or (c.tx_slot >= 0 and slot != c.tx_slot):
        _crossslot(c)
        return
    link = c.tx_link or c.link_for_slot(slot)
    c.tx, c.tx_slot, c.tx_link = Tx.WATCHING, slot, link
    link.send(Sent(encode_command(*args), c.place(), slot=slot, follow=False))


def _unwatch(c: Client, args: list[bytes], name: bytes) -> None:
    if c.tx is Tx.WATCHING:
        c.tx_link.send(Sent(encode_command(*args), c.place(), follow=False))  # type: ignore[union-attr]  # Tx.PINNED: tx_link is set
        c.tx_reset()
    else:
        _keyless(c, args)


# -- session, pub/sub, admin ----------------------------------------------------------------------

def _session(c: Client, args: list[bytes], name: bytes) -> None:
    """To every open link (the home link's reply is the client's); replayed on later links."""
    if name == b"client":
        sub = args[1].lower() if len(args) > 1 else b""
        if sub in _UNSUPPORTED_CLIENT:
            _unsupported(c, name, f"CLIENT {sub.decode('utf-8', 'replace').upper()}")
            return
        if sub not in _SESSION_CLIENT:
            _keyless(c, args)
            return
        name += b" " + sub
    if _in_tx(c, args):
        return
    home = c.link(c.home())  # opened (and replayed) before this command is recorded
    others = [link for link in c.links.values() if link is not home]
    data = encode_command(*args)
    c.session[name] = data
    place = c.place()
    hello = args[1] if name == b"hello" and len(args) > 1 else None

    def merged(parts: list[bytes]) -> bytes:
        reply = merge.first(parts)
        if hello is not None and reply[:1] not in (b"-", b"!"):
            c.resp3 = hello == b"3"
        return reply

    place.split(1 + len(others), merged)
    for part, link in enumerate([home, *others]):
        link.send(Sent(data, place, part=part))


def _subscribe(c: Client, args: list[bytes], name: bytes) -> None:
    """From here on the connection is a pipe to the home node (PUBLISH reaches every node)."""
    if c.tx in (Tx.QUEUED, Tx.PINNED):
        c.tx_aborted = True
        _unsupported(c, name, f"{name.decode().upper()} inside MULTI")
        return
    link = c.link(c.home())
    place = c.place()
    place.stream = []

    def started(frame: Frame) -> None:
        link.streaming = place
        place.stream_in(frame.raw)

    c.streaming = link
    link.send(Sent(encode_command(*args), None, callback=started, follow=False))


def _quit(c: Client, args: list[bytes], name: bytes) -> None:
    c.reply_local(OK)
    c.close_after_last()


def _reset(c: Client, args: list[bytes], name: bytes) -> None:
    data = encode_command(*args)
    for link in c.links.values():
        link.send(Sent(data, None, callback=_ignore))
    c.session.clear()
    c.tx_reset()
    c.resp3 = False
    c.reply_local(replies.simple("RESET"))


def _admin(c: Client, args: list[bytes]) -> None:
    place = c.place()
    if admin_verb(args[0]) not in admin.HANDLERS:
        place.reply = replies.error(admin.unknown_command(args))
        return
    label = args[0].decode("utf-8", "replace").lower()
    if c.tx in (Tx.QUEUED, Tx.PINNED):
        c.tx_aborted = True
        place.reply = replies.error(f"ERR {label} is not allowed inside MULTI (the transaction is aborted)")
        return

    reads = admin_verb(args[0]) in admin.READ_VERBS
    who = [admin.describe_client(c.transport)]
    read_probe = [b""]

    def named(frame: Frame) -> None:  # ACL WHOAMI, for the audit log
        who.append("user=" + barrier.user_of(frame.raw))

    def read_probed(frame: Frame) -> None:
        read_probe[0] = frame.raw

    def probed(frame: Frame) -> None:
        raw = read_probe[0] + frame.raw
        verdict = barrier.judge_probe(raw)
        if verdict is not Probe.ALLOWED:
            # NOAUTH, or the lost link's error: as it is; anything else: the probe was not tried.
            passed = verdict is Probe.NOAUTH or verdict is Probe.PROXY_ERROR
            place.reply = frame.raw if passed else barrier.refusal(label, admin.needs_right(label))
            admin.refused(c.runtime, label, who[0], raw)
            return
        result = admin.run(c.runtime, args, resp3=c.resp3, client=" ".join(who))
        if isinstance(result, bytes):
            place.reply = result
        else:
            c.server_state.spawn(_deliver(c, place, result))

    home = c.link(c.home())
    home.send(Sent(barrier.READ_PROBE, None, callback=read_probed) if reads else
              Sent(barrier.WHOAMI, None, callback=named))
    home.send(Sent(barrier.PROBE, None, callback=probed))


async def _deliver(c: Client, place: Place, pending: Awaitable[bytes]) -> None:
    place.reply = await pending
    c.flush()


# -- keyless commands with a merged reply --------------------------------------------------------

def _scan(c: Client, args: list[bytes], name: bytes) -> None:
    try:
        cursor = int(args[1])
    except (IndexError, ValueError):
        cursor = -1
    if cursor < 0 or _in_tx(c, args):
        if cursor < 0:
            _keyless(c, args)  # Redis's own error
        return
    nodes = c.masters()
    node, own = merge.scan_cursor(cursor)
    if node >= len(nodes):
        c.reply_local(EMPTY_SCAN)
        return
    place = c.place()
    count = len(nodes)
    place.split(1, lambda parts: merge.scan_reply(parts[0], node, count))
    sub = [args[0], b"%d" % own, *args[2:]]
    c.link(nodes[node]).send(Sent(encode_command(*sub), place, part=0))


def _info(c: Client, args: list[bytes], name: bytes) -> None:
    if _in_tx(c, args):
        return
    section = b""
    if len(args) == 1 or args[1].lower() in (b"all", b"everything", b"default"):
        slot_map = c.topology.map
        masters = len(slot_map.masters) if slot_map is not None else 0
        section = (b"# Proxy\r\nproxy:key-evt-amqp\r\nproxy_mode:cluster\r\n"
                   b"cluster_masters:%d\r\ncluster_map_refreshes:%d\r\n" % (masters, c.topology.refreshes))
    place = c.place()
    place.split(1, lambda parts: merge.info_as_single(parts[0], section))
    c.link(c.home()).send(Sent(encode_command(*args), place, part=0))


def _ignore(frame: Frame) -> None:
    """The reply to one of the relay's own commands: not the client's."""


SPECIAL: dict[bytes, Callable[[Client, list[bytes], bytes], None]] = {
    b"multi": _multi,
    b"exec": _exec,
    b"discard": _exec,
    b"watch": _watch,
    b"unwatch": _unwatch,
    b"auth": _session,
    b"hello": _session,
    b"client": _session,
    b"subscribe": _subscribe,
    b"psubscribe": _subscribe,
    b"unsubscribe": _subscribe,
    b"punsubscribe": _subscribe,
    b"quit": _quit,
    b"reset": _reset,
    b"scan": _scan,
    b"info": _info,
    b"dbsize": lambda c, args, name: _fan(c, args, merge.summed),
    b"keys": lambda c, args, name: _fan(c, args, merge.concatenated),
    b"flushall": lambda c, args, name: _fan(c, args, merge.first),
    b"flushdb": lambda c, args, name: _fan(c, args, merge.first),
    b"script": _fan_or_home,
    b"function": _fan_or_home,
    b"config": _fan_or_home,
}
