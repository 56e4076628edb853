"""The configuration in force while the proxy runs: one owner, who tells everyone who cares.

:class:`LiveConfig` holds the :class:`~proxy.config.Config` in force. A Config is never changed in
place: an admin command builds a new, validated one (:func:`proxy.settings.apply_module_args`,
:func:`dataclasses.replace`) and hands it to :meth:`LiveConfig.update`, which puts it in force and
calls every subscriber with it, in the order they subscribed, before it returns.

Parts read :attr:`LiveConfig.current` when they need a value (the publisher its window, the
pipeline the fallback size); parts that keep something derived from it subscribe and rebuild it
(the event service its filters, the publisher its frame encoder). Nobody keeps a copy of their own.
What the proxy was started with and cannot change while it runs (where it listens, the upstream,
the fallback key, the client limits) is read once, at construction, by whoever owns it.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.config import Config

__all__ = ["Listener", "LiveConfig"]

#: Called with the new configuration, after it is in force.
Listener = Callable[[Config], None]


class LiveConfig:
    """The configuration in force (:attr:`current`) and who to tell when it changes."""

    __slots__ = ("current", "_listeners")

    def __init__(self, config: Config) -> None:
        #: The configuration in force: read it, never assign it (use :meth:`update`).
        self.current = config
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(config)`` after every later :meth:`update` (not for the current one)."""
        self._listeners.append(listener)

    def update(self, config: Config) -> None:
        """Put ``config`` in force, then tell every subscriber, in the order they subscribed."""
        self.current = config
        for listener in self._listeners:
            listener(config)
