"""The least Python can do as a Redis relay: the floor our proxy is measured against.

uvloop, one upstream connection per client, ``data_received`` -> ``write`` both ways, nothing
else (no parsing, no flow control). Run: ``python -m bench.bare_relay LISTEN_PORT UPSTREAM_PORT``.
"""

import asyncio
import sys

import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client):
        self.client = client  # the client's transport

    def data_received(self, data):
        self.client.write(data)

    def connection_lost(self, exc):
        self.client.close()


class Client(asyncio.Protocol):
    upstream = None

    def connection_made(self, transport):
        self.transport, self.early = transport, []
        asyncio.get_running_loop().create_task(self.open_upstream())

    async def open_upstream(self):
        loop = asyncio.get_running_loop()
        try:
            self.upstream, _ = await loop.create_connection(
                lambda: Upstream(self.transport), "127.0.0.1", UPSTREAM_PORT)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():  # the client left while we connected
            self.upstream.close()
        self.upstream.writelines(self.early)

    def data_received(self, data):
        if self.upstream is None:  # bytes that came before the upstream connection did
            self.early.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc):
        if self.upstream is not None:
            self.upstream.close()


async def main(listen_port):
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", listen_port)
    await server.serve_forever()


if __name__ == "__main__":
    LISTEN_PORT, UPSTREAM_PORT = int(sys.argv[1]), int(sys.argv[2])
    uvloop.run(main(LISTEN_PORT))
