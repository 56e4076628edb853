"""The broker ceiling: how fast can Python publish confirmed messages into RabbitMQ here.

Two publishers, both into ``amq.direct`` with a queue bound, messages shaped like the proxy's
events (body ``0\\nset\\n<key>``, text/plain, message_id, timestamp, type, app_id, headers):

- :func:`run_ceiling`: pre-encoded Basic.Publish + ContentHeader + ContentBody frames, written
  ``batch`` messages per ``sendall`` over one socket, confirms on, acks (``multiple``) read as
  they come. Nothing is built while the clock runs.
- :func:`run_naive`: aiormq, one ``await channel.basic_publish(...)`` per message (each waits for
  its confirm): what a straightforward publisher gets. ``gather=True`` publishes each chunk with
  ``asyncio.gather`` instead (many in flight, still one coroutine per message).

Run alone: ``python -m bench.ceiling [-n N] [--naive N]`` (makes and deletes its own queue).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import time

from pamqp import commands, frame
from pamqp.header import ContentHeader

from bench.amqp_raw import FRAME_BODY, RawAMQP, raw_frame

EXCHANGE = "amq.direct"
BATCH = 500  # messages per write
WINDOW = 20_000  # messages unconfirmed at most
_ID_SLOT = "X" * 32  # placeholder patched with each message's id


def event_body(key: bytes) -> bytes:
    return b"0\nset\n" + key


def keys(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}{i:08d}".encode() for i in range(n)]


def properties(message_id: str) -> commands.Basic.Properties:
    return commands.Basic.Properties(
        content_type="text/plain", delivery_mode=1, message_id=message_id,
        timestamp=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0),
        message_type="set", app_id="key-evt-amqp-bench", headers={"db": 0, "event": "set"})


def encode_batches(routing_key: str, bodies: list[bytes], batch: int = BATCH) -> list[bytes]:
    """Every message as its three frames, joined ``batch`` messages per bytes object."""
    publish = frame.marshal(commands.Basic.Publish(exchange=EXCHANGE, routing_key=routing_key), 1)
    templates: dict[int, bytes] = {}  # body size -> header frame with the id slot
    slot = _ID_SLOT.encode()
    out, chunk = [], []
    for i, body in enumerate(bodies):
        size = len(body)
        if size not in templates:
            templates[size] = frame.marshal(ContentHeader(0, size, properties(_ID_SLOT)), 1)
        header = templates[size].replace(slot, b"%032x" % i)
        chunk.append(publish + header + raw_frame(FRAME_BODY, body))
        if len(chunk) == batch:
            out.append(b"".join(chunk))
            chunk = []
    if chunk:
        out.append(b"".join(chunk))
    return out


def run_ceiling(queue: str, routing_key: str, bodies: list[bytes], amqp=("127.0.0.1", 5672),
                batch: int = BATCH, window: int = WINDOW, timeout: float = 120.0) -> dict:
    """Publish ``bodies`` to a bound queue; returns rate (messages/s) and the queue's count."""
    batches = encode_batches(routing_key, bodies, batch)
    n = len(bodies)
    with RawAMQP(*amqp) as conn:
        conn.confirm_select()
        cpu0, t0 = time.process_time(), time.perf_counter()
        acked, nacked = conn.publish_confirmed(batches, batch, n, window, timeout)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        count, _ = conn.wait_count(queue, n, timeout=10)
    return {"rate": n / elapsed, "seconds": elapsed, "messages": n, "acked": acked,
            "nacked": nacked, "queue_count": count, "cpu_us_per_msg": cpu / n * 1e6,
            "ok": acked == n and count == n}


async def _naive(url: str, routing_key: str, bodies: list[bytes],
                 gather: bool) -> tuple[float, float]:
    import aiormq  # only this publisher needs it

    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel(publisher_confirms=True)
        props = properties(os.urandom(16).hex())
        cpu0, t0 = time.process_time(), time.perf_counter()
        if gather:
            for start in range(0, len(bodies), 1000):
                await asyncio.gather(*(
                    channel.basic_publish(b, exchange=EXCHANGE, routing_key=routing_key,
                                          properties=props) for b in bodies[start:start + 1000]))
        else:
            for body in bodies:
                await channel.basic_publish(body, exchange=EXCHANGE, routing_key=routing_key,
                                            properties=props)
        return time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await conn.close()


def run_naive(queue: str, routing_key: str, bodies: list[bytes], url: str, gather: bool = False,
              timeout: float = 120.0, amqp=("127.0.0.1", 5672)) -> dict:
    """The aiormq publisher; returns rate (messages/s) and the queue's count."""
    elapsed, cpu = asyncio.run(
        asyncio.wait_for(_naive(url, routing_key, bodies, gather), timeout))
    with RawAMQP(*amqp) as conn:
        count, _ = conn.wait_count(queue, len(bodies), timeout=10)
    return {"rate": len(bodies) / elapsed, "seconds": elapsed, "messages": len(bodies),
            "queue_count": count, "cpu_us_per_msg": cpu / len(bodies) * 1e6,
            "ok": count == len(bodies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="messages for the ceiling")
    parser.add_argument("--naive", type=int, default=2_000, help="messages for aiormq (0: skip)")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    args = parser.parse_args()
    tag = f"bench-ceiling-{os.getpid()}-{os.urandom(3).hex()}"
    with RawAMQP() as admin:
        admin.declare_queue(tag)
        admin.bind(tag, EXCHANGE, tag)
        try:
            result = run_ceiling(tag, tag, [event_body(k) for k in keys("ceil:", args.n)])
            print("ceiling", {k: round(v, 1) if isinstance(v, float) else v
                              for k, v in result.items()})
            for gather in (False, True) if args.naive else ():
                admin.purge(tag)
                result = run_naive(tag, tag, [event_body(k) for k in keys("naive:", args.naive)],
                                   args.amqp, gather)
                print("naive_gather" if gather else "naive",
                      {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()})
        finally:
            admin.delete(tag)


if __name__ == "__main__":
    main()
