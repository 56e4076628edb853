"""What :mod:`protocol` raises, and the ``NEED_DATA`` sentinel it returns.

Exception tree::

    Error                   root: ``except protocol.Error`` catches anything this package raises
    └── ProtocolError       the peer sent bytes Redis would reject; send ``.reply``, then close
        ├── KeptTooLong     (requests) a streaming parser's kept arguments passed ``max_kept``
        └── UnbalancedQuotes (requests) ``split_args`` refused the quotes; ``.closed`` says how

Redis error *replies* (``-ERR ...`` from the server) are values that pass through, never exceptions.
"""

from __future__ import annotations

import enum
from typing import Final, Literal


class _Sentinel(enum.Enum):
    # An enum member rather than a bare object(): it is a singleton that survives pickling and
    # copying, and type checkers can narrow ``Request | NeedData`` with ``is NEED_DATA``.
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value

    __str__ = __repr__


#: Returned by parsers when the bytes fed so far do not finish the next item: feed more, then ask again.
NEED_DATA: Final = _Sentinel.NEED_DATA
NeedData = Literal[_Sentinel.NEED_DATA]


class Error(Exception):
    """Root of every exception raised by :mod:`protocol`."""


class ProtocolError(Error):
    """The peer sent bytes that Redis would reject, and Redis would close the connection.

    ``message`` is Redis's error text without the leading ``-`` and the trailing CRLF, for example
    ``ERR Protocol error: invalid multibulk length``. It is a ``str`` decoded as Latin-1 so that a
    raw byte Redis echoes back (``got '\\xff'``) survives the round trip into :attr:`reply`.

    What to do next: send :attr:`reply` to the client, then close its connection. The parser that
    raised this is dead; it raises the same error again on every later call.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def reply(self) -> bytes:
        """The RESP error line Redis sends before closing: ``-<message>\\r\\n``."""
        return b"-" + self.message.encode("latin-1") + b"\r\n"
