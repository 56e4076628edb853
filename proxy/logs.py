"""Where the proxy's log lines go and what they look like (``--log-level``, ``--log-format``).

Every logger of ours is named ``key_evt_amqp.<part>`` (``key_evt_amqp.events``,
``key_evt_amqp.admin``, ...). Lines go to stderr, with UTC ISO-8601 timestamps:

- ``text``: ``2026-01-02T03:04:05.678Z WARNING key_evt_amqp.events.publisher: amqp: ...``
- ``json``: one object per line: ``{"time": "...Z", "level": "WARNING", "logger": "...",
  "message": "..."}`` (plus ``"exception"`` with the traceback when there is one).

The lines an operator alerts on are listed in README.md ("Monitoring").
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

__all__ = ["JsonFormatter", "UtcFormatter", "setup"]

ROOT = "key_evt_amqp"


class UtcFormatter(logging.Formatter):
    """``%(asctime)s`` as ``2026-01-02T03:04:05.678Z`` (UTC, milliseconds)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(UtcFormatter):
    """One JSON object per line (for log shippers and ``jq``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(level: str, form: str = "text", stream: TextIO | None = None, tag: str = "") -> None:
    """Send every log line (ours and our libraries') to ``stream`` (stderr) in ``form``
    (``text`` or ``json``), from ``level`` up. ``tag`` (``worker 2``, ``supervisor``) goes on every
    text line with the pid, so that the lines of several processes can be told apart (JSON lines
    carry the pid anyway)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    where = f" [{tag}, pid %(process)d]" if tag else ""
    handler.setFormatter(JsonFormatter() if form == "json" else
                         UtcFormatter(f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
