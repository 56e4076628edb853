"""Which master owns which slot, kept current.

:class:`SlotMap` is an immutable snapshot built from ``CLUSTER SLOTS``. ``CLUSTER SHARDS`` is not
used: on redis-server 7.0 it lists shards with no slots while a new cluster settles, and ``CLUSTER
SLOTS`` exists on every version (deprecated in 7.0, still served by 7.x and 8.x).

:class:`Topology` owns the current map and replaces it: at start (from the seeds), every
``REFRESH_INTERVAL``, and soon after a client connection reports ``MOVED`` or a lost node
(:meth:`Topology.refresh_soon`, coalesced). A ``MOVED`` also patches its one slot at once
(:meth:`Topology.moved`), so the next command for that slot goes to the right node before the
refresh lands.
"""

from __future__ import annotations

from typing import cast

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import hiredis

from protocol.commands import encode_command as encode
from protocol.errors import NEED_DATA
from protocol.slots import SLOTS
from proxy.config import SECONDS, Config, RedisAddress
from proxy.connect import open_redis_streams
from proxy.errors import TopologyError

log = logging.getLogger("key_evt_amqp.cluster")

Address = tuple[str, int]
REFRESH_INTERVAL = 5 * SECONDS
#: Refreshes asked for by MOVED or lost nodes are at least this far apart.
MIN_REFRESH_GAP = 0.2 * SECONDS
QUERY_TIMEOUT = 2 * SECONDS
#: Our control connections read at most this much for one reply (a CLUSTER SLOTS of a large
#: cluster is a few hundred KiB).
MAX_CONTROL_REPLY = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SlotMap:
    owners: tuple[Address | None, ...]  # index: slot
    masters: tuple[Address, ...]  # in the order of the first slot each owns (stable for SCAN)
    replicas: tuple[Address, ...]
    ids: tuple[tuple[Address, str], ...] = ()  # node ids as CLUSTER SLOTS gave them

    def node_id(self, address: Address) -> str:
        return next((i for a, i in self.ids if a == address), "")

    @classmethod
    def from_cluster_slots(cls, reply: list[list[object]]) -> SlotMap:
        owners: list[Address | None] = [None] * SLOTS
        first_slot: dict[Address, int] = {}
        replicas: list[Address] = []
        ids: dict[Address, str] = {}
        for entry in reply:
            # [start, end, [host, port, id, ...] of the master, the same of each replica]
            start, end = int(cast(int, entry[0])), int(cast(int, entry[1]))
            nodes = [cast("list[object]", node) for node in entry[2:]]
            address = _address(nodes[0])
            for slot in range(start, end + 1):
                owners[slot] = address
            first_slot[address] = min(first_slot.get(address, SLOTS), start)
            replicas += [_address(node) for node in nodes[1:]]
            for node in nodes:
                node_id = node[2] if len(node) > 2 else None
                if isinstance(node_id, bytes):
                    ids[_address(node)] = node_id.decode()
        masters = tuple(sorted(first_slot, key=first_slot.__getitem__))
        return cls(tuple(owners), masters, tuple(dict.fromkeys(replicas)), tuple(ids.items()))

    @property
    def complete(self) -> bool:
        return None not in self.owners

    def with_owner(self, slot: int, address: Address) -> SlotMap:
        owners = list(self.owners)
        owners[slot] = address
        masters = self.masters if address in self.masters else (*self.masters, address)
        return SlotMap(tuple(owners), masters, self.replicas, self.ids)


def _address(node: list[object]) -> Address:
    host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
    return host, int(cast("int | bytes", node[1]))


def parse_address(text: bytes) -> Address:
    """``b"127.0.0.1:7002"`` (from a MOVED/ASK error) -> ``("127.0.0.1", 7002)``."""
    host, _, port = text.rpartition(b":")
    return host.decode().strip("[]"), int(port)


async def query(address: Address, *commands: tuple[bytes | str, ...], auth: RedisAddress | None = None,
                timeout: float = QUERY_TIMEOUT) -> list[object]:
    """Send ``commands`` to one node on a fresh connection; their decoded replies (errors as
    ``hiredis.ReplyError`` values). Raises OSError / TimeoutError when the node cannot answer."""
    prefix: list[tuple[bytes | str, ...]] = []
    if auth is not None and auth.password is not None:
        prefix.append(("AUTH", auth.username, auth.password) if auth.username else ("AUTH", auth.password))
    sent = [*prefix, *commands]
    node = auth.at(address) if auth is not None else RedisAddress(address[0], address[1])
    reader, writer = await open_redis_streams(node, timeout=timeout)
    try:
        try:
            writer.write(b"".join(encode(*command) for command in sent))
        except RuntimeError as exc:  # uvloop, when the node closed before this write
            raise ConnectionResetError("closed before the commands were sent") from exc
        parser = hiredis.Reader(notEnoughData=NEED_DATA)
        out: list[object] = []
        received = 0
        while len(out) < len(sent):
            while (reply := parser.gets()) is not NEED_DATA:
                out.append(reply)
            if len(out) < len(sent):
                data = await asyncio.wait_for(reader.read(65536), timeout)
                if not data:
                    raise ConnectionResetError("closed before replying")
                received += len(data)
                if received > MAX_CONTROL_REPLY:
                    raise ConnectionAbortedError("reply above MAX_CONTROL_REPLY")
                parser.feed(data)
        return out[len(prefix):]
    finally:
        writer.close()


async def is_cluster(config: Config) -> bool:
    """True when the upstream says ``cluster_enabled:1``. Any failure (down, NOAUTH) counts as
    not a cluster: the single-node relay then reports the problem to clients as before."""
    upstream = config.upstream
    try:
        (info,) = await query((upstream.host, upstream.port), ("INFO", "cluster"), auth=upstream,
                              timeout=min(config.connect_timeout, QUERY_TIMEOUT))
    except (OSError, asyncio.TimeoutError, hiredis.HiredisError):
        return False
    return isinstance(info, bytes) and b"cluster_enabled:1" in info


class Topology:
    """The current :class:`SlotMap` of the cluster behind ``upstream`` (its first seed, and the
    credentials every node is asked with)."""

    def __init__(self, upstream: RedisAddress) -> None:
        self.upstream = upstream
        self.seeds: tuple[Address, ...] = ((upstream.host, upstream.port),)
        self.map: SlotMap | None = None
        #: the last map read whole from a node (``map`` may carry slots patched by ``MOVED``)
        self.full_map: SlotMap | None = None
        self.refreshes = 0
        self._wanted = asyncio.Event()
        self._last = 0.0
        self._task: asyncio.Task[None] | None = None
        #: called (no arguments) after every refresh that changed the map (the event sources)
        self.listeners: list[Callable[[], None]] = []

    async def start(self) -> None:
        """The first map (retried in the background if no seed answers yet), then the refresher."""
        try:
            await self.refresh()
        except TopologyError as exc:
            log.warning("%s; retrying in the background", exc)
        self._task = asyncio.ensure_future(self._run())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def owner(self, slot: int) -> Address | None:
        return self.map.owners[slot] if self.map is not None else None

    def moved(self, slot: int, address: Address) -> None:
        """A node answered ``MOVED slot address``: believe it now, check the whole map soon."""
        if self.map is not None and self.map.owners[slot] != address:
            self.map = self.map.with_owner(slot, address)
        self.refresh_soon()

    def refresh_soon(self) -> None:
        self._wanted.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wanted.wait(), REFRESH_INTERVAL)
            except asyncio.TimeoutError:
                pass
            gap = self._last + MIN_REFRESH_GAP - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            self._wanted.clear()
            try:
                await self.refresh()
            except TopologyError as exc:
                log.warning("%s", exc)
            except Exception:  # a bug must cost one refresh: a dead refresher never sees a failover
                log.exception("cluster map refresh failed")

    async def refresh(self) -> None:
        """Ask the known masters, then the seeds, until one gives a full map."""
        self._last = time.monotonic()
        known = self.map.masters + self.map.replicas if self.map is not None else ()
        failures = []
        for address in dict.fromkeys((*known, *self.seeds)):
            try:
                (reply,) = await query(address, ("CLUSTER", "SLOTS"), auth=self.upstream)
            except (OSError, asyncio.TimeoutError, hiredis.HiredisError) as exc:
                failures.append(f"{address[0]}:{address[1]}: {exc!r}")
                continue
            if not isinstance(reply, list):
                failures.append(f"{address[0]}:{address[1]}: {reply!r}")
                continue
            slot_map = SlotMap.from_cluster_slots(reply)
            if not slot_map.complete:
                failures.append(f"{address[0]}:{address[1]}: slots not all covered")
                continue
            changed = self.map is None or slot_map != self.map
            if self.map is None or slot_map.owners != self.map.owners:
                log.info("cluster map: masters %s", ", ".join(f"{h}:{p}" for h, p in slot_map.masters))
            self.map = self.full_map = slot_map
            self.refreshes += 1
            if changed:
                for listener in list(self.listeners):
                    listener()
            return
        raise TopologyError("no cluster node gave a slot map: " + "; ".join(failures))
