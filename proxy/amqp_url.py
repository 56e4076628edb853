"""RabbitMQ's address: AMQP URLs to settings, and secrets read from files.

``amqp[s]://[user[:password]@]host[:port][,host[:port]...][/vhost][?parameter=value&...]``:

- the scheme: ``amqp`` (port 5672) or ``amqps`` (TLS, port 5671);
- user and password URL-encoded; without ``user@`` the module's guest/guest;
- several hosts: nodes of one cluster (so are the URLs of a repeated ``--amqp``, which must then
  agree on everything but their hosts);
- the vhost URL-encoded, ``/`` as ``%2F``; no path, or ``/`` alone, is the vhost ``/`` (aiormq and
  pika read it so; RabbitMQ's URI spec would read an empty vhost);
- the query: RabbitMQ's URI parameters that mean something for a publisher with one channel:
  ``heartbeat`` (seconds), ``connection_timeout`` (milliseconds), ``channel_max`` (checked; one
  channel meets any limit), ``frame_max`` (the largest frame written; the broker's when larger),
  and with amqps ``cacertfile``, ``certfile``, ``keyfile``, ``server_name_indication``,
  ``verify`` (``verify_peer`` or ``verify_none``). Anything else is refused by name: a parameter
  that another client understands and we silently ignored would mean something else here.

yarl reads each URL (one host at a time: the host list is split here). Every parser raises
ValueError with a reason that never contains the password.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from urllib.parse import unquote

from yarl import URL

from protocol.integers import string2ll
from proxy.config import Config

__all__ = ["AMQP_FORM", "parse_amqp_urls", "read_secret"]

AMQP_FORM = "amqp[s]://[user:pass@]host[:port][,host[:port]...][/vhost][?heartbeat=...]"
PORTS = {"amqp": 5672, "amqps": 5671}
TLS_PARAMETERS = ("cacertfile", "certfile", "keyfile", "server_name_indication", "verify")
PARAMETERS = ("heartbeat", "connection_timeout", "channel_max", "frame_max", *TLS_PARAMETERS)
#: Largest password file read: a secret is short, a bigger file is the wrong one.
SECRET_MAX = 64 * 1024


def parse_amqp_urls(urls: Sequence[str]) -> dict[str, object]:
    """The :class:`~proxy.config.Config` fields that one or more URLs (the nodes of a cluster)
    give: ``amqp_host``/``amqp_port`` (the first node), ``amqp_other_nodes``, ``amqp_tls``,
    credentials, ``amqp_vhost`` and those of the query parameters."""
    if not urls:
        raise ValueError(f"expected {AMQP_FORM}")
    first, *others = (_one_url(url) for url in urls)
    nodes: list[tuple[str, int]] = []
    for parsed in (first, *others):
        node_list: list[tuple[str, int]] = parsed.pop("nodes")  # type: ignore[assignment]  # _one_url puts a list of nodes there
        if parsed != first:
            raise ValueError("the URLs of a cluster differ in more than their hosts (scheme, user, "
                             "password, vhost and parameters must be the same)")
        for node in node_list:
            if node in nodes:
                raise ValueError(f"node {node_name(node)} is given twice")
            nodes.append(node)
    (first["amqp_host"], first["amqp_port"]), other_nodes = nodes[0], nodes[1:]
    first["amqp_other_nodes"] = tuple(other_nodes)
    return first


def node_name(node: tuple[str, int]) -> str:
    host, port = node
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _one_url(text: str) -> dict[str, object]:
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in PORTS:
        raise ValueError(f"expected {AMQP_FORM}")
    end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hosts = authority.rpartition("@")
    try:
        url = URL(f"{scheme}://{userinfo}{at}host{tail}")  # the hosts are read one by one below
    except ValueError:
        raise ValueError(f"expected {AMQP_FORM}") from None
    if url.fragment:
        raise ValueError(f"expected {AMQP_FORM} (no #fragment)")
    # The vhost from the text itself: yarl would resolve "." and ".." in the path.
    vhost = tail.partition("?")[0].partition("#")[0][1:]
    if "/" in vhost:
        raise ValueError("URL-encode the vhost: %2F for /")
    defaults = Config()
    settings: dict[str, object] = {
        "nodes": [_node(scheme, host) for host in hosts.split(",")],
        "amqp_tls": scheme == "amqps",
        "amqp_user": (url.user or "") if at else defaults.amqp_user,
        "amqp_password": (url.password or "") if at else defaults.amqp_password,
        "amqp_vhost": unquote(vhost, errors="strict") if vhost else "/",
    }
    settings.update(_query(url, scheme))
    return settings


def _node(scheme: str, text: str) -> tuple[str, int]:
    try:
        url = URL(f"{scheme}://{text}")
        port = url.explicit_port
    except ValueError as exc:
        raise ValueError("expected a port from 1 to 65535" if "port" in str(exc).lower()
                         else f"expected {AMQP_FORM}") from None
    if port == 0:
        raise ValueError("expected a port from 1 to 65535")
    host = url.host
    if not host or url.raw_path not in ("", "/") or any(c.isspace() or not c.isprintable() for c in host):
        raise ValueError(f"expected {AMQP_FORM}")
    return host, port or PORTS[scheme]


def _query(url: URL, scheme: str) -> dict[str, object]:
    """The query's settings. Unknown or repeated parameters are refused (a typo must not pass)."""
    values: dict[str, object] = {}
    seen: set[str] = set()
    for name, text in url.query.items():
        if name not in PARAMETERS:
            raise ValueError(f"unknown URL parameter {name[:64]!r} (known: {', '.join(PARAMETERS)})")
        if name in seen:
            raise ValueError(f"URL parameter {name} is given twice")
        seen.add(name)
        if name in TLS_PARAMETERS and scheme != "amqps":
            raise ValueError(f"URL parameter {name} needs amqps://")
        try:
            values.update(_CONVERT[name](text))
        except ValueError as exc:
            raise ValueError(f"URL parameter {name}={text[:64]!r}: {exc}") from None
    return values


def _int(text: str, low: int, high: int, expected: str) -> int:
    value = string2ll(text)  # Redis's integer syntax, as every integer setting (proxy.settings)
    if value is None or not low <= value <= high:
        raise ValueError(expected)
    return value


def _frame_max(text: str) -> int:
    # AMQP's frame-min-size is 4096 and frame-max a 32-bit number; 0: no limit of ours.
    value = _int(text, 0, 2**32 - 1, "expected 0 or a size from 4096 bytes")
    if 0 < value < 4096:
        raise ValueError("expected 0 or a size from 4096 bytes")
    return value


def _channel_max(text: str) -> dict[str, object]:
    # The proxy opens one channel, which meets any limit: checked, nothing to keep.
    _int(text, 0, 65535, "expected a number from 0 to 65535")
    return {}


def _text(name: str) -> Callable[[str], dict[str, object]]:
    def convert(text: str) -> dict[str, object]:
        if not text or any(c.isspace() or not c.isprintable() for c in text):
            raise ValueError("expected a file path or a name")
        return {name: text}
    return convert


def _verify(text: str) -> dict[str, object]:
    if text not in ("verify_peer", "verify_none"):
        raise ValueError("expected verify_peer or verify_none")
    return {"amqp_tls_verify": text == "verify_peer"}


_CONVERT: dict[str, Callable[[str], dict[str, object]]] = {
    # AMQP carries the heartbeat as a 16-bit number of seconds (as --heartbeat).
    "heartbeat": lambda t: {"heartbeat": _int(t, 0, 65535, "expected whole seconds from 0 (off) to 65535")},
    "connection_timeout": lambda t: {
        "amqp_connect_timeout": _int(t, 1, 3_600_000, "expected milliseconds from 1 to 3600000") / 1000},
    "channel_max": _channel_max,
    "frame_max": lambda t: {"amqp_frame_max": _frame_max(t)},
    "cacertfile": _text("amqp_tls_ca"),
    "certfile": _text("amqp_tls_cert"),
    "keyfile": _text("amqp_tls_key"),
    "server_name_indication": _text("amqp_tls_server_name"),
    "verify": _verify,
}


def read_secret(path: str) -> str:
    """A password kept in a file (a container's secret): the whole file but one final newline
    (``\\n`` or ``\\r\\n``). Raises ValueError saying why it cannot be used (never its content)."""
    try:
        with open(path, "rb") as file:
            data = file.read(SECRET_MAX + 1)
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None
    if len(data) > SECRET_MAX:
        raise ValueError(f"longer than {SECRET_MAX} bytes: is it the right file?")
    data = data.removesuffix(b"\n").removesuffix(b"\r")
    if not data:
        raise ValueError("the file is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
