"""The broker connection's pure parts: a refusal read from the handshake's bytes, failures as
readable text, the order nodes are tried in, and which failure speaks for a round of nodes."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aiormq
import pamqp.frame
import pytest
from pamqp import commands

from proxy.config import Config
from proxy.events import amqp_wire, publisher
from proxy.events.amqp_wire import _close_frame, describe
from proxy.events.errors import BrokerError
from proxy.events.publisher import AmqpPublisher
from proxy.live import LiveConfig


def frames(*methods: Any) -> bytes:
    return b"".join(pamqp.frame.marshal(m, 0) for m in methods)


def test_a_close_is_found_behind_the_handshake() -> None:
    start = commands.Connection.Start(server_properties={"product": "RabbitMQ"}, mechanisms="PLAIN",
                                      locales="en_US")
    tune = commands.Connection.Tune(channel_max=2047, frame_max=131072, heartbeat=60)
    close = commands.Connection.Close(530, "NOT_ALLOWED - vhost nope not found", 10, 40)
    assert _close_frame(frames(start, tune, close)) == (530, "NOT_ALLOWED - vhost nope not found")
    assert _close_frame(frames(start, tune)) is None
    assert _close_frame(frames(start) + b"\x01\x00") is None  # cut in the middle of a frame
    assert _close_frame(b"HTTP/1.1 400 Bad Request\r\n") is None
    assert _close_frame(b"") is None


@pytest.mark.parametrize(("exc", "text"), [
    (aiormq.ConnectionClosed(320, "CONNECTION_FORCED - broker forced connection closure"),
     "CONNECTION_FORCED - broker forced connection closure"),
    (aiormq.ChannelNotFoundEntity("NOT_FOUND - no exchange 'x' in vhost '/'"), "NOT_FOUND - no exchange 'x' in vhost '/'"),
    (ConnectionResetError(104, "Connection reset by peer"), "Connection reset by peer"),
    (asyncio.TimeoutError(), "timed out"),
    (EOFError(), "connection closed"),
    (aiormq.exceptions.InvalidFrameError("Expected x, got <Connection.Close object at 0x7f3615031370>"),
     "Expected x, got Connection.Close"),
    (ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
     "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
])
def test_failures_read_as_text(exc: BaseException, text: str) -> None:
    assert describe(exc) == text


def test_a_wrapped_socket_error_is_unwrapped() -> None:
    try:
        try:
            raise ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required")
        except OSError as cause:
            raise aiormq.AMQPConnectionError(f"Server communication error: {cause!r}") from cause
    except aiormq.AMQPConnectionError as exc:
        wrapped = exc
    text = describe(wrapped)
    assert "SSLError(" not in text and "alert certificate required" in text


class Sink:
    def on_ready(self) -> None: ...
    def on_settled(self, confirmed: list[Any], failed: list[Any]) -> None: ...


NODES = (("a", 1), ("b", 2), ("c", 3))


def test_nodes_are_shuffled_and_the_last_one_lost_goes_last() -> None:
    p = AmqpPublisher(LiveConfig(Config()), Sink())
    firsts = {tuple(p._node_order(NODES))[0] for _ in range(200)}
    assert firsts == set(NODES)  # every node gets its turn first: proxies spread over the cluster
    p._last_node = ("b", 2)
    for _ in range(50):
        order = p._node_order(NODES)
        assert sorted(order) == sorted(NODES) and order[-1] == ("b", 2)
    assert p._node_order((("b", 2),)) == [("b", 2)]


class FakeLink:
    frame_max = 131072
    cluster_name = "rabbit@test"
    server = "RabbitMQ test"
    last_rx = 0.0
    buffered = 0

    def abort(self) -> None: ...


def run_open(monkeypatch: pytest.MonkeyPatch, outcomes: dict[str, BrokerError | None]) -> tuple[AmqpPublisher, list[str]]:
    tried: list[str] = []

    async def fake_open_link(url: Any, listener: Any, timeout: float, **kw: Any) -> FakeLink:
        tried.append(url.host)
        error = outcomes[url.host]
        if error is not None:
            raise error
        return FakeLink()

    monkeypatch.setattr(publisher, "open_link", fake_open_link)
    config = Config(amqp_host="a", amqp_port=1, amqp_other_nodes=(("b", 2), ("c", 3)))
    p = AmqpPublisher(LiveConfig(config), Sink())

    async def go() -> None:
        try:
            await p._open(config)
        finally:
            if p._watchdog is not None:
                p._watchdog.cancel()

    try:
        asyncio.run(go())
    except BrokerError as exc:
        p.last_error = f"{exc.code} {exc.reason}"
    return p, tried


@pytest.mark.parametrize(("codes", "expected"), [
    ((3, 3, 3), 3), ((3, 5, 3), 5), ((5, 4, 3), 4), ((3, 3, 4), 4),
])
def test_a_failed_round_reports_the_most_telling_code_and_every_reason(
        monkeypatch: pytest.MonkeyPatch, codes: tuple[int, ...], expected: int) -> None:
    outcomes: dict[str, BrokerError | None] = {
        host: BrokerError(code, f"{host} said {code}") for host, code in zip("abc", codes)}
    p, tried = run_open(monkeypatch, outcomes)
    assert sorted(tried) == ["a", "b", "c"]
    code, reason = p.last_error.split(" ", 1)
    assert int(code) == expected
    assert sorted(reason.split("; ")) == ["a said %d" % codes[0], "b said %d" % codes[1], "c said %d" % codes[2]]


def test_the_first_node_that_works_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    p, tried = run_open(monkeypatch, {"a": BrokerError(3, "down"), "b": None, "c": BrokerError(3, "down")})
    assert tried[-1] == "b" and p.node == "b:2" and p.cluster_name == "rabbit@test"
    assert p._last_node == ("b", 2) and p.metrics.amqp_connections == 1


def test_amqp_wire_alone_imports_aiormq() -> None:
    assert amqp_wire.describe is describe
