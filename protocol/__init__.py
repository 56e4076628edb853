"""RESP bytes in, values out: the only code that knows what the wire looks like. No I/O here."""

from protocol.errors import NEED_DATA, ProtocolError
from protocol.requests import Request, RequestParser

__all__ = ["NEED_DATA", "ProtocolError", "Request", "RequestParser"]
