"""A long read is parsed READ_BUDGET at a time, one part per event-loop iteration, in order."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from fakes import FakeServer, FakeTransport
from proxy.relay import READ_BUDGET, ClientConnection


async def relay(reads: list[bytes], *, hold_first: bool) -> tuple[bytes, int]:
    """Feed the reads (all held first, as while connecting, or one by one); what Redis got, and
    the most bytes parsed in one iteration."""
    out: list[bytes] = []
    server = FakeServer(buffer_limit=8 * 1024 * 1024)
    client = ClientConnection(server, server.runtime)  # type: ignore[arg-type]
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    client.upstream = SimpleNamespace(keep_spare=lambda: None)  # type: ignore[assignment]
    client._up_write = out.append
    most = 0  # bytes forwarded by one data_received call
    if hold_first:
        for read in reads:
            client.data_received(read)  # held: CONNECTING
        client._resume(next(iter(client._pauses)))
    else:
        client._pauses.clear()
        for read in reads:
            while client._pauses:
                await asyncio.sleep(0)
            before = sum(map(len, out))
            client.data_received(read)
            most = max(most, sum(map(len, out)) - before)
    while client._pauses or client._held:
        await asyncio.sleep(0)
    return b"".join(out), most


def test_long_reads_arrive_whole_and_in_order() -> None:
    for line in (b"PING\r\n", b"*1\r\n$4\r\nPING\r\n"):
        stream = line * 100_000
        reads = [stream[i:i + 262_144] for i in range(0, len(stream), 262_144)]
        for hold_first in (False, True):
            sent, most = asyncio.run(relay(reads, hold_first=hold_first))
            assert sent == stream
            # the rest of each read waits for a later iteration (plus a request the last cut split)
            assert most <= READ_BUDGET + len(line)
