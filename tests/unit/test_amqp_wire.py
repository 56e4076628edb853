"""The aiormq adapter without a broker: its import-time check of aiormq's private hooks, its log
filter, and that nothing else in the proxy imports aiormq. The broker side of the contract is
``tests/e2e/test_amqp_wire.py``."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import logging
import sys
from pathlib import Path

import aiormq
import pytest

from proxy.events import amqp_wire
from proxy.events.amqp_wire import QuietAiormq, check_aiormq
from proxy.events.errors import AiormqIncompatible

ROOT = Path(__file__).resolve().parents[2]
VERSION = importlib.metadata.version("aiormq")


def test_the_installed_aiormq_has_every_hook() -> None:
    check_aiormq()


@pytest.mark.parametrize("name", ["_on_confirm_frame", "_on_return_frame", "_get_frame", "_read_content"])
def test_a_missing_channel_hook_is_named_with_aiormq_s_version(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.delattr(aiormq.Channel, name)
    with pytest.raises(AiormqIncompatible) as raised:
        check_aiormq()
    message = str(raised.value)
    assert f"aiormq {VERSION} " in message and f"Channel.{name} is gone" in message
    assert "checked with aiormq 7.2.4" in message and isinstance(raised.value, ImportError)


def test_a_hook_that_is_no_longer_a_coroutine_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Channel._reader awaits the hook: a plain function there would make our override a
    # coroutine nobody awaits, and every confirm would be lost.
    monkeypatch.setattr(aiormq.Channel, "_on_confirm_frame", lambda self, frame: None)
    with pytest.raises(AiormqIncompatible, match="_on_confirm_frame is no longer a coroutine function"):
        check_aiormq()


def test_a_connection_without_the_reader_task_is_refused() -> None:
    class Connection:
        channels: dict[int, object]
        connection_tune: object

    with pytest.raises(AiormqIncompatible, match=r"Connection\._reader_task is no longer declared"):
        check_aiormq(connection=Connection)


def test_the_check_runs_when_the_module_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(aiormq.Channel, "_on_return_frame")
    spec = importlib.util.spec_from_file_location("amqp_wire_copy", amqp_wire.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(AiormqIncompatible, match="Channel._on_return_frame is gone"):
        spec.loader.exec_module(module)
    assert "amqp_wire_copy" not in sys.modules


def test_aiormq_is_imported_only_by_the_adapter() -> None:
    importers = []
    for path in sorted([*(ROOT / "proxy").rglob("*.py"), *(ROOT / "protocol").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name == "aiormq" or name.startswith("aiormq.") for name in names):
                importers.append(str(path.relative_to(ROOT)))
    # proxy/tail.py is a consumer of its own (`key-evt-amqp tail`), on aiormq's public API only: the
    # internals the publisher relies on stay behind the adapter.
    assert sorted(set(importers)) == ["proxy/events/amqp_wire.py", "proxy/tail.py"]


# ---- the log filter ----------------------------------------------------------------------------


def aiormq_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    log = logging.getLogger("aiormq.connection")
    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except ConnectionResetError as exc:
        failure = exc
    log.error("error when creating transport: %r", failure)
    log.error('Unexpected connection close from remote "amqp://x", Connection.Close(reply_code=320)')
    log.warning("Cancelling cause reader exited abnormally", exc_info=failure)
    log.warning("Connection %r was blocked by: %r", "amqp://x", "low on memory")
    log.warning("Connection %r was unblocked", "amqp://x")
    log.info("not shown at the proxy's default level")
    log.debug("Received frame %r", "frame")
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "aiormq.connection"]


def test_the_filter_is_installed_once_on_aiormq_s_connection_logger() -> None:
    filters = logging.getLogger("aiormq.connection").filters
    assert sum(isinstance(f, QuietAiormq) for f in filters) == 1


def test_failures_the_publisher_reports_are_dropped_broker_alarms_kept(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        lines = aiormq_lines(caplog)
    assert lines == [("WARNING", "Connection 'amqp://x' was blocked by: 'low on memory'"),
                     ("WARNING", "Connection 'amqp://x' was unblocked"),
                     ("INFO", "not shown at the proxy's default level")]


def test_at_debug_aiormq_logs_everything(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="aiormq.connection"):
        lines = aiormq_lines(caplog)
    assert [level for level, _ in lines] == ["ERROR", "ERROR", "WARNING", "WARNING", "WARNING", "INFO", "DEBUG"]


def test_other_aiormq_loggers_are_untouched(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        logging.getLogger("aiormq.channel").error("Consumer callback failed")
    assert [r.getMessage() for r in caplog.records] == ["Consumer callback failed"]
