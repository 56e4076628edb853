"""A minimal blocking AMQP 0-9-1 client over one socket, built from pamqp frames.

It does only what the harness needs: log in, open channel 1, manage its own queues, publish
pre-encoded frames with confirms (the broker ceiling), and consume bodies without acks (to
check what arrived). Everything is bounded by a deadline; a broker error becomes
:class:`AMQPError`.
"""

from __future__ import annotations

import socket
import struct
import time

from pamqp import commands, frame
from pamqp.header import ProtocolHeader

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = b"\xce"
_HEAD = struct.Struct(">BHI")
_METHOD_ID = struct.Struct(">HH")
_ACK = struct.Struct(">QB")  # delivery tag, bits (multiple)
_HEADER_SIZE = struct.Struct(">HHQ")  # class id, weight, body size
BASIC_ACK = (60, 80)
BASIC_NACK = (60, 120)
BASIC_DELIVER = (60, 60)
RECV_SIZE = 1 << 20
QUEUE_EXPIRES_MS = 15 * 60 * 1000  # a queue left behind by a killed run deletes itself


class AMQPError(Exception):
    """The broker refused something, closed on us, or did not answer in time."""


def raw_frame(frame_type: int, payload: bytes, channel: int = 1) -> bytes:
    """One wire frame around ``payload`` (used to build body frames without pamqp's overhead)."""
    return _HEAD.pack(frame_type, channel, len(payload)) + payload + FRAME_END


class RawAMQP:
    """One connection, channel 1. Close it with :meth:`close` (or use it as a context manager)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5672, user: str = "guest",
                 password: str = "guest", vhost: str = "/", timeout: float = 10.0):
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.backlog: list = []  # frames split out but not yet handled (after an _expect match)
        self.sock.sendall(ProtocolHeader().marshal())
        start = self._expect(commands.Connection.Start, channel=0)
        self.server_properties = start.server_properties
        self.send(commands.Connection.StartOk(
            client_properties={"product": "key-evt-amqp bench"}, mechanism="PLAIN",
            response=f"\0{user}\0{password}"), channel=0)
        tune = self._expect(commands.Connection.Tune, channel=0)
        self.frame_max = tune.frame_max or 131072
        self.send(commands.Connection.TuneOk(tune.channel_max, self.frame_max, 0), channel=0)
        self.send(commands.Connection.Open(virtual_host=vhost), channel=0)
        self._expect(commands.Connection.OpenOk, channel=0)
        self.rpc(commands.Channel.Open(), commands.Channel.OpenOk)

    # -- framing --------------------------------------------------------------------------
    def send(self, method, channel: int = 1) -> None:
        self.sock.sendall(frame.marshal(method, channel))

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AMQPError("timed out waiting for the broker")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(RECV_SIZE)
        except socket.timeout:
            raise AMQPError("timed out waiting for the broker") from None
        if not data:
            raise AMQPError("the broker closed the connection")
        self.buf += data

    def _poll(self) -> bool:
        """Take what the socket holds without waiting; False when it held nothing."""
        self.sock.settimeout(0.0)
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        if not data:
            raise AMQPError("the broker closed the connection")
        self.buf += data
        return True

    def _frames(self):
        """Split every complete frame out of the buffer: (type, channel, payload) tuples."""
        buf, pos, out = self.buf, 0, self.backlog
        self.backlog = []
        end_of_data = len(buf)
        while end_of_data - pos >= 7:
            ftype, channel, size = _HEAD.unpack_from(buf, pos)
            end = pos + 7 + size
            if end >= end_of_data:
                break
            out.append((ftype, channel, bytes(buf[pos + 7:end])))
            pos = end + 1
        del buf[:pos]
        return out

    def _expect(self, cls, channel: int = 1, deadline: float | None = None):
        """Read until a method frame of ``cls``; anything else but heartbeats is an error."""
        deadline = deadline or time.monotonic() + self.timeout
        while True:
            frames = self._frames()
            for i, (ftype, ch, payload) in enumerate(frames):
                if ftype != FRAME_METHOD:
                    continue
                value = frame.unmarshal(raw_frame(ftype, payload, ch))[2]
                if isinstance(value, cls):
                    self.backlog = frames[i + 1:] + self.backlog
                    return value
                if isinstance(value, (commands.Channel.Close, commands.Connection.Close)):
                    raise AMQPError(f"{value.reply_code} {value.reply_text}")
            self._fill(deadline)

    def rpc(self, method, reply_cls):
        self.send(method)
        return self._expect(reply_cls)

    # -- queues ---------------------------------------------------------------------------
    def declare_queue(self, name: str, passive: bool = False) -> int:
        """Declare (or with ``passive`` look up) a queue; returns how many messages it holds."""
        args = None if passive else {"x-expires": QUEUE_EXPIRES_MS}
        ok = self.rpc(commands.Queue.Declare(queue=name, passive=passive, arguments=args),
                      commands.Queue.DeclareOk)
        return ok.message_count

    def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        self.rpc(commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=routing_key),
                 commands.Queue.BindOk)

    def purge(self, queue: str) -> int:
        return self.rpc(commands.Queue.Purge(queue=queue), commands.Queue.PurgeOk).message_count

    def delete(self, queue: str) -> None:
        self.rpc(commands.Queue.Delete(queue=queue), commands.Queue.DeleteOk)

    def wait_count(self, queue: str, n: int, timeout: float, interval: float = 0.005,
                   settle: float = 0.0) -> tuple[int, float]:
        """Poll until the queue holds ``n`` (then ``settle`` more seconds to see extras).

        Returns (count, monotonic time the count first reached ``n``, or of the last poll).
        """
        deadline = time.monotonic() + timeout
        count, seen_at = 0, time.monotonic()
        while time.monotonic() < deadline:
            count, seen_at = self.declare_queue(queue, passive=True), time.monotonic()
            if count >= n:
                break
            time.sleep(interval)
        if settle and count >= n:
            time.sleep(settle)
            count = self.declare_queue(queue, passive=True)
        return count, seen_at

    # -- publishing (the ceiling) -----------------------------------------------------------
    def confirm_select(self) -> None:
        self.rpc(commands.Confirm.Select(), commands.Confirm.SelectOk)

    def publish_confirmed(self, batches: list[bytes], per_batch: int, total: int,
                          window: int, timeout: float) -> tuple[int, int]:
        """Write pre-encoded batches, at most ``window`` messages unconfirmed; read acks as they come.

        Returns (acked, nacked) once every message is confirmed one way or the other.
        """
        deadline = time.monotonic() + timeout
        sent = done = acked = highest = 0
        batches = iter(batches)
        while done < total:
            if sent < total and sent - done < window:
                self.sock.sendall(next(batches))
                sent += per_batch if total - sent >= per_batch else total - sent
                if not self._poll():
                    continue
            else:
                self._fill(deadline)
            for ftype, _, payload in self._frames():
                if ftype != FRAME_METHOD:
                    continue
                ids = _METHOD_ID.unpack_from(payload)
                if ids != BASIC_ACK and ids != BASIC_NACK:
                    value = frame.unmarshal(raw_frame(ftype, payload))[2]
                    raise AMQPError(f"unexpected {value.name} while publishing")
                tag, bits = _ACK.unpack_from(payload, 4)
                count = tag - highest if bits & 1 else 1
                highest = max(highest, tag)
                done += count
                if ids == BASIC_ACK:
                    acked += count
        return acked, done - acked

    # -- consuming (the check) --------------------------------------------------------------
    def consume_bodies(self, queue: str, n: int, timeout: float, idle: float = 0.5) -> list[bytes]:
        """Take up to ``n`` messages off ``queue`` (no acks), waiting ``idle`` s for extras."""
        self.rpc(commands.Basic.Consume(queue=queue, consumer_tag="bench", no_ack=True),
                 commands.Basic.ConsumeOk)
        deadline = time.monotonic() + timeout
        bodies: list[bytes] = []
        pending, parts = 0, []
        quiet_until = None
        while time.monotonic() < deadline:
            for ftype, _, payload in self._frames():
                if ftype == FRAME_HEADER:
                    pending, parts = _HEADER_SIZE.unpack_from(payload)[2], []
                    if pending == 0:
                        bodies.append(b"")
                elif ftype == FRAME_BODY:
                    parts.append(payload)
                    pending -= len(payload)
                    if pending <= 0:
                        bodies.append(b"".join(parts))
            if len(bodies) >= n:
                quiet_until = quiet_until or time.monotonic() + idle
            try:
                self._fill(min(deadline, quiet_until or deadline))
            except AMQPError:
                if quiet_until is not None or time.monotonic() >= deadline:
                    break
                raise
        self.rpc(commands.Basic.Cancel(consumer_tag="bench"), commands.Basic.CancelOk)
        return bodies

    def close(self) -> None:
        try:
            self.send(commands.Connection.Close(200, "bye", 0, 0), channel=0)
            self._expect(commands.Connection.CloseOk, channel=0, deadline=time.monotonic() + 2)
        except (OSError, AMQPError):
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
