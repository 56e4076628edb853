"""Contract of ``proxy/events/amqp_wire.py`` with the installed aiormq and the local RabbitMQ.

The adapter overrides private aiormq hooks (its docstring lists them). If an aiormq release stopped
calling one, the publisher would get no confirm at all: every event would time out into the
fallback list and nothing would say why. These tests fail instead, with an assertion that names
the broken assumption. Each publish goes through the adapter exactly as the publisher's do
(pre-encoded frames written beside aiormq's writer). Unique queues and routing keys on the shared
broker (tests/rabbit.py); nothing else there is touched.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop
from yarl import URL

from faults import FaultRelay
from proxy.events.amqp_wire import CHANNEL, ConfirmLink, LinkListener, open_link
from proxy.events.message import Event, FrameEncoder
from rabbit import EXCHANGE, URL as RABBIT_URL, RabbitQueue

WAIT = 10.0  # seconds for the broker's answer before the test reports what is missing
QUIET = 0.5  # seconds to watch for calls that must not come
AIORMQ = f"aiormq {importlib.metadata.version('aiormq')}"

Call = tuple[Any, ...]  # ("confirm", tag, multiple, nack) | ("return", id, code, text) | ("closed", reason)


class Recorder:
    """A :class:`LinkListener` that records every call in order."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._changed = asyncio.Event()
        self.listener = LinkListener(lambda *a: self._add("confirm", *a), lambda *a: self._add("return", *a),
                                     lambda *a: self._add("closed", *a))

    def _add(self, *call: Any) -> None:
        self.calls.append(call)
        self._changed.set()

    async def until(self, done: Callable[[list[Call]], bool], seconds: float = WAIT) -> None:
        """Wait until ``done(calls)`` or ``seconds``; the test then asserts on what came."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not done(self.calls):
            self._changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def confirmed(calls: list[Call]) -> bool:
    return any(call[0] == "confirm" for call in calls)


def publish(link: ConfirmLink, routing_key: str, message_id: bytes, channel: int = CHANNEL) -> None:
    encoder = FrameEncoder(channel, EXCHANGE, routing_key, 1, link.frame_max)
    link.write(encoder.encode(Event.keyspace(message_id, 0, 0, b"set", b"contract")))


async def publish_once(routing_key: str, message_id: bytes) -> list[Call]:
    """Open a link, publish one message, return the listener's calls up to its confirm."""
    recorder = Recorder()
    link = await open_link(URL(RABBIT_URL), recorder.listener, WAIT)
    try:
        publish(link, routing_key, message_id)
        await recorder.until(confirmed)
    finally:
        await link.close(2.0)
    return recorder.calls


@pytest.fixture
def queue() -> Iterator[RabbitQueue]:
    with RabbitQueue() as q:
        yield q


def test_a_publish_to_a_bound_queue_reaches_the_listener_as_an_ack(queue: RabbitQueue) -> None:
    calls = run(publish_once(queue.routing_key, b"contract-ack"))
    stored = queue.count()
    assert stored == 1, (f"the broker stored {stored} messages for 1 publish: frames written beside "
                         f"{AIORMQ}'s writer did not arrive whole (ConfirmLink.write / FrameEncoder)")
    assert calls, (f"RabbitMQ stored the message but no basic.ack reached the listener within {WAIT}s: "
                   f"{AIORMQ} no longer hands basic.ack to Channel._on_confirm_frame (amqp_wire.py)")
    assert calls == [("confirm", 1, False, False)], (
        f"expected one ack for delivery tag 1 (tags count from 1 on a new confirm channel), got {calls}")


def test_an_unroutable_mandatory_publish_reaches_the_listener_as_a_return_then_its_ack() -> None:
    calls = run(publish_once(f"kea-unrouted-{uuid.uuid4().hex}", b"contract-return"))
    assert confirmed(calls), (f"no confirm within {WAIT}s for an unroutable publish: {AIORMQ} no longer "
                              f"hands basic.ack to Channel._on_confirm_frame (amqp_wire.py); calls {calls}")
    assert calls[0][0] == "return", (
        f"RabbitMQ acked an unroutable mandatory publish but no basic.return reached the listener before "
        f"it: {AIORMQ} no longer hands basic.return to Channel._on_return_frame (amqp_wire.py); calls {calls}")
    assert calls[0] == ("return", b"contract-return", 312, "NO_ROUTE"), (
        f"the return did not carry our message_id and NO_ROUTE: reading its content through "
        f"Channel._get_frame / Channel._read_content changed in {AIORMQ}; got {calls[0]}")
    assert calls[1:] == [("confirm", 1, False, False)], f"expected the return, then the ack of tag 1: {calls}"


def test_a_publish_the_broker_refuses_reaches_the_listener_as_a_nack() -> None:
    # x-max-length 0 with reject-publish: RabbitMQ answers every publish routed there with basic.nack.
    with RabbitQueue(arguments={"x-max-length": 0, "x-overflow": "reject-publish"}) as full:
        calls = run(publish_once(full.routing_key, b"contract-nack"))
    assert calls, (f"no confirm within {WAIT}s for a publish to a full reject-publish queue: {AIORMQ} no "
                   f"longer hands basic.nack to Channel._on_confirm_frame (amqp_wire.py)")
    assert [(kind, tag, nack) for kind, tag, _multiple, nack in calls] == [("confirm", 1, True)], (
        f"RabbitMQ nacks a publish to a full reject-publish queue; the listener got {calls}: the adapter "
        f"no longer tells basic.nack (pamqp spec.Basic.Nack) from basic.ack in {AIORMQ}")


async def close_by_broker() -> list[Call]:
    recorder = Recorder()
    link = await open_link(URL(RABBIT_URL), recorder.listener, WAIT)
    publish(link, "any", b"contract-close", channel=CHANNEL + 1)  # a channel never opened: 504
    await recorder.until(lambda calls: bool(calls))
    link.abort()  # what the publisher does on on_closed
    await asyncio.sleep(QUIET)
    return recorder.calls


def test_a_close_by_the_broker_reaches_the_listener_once_with_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        calls = run(close_by_broker())
    assert calls, (f"RabbitMQ closed the connection (CHANNEL_ERROR) but on_closed was not called within {WAIT}s: "
                   f"the closing futures of {AIORMQ}'s Connection/Channel no longer complete (amqp_wire.py)")
    assert len(calls) == 1 and calls[0][0] == "closed" and "CHANNEL_ERROR" in calls[0][1], (
        f"expected one on_closed naming the broker's CHANNEL_ERROR, got {calls}")
    leaked = [r.getMessage() for r in caplog.records if r.name.startswith("aiormq") and r.levelno >= logging.ERROR]
    assert not leaked, f"{AIORMQ} logs the close on another logger than aiormq.connection (QuietAiormq): {leaked}"


async def cut_then_abort(relay: FaultRelay, queue: RabbitQueue) -> tuple[list[Call], list[Call]]:
    # Heartbeats every 0.5s keep bytes moving, so the relay's cut reaches us as a reset at once.
    url = URL(RABBIT_URL).with_port(relay.port).with_query(heartbeat=1)
    recorder = Recorder()
    link = await open_link(url, recorder.listener, WAIT)
    publish(link, queue.routing_key, b"contract-cut")
    await recorder.until(confirmed)
    relay.cut()
    await recorder.until(lambda calls: bool(calls) and calls[-1][0] == "closed")
    after_cut = list(recorder.calls)
    link.abort()
    relay.restore()
    link = await open_link(url, recorder.listener, WAIT)
    recorder.calls.clear()
    publish(link, queue.routing_key, b"contract-abort")
    link.abort()  # before the ack can come: no call may follow, and aiormq must stay quiet
    await asyncio.sleep(QUIET)
    return after_cut, recorder.calls


def test_a_cut_is_reported_and_an_abort_is_final_and_quiet(queue: RabbitQueue, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # Without QuietAiormq, so that a reader left running by abort() would show its traceback.
    monkeypatch.setattr(logging.getLogger("aiormq.connection"), "filters", [])
    with FaultRelay(5672) as relay, caplog.at_level(logging.INFO):
        after_cut, after_abort = run(cut_then_abort(relay, queue))
        aiormq_lines = [r.getMessage() for r in caplog.records
                        if r.name.startswith("aiormq") and r.levelno >= logging.WARNING]
    assert after_cut[:1] == [("confirm", 1, False, False)], (
        f"no ack before the cut: {AIORMQ} no longer hands basic.ack to Channel._on_confirm_frame; {after_cut}")
    assert after_cut[-1:] and after_cut[-1][0] == "closed" and after_cut[-1][1] != "closed", (
        f"a cut connection did not reach on_closed with aiormq's connection error within {WAIT}s: {after_cut}")
    assert "object at 0x" not in after_cut[-1][1] and "Error(" not in after_cut[-1][1], after_cut
    assert after_abort == [], f"the listener was called after abort(): {after_abort}"
    # The cut itself makes aiormq log its reader's end; the abort must not add a second one.
    assert aiormq_lines.count("Cancelling cause reader exited abnormally") <= 1, (
        f"abort() left {AIORMQ}'s reader running, so it logged the EOF we caused: "
        f"Connection._reader_task is no longer the reader (amqp_wire.py); lines {aiormq_lines}")
