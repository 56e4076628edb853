"""The relay's command splitting, with fake transports: however the client's bytes are cut into
reads, Redis receives exactly the client's own commands, byte for byte and in order, and every
``key_evt_amqp.*`` command is cut out whole and answered in its place."""

from __future__ import annotations

import re
from dataclasses import replace
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.barrier import PROBE, READ_PROBE, WHOAMI
from proxy.config import Config
from proxy.relay import ClientConnection, Mode
from proxy.runtime import Change
from proxy.metrics import Metrics


def encode(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def set_write_buffer_limits(self, high: int) -> None: ...

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 50000) if name == "peername" else default


class FakeRuntime:
    """Our commands change the settings through ``Runtime.change`` (for the whole fleet, in
    Redis); here the change applies at once and the reply comes synchronously."""

    def __init__(self) -> None:
        self.config = Config()
        self.metrics = Metrics()

    def change(self, change: Change) -> bytes:
        self.config = change.make(self.config)
        return b"+OK\r\n"


class FakeServer:
    buffer_limit = 1 << 20

    def __init__(self) -> None:
        self.runtime = FakeRuntime()
        self.metrics = Metrics()

    def admit(self, client: ClientConnection) -> bool:
        return True

    def spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        coro.close()


MARKER = re.compile(rb"\*2\r\n\$4\r\nECHO\r\n\$52\r\n(key-evt-amqp-marker-[0-9a-f]{32})\r\n")


def run(chunks: list[bytes]) -> tuple[bytes, bytes, FakeRuntime]:
    """Feed the chunks; play Redis: answer each probe and marker. Returns (what Redis got from
    the client, what the client got from us, the runtime)."""
    server = FakeServer()
    client = ClientConnection(server, server.runtime)  # type: ignore[arg-type]
    to_client, to_redis = FakeTransport(), FakeTransport()
    client.connection_made(to_client)  # type: ignore[arg-type]
    client.upstream = SimpleNamespace(keep_spare=lambda: None)  # type: ignore[assignment]
    client._up_write = to_redis.write
    client._pauses.clear()
    answered = 0
    for chunk in chunks:
        client.data_received(chunk)
        while client.barrier is not None:
            sent = b"".join(to_redis.out)
            markers = MARKER.findall(sent)
            assert len(markers) == answered + 1, "a barrier without its marker"
            if sent.endswith(WHOAMI + b"*2\r\n$4\r\nECHO\r\n$52\r\n%s\r\n" % markers[-1]):
                reply = b"$7\r\ndefault\r\n"  # the audit log asks who the user is
            else:
                reply = b"-ERR Unknown option or number of arguments for CONFIG SET - 'x'\r\n"
            client.reply_data(reply + b"$52\r\n%s\r\n" % markers[-1])
            answered += 1
    sent = b"".join(to_redis.out)
    sent = MARKER.sub(b"", sent.replace(PROBE, b"").replace(READ_PROBE, b"").replace(WHOAMI, b""))
    # Canonical input never needs the slow exact parser: the fast path placed every command.
    assert client.mode is Mode.FAST
    return sent, b"".join(to_client.out), server.runtime


plain_args = st.lists(st.binary(max_size=40), min_size=1, max_size=4)
names = st.sampled_from([b"SET", b"get", b"HSET", b"Ping", b"key_evt_amqp", b"key_evt_amqpx"])
requests = st.lists(
    st.one_of(
        st.tuples(st.just("plain"), st.builds(lambda n, a: [n] + a, names, plain_args)),
        st.tuples(st.just("admin"), st.binary(min_size=1, max_size=30)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(requests=requests, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_any_split_relays_exactly_the_clients_commands(requests, cuts) -> None:  # type: ignore[no-untyped-def]
    stream, expected_redis, masks = b"", b"", []
    for kind, value in requests:
        if kind == "plain":
            stream += encode(value)
            expected_redis += encode(value)
        else:
            case = b"KEY_EVT_AMQP.KEYMASK_ADD" if len(value) % 2 else b"key_evt_amqp.keymask_add"
            stream += encode([case, value])
            masks.append(value)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:]) if b > a]
    got_redis, got_client, runtime = run(chunks)
    assert got_redis == expected_redis
    assert got_client == b"+OK\r\n" * len(masks)
    expected_masks: list[bytes] = []
    for mask in masks:
        if mask == b"ALL" or b"ALL" in expected_masks:
            expected_masks = [b"ALL"]
        elif mask not in expected_masks:
            expected_masks.append(mask)
    assert list(runtime.config.keymasks) == expected_masks


def test_a_command_named_like_ours_inside_a_value_is_relayed() -> None:
    inner = encode([b"key_evt_amqp.keymask_add", b"x"])
    stream = encode([b"SET", b"k", inner]) + encode([b"GET", b"k"])
    for cut in range(len(stream) + 1):
        got_redis, got_client, runtime = run([stream[:cut], stream[cut:]])
        assert got_redis == stream
        assert got_client == b""
        assert runtime.config.keymasks == ()


def test_pipe_mode_after_subscribe_relays_our_commands() -> None:
    stream = encode([b"SUBSCRIBE", b"c"]) + encode([b"key_evt_amqp.info"])
    server = FakeServer()
    client = ClientConnection(server, server.runtime)  # type: ignore[arg-type]
    to_client, to_redis = FakeTransport(), FakeTransport()
    client.connection_made(to_client)  # type: ignore[arg-type]
    client._up_write = to_redis.write
    client._pauses.clear()
    client.data_received(stream)
    assert client.mode is Mode.PIPE
    assert b"".join(to_redis.out) == stream


def test_config_unchanged_by_plain_traffic() -> None:
    got_redis, _, runtime = run([encode([b"SET", b"a", b"1"])])
    assert runtime.config == replace(Config())
