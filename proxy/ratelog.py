"""Log lines that cannot flood the log: one line per kind per interval, with a count of the rest."""

from __future__ import annotations

import logging
import time

__all__ = ["RateLimitedLog"]

INTERVAL = 10.0  # seconds between two lines of the same kind


class RateLimitedLog:
    """``warn(kind, message)`` logs at most once per ``interval`` per ``kind``; suppressed lines are
    counted and reported with the next line of that kind."""

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval - 1.0) < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (%d similar lines suppressed)"
            args = (*args, suppressed)
        self.logger.warning(message, *args, exc_info=exc_info)
