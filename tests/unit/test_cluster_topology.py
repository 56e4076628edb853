"""The map's refresher and its control connections, without a cluster."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from proxy import connect
from proxy.cluster.topology import Topology, query
from proxy.config import RedisAddress


def test_a_node_that_closes_before_the_query_is_written_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop raises RuntimeError (not an OSError) on a write to a transport already closed: a
    node killed between accepting and our write must still read as "unreachable"."""
    async def scenario() -> None:
        server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        real = connect.open_redis

        async def closed_at_once(*args: object, **kw: object) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
            transport, protocol = await real(*args, **kw)  # type: ignore[arg-type]
            transport.close()  # the node died right after accepting
            return transport, protocol

        monkeypatch.setattr(connect, "open_redis", closed_at_once)
        try:
            with pytest.raises(ConnectionError):
                await query(("127.0.0.1", port), ("CLUSTER", "SLOTS"))
        finally:
            server.close()
            await server.wait_closed()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


def test_the_refresher_outlives_an_unexpected_error() -> None:
    """A refresh that fails in a way nobody foresaw costs that refresh, not every later one
    (the map would stay stale forever: a failover never seen)."""
    async def scenario() -> None:
        topology = Topology(RedisAddress())
        calls: list[int] = []

        async def refresh() -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("unforeseen")

        topology.refresh = refresh  # type: ignore[method-assign]
        task = asyncio.ensure_future(topology._run())
        topology.refresh_soon()
        for wanted in (1, 2):
            for _ in range(200):
                if len(calls) >= wanted:
                    break
                await asyncio.sleep(0.01)
            topology.refresh_soon()
        task.cancel()
        assert len(calls) == 2

    asyncio.run(scenario())
