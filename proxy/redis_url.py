"""``--upstream``: a standard Redis URL -> :class:`~proxy.config.RedisAddress`.

The forms (parsed with yarl; every part may be URL-encoded, ``%40`` for ``@``)::

    redis://[user:pass@]host[:port][/db][?params]           TCP, port 6379 by default
    rediss://[user:pass@]host[:port][/db][?params]          TLS (options: --upstream-tls-*)
    unix://[user:pass@]/path/redis.sock[?params]            a unix socket (redis-py's form;
    redis+unix:///path/redis.sock[?params]                  the same, by another name)
    redis+sentinel://[user:pass@]s1[:26379],s2[:26379]/mymaster[/db][?params]
    rediss+sentinel://...                                    Sentinel, TLS to sentinels and master

Parameters: ``db``, ``username``, ``password`` (redis-py's; they win over the same value in the
path or user info, as in redis-py), and for Sentinel ``sentinel_username`` and
``sentinel_password`` (the sentinels' own login, go-redis's names). The user info of a Sentinel URL
is the *master's* login, as for every other form. Anything else is refused, by name.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import yarl

from protocol.integers import string2ll
from proxy.config import RedisAddress, RedisTLS, Sentinels

__all__ = ["FORMS", "parse_redis_url", "redact_redis_url"]

FORMS = ("redis://[user:pass@]host:port[/db], rediss://..., unix:///path.sock[?db=N], "
         "redis+sentinel://[user:pass@]host:port,host:port/master[/db]")
_SENTINEL_PORT = 26379
_PARAMS = frozenset({"db", "username", "password"})
_SENTINEL_PARAMS = _PARAMS | {"sentinel_username", "sentinel_password"}


def parse_redis_url(text: str) -> RedisAddress:
    """The address ``text`` names; raises ValueError(reason) (the reason never quotes a password)."""
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"expected a URL: {FORMS}")
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return _sentinel(scheme, rest)
    try:
        url = yarl.URL(text)
    except ValueError as exc:
        raise ValueError(_reason(exc)) from None
    if url.fragment:
        raise ValueError("a URL fragment (#...) means nothing here")
    if scheme in ("unix", "redis+unix"):
        if url.host or url.explicit_port is not None:
            raise ValueError("expected unix:///path/to/redis.sock (three slashes: no host)")
        if not url.path or url.path == "/":
            raise ValueError("expected unix:///path/to/redis.sock: the path is missing")
        params = _params(url, _PARAMS)
        return _credentials(RedisAddress(unix_path=url.path), url, params, path_db=None)
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"unknown scheme {scheme + '://'!r}: expected {FORMS}")
    if not url.host:
        raise ValueError(f"expected {scheme}://host:port: the host is missing")
    port = _port(url)
    params = _params(url, _PARAMS)
    address = RedisAddress(host=url.host, port=port or 6379, tls=RedisTLS() if scheme == "rediss" else None)
    return _credentials(address, url, params, path_db=url.path)


def _reason(exc: ValueError) -> str:
    text = str(exc)
    if "port" in text.lower():
        return "expected a port from 1 to 65535"
    return "not a valid URL"  # yarl's own text may quote the URL, password included


def _port(url: yarl.URL) -> int | None:
    try:
        port = url.explicit_port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("expected a port from 1 to 65535")
    return port


def _params(url: yarl.URL, known: frozenset[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in url.query.items():
        if key not in known:
            raise ValueError(f"unknown URL parameter {key!r} (known: {', '.join(sorted(known))})")
        if key in params:
            raise ValueError(f"URL parameter {key!r} given twice")
        params[key] = value
    return params


def _db(text: str) -> int:
    db = string2ll(text)
    if db is None or db < 0:
        raise ValueError("expected db a number >= 0")
    return db


def _credentials(address: RedisAddress, url: yarl.URL, params: dict[str, str],
                 path_db: str | None) -> RedisAddress:
    """Fill in user, password and db from the user info, the path and the parameters."""
    db = 0
    if path_db not in (None, "", "/"):
        assert path_db is not None
        if "/" in path_db[1:]:
            raise ValueError("expected /db after the host, nothing more")
        db = _db(path_db[1:])
    if "db" in params:
        db = _db(params["db"])
    username = url.user or None
    password = url.password if url.password is not None and url.raw_password != "" else None
    if "username" in params:
        username = params["username"] or None
    if "password" in params:
        password = params["password"]
    return RedisAddress(host=address.host, port=address.port, username=username, password=password,
                        db=db, unix_path=address.unix_path, tls=address.tls, sentinel=address.sentinel)


def _sentinel(scheme: str, rest: str) -> RedisAddress:
    """``redis+sentinel://[user:pass@]h1:p1,h2:p2/master[/db][?params]``: yarl reads one host, so
    the host list is cut out first and the rest parsed around a stand-in host."""
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hosts = authority.rpartition("@")
    nodes = tuple(_sentinel_node(h) for h in hosts.split(","))
    try:
        url = yarl.URL(f"redis://{userinfo}{at}sentinel{tail}")
    except ValueError as exc:
        raise ValueError(_reason(exc)) from None
    if url.fragment:
        raise ValueError("a URL fragment (#...) means nothing here")
    parts = url.path.split("/")  # "", master, [db]
    if len(parts) < 2 or not parts[1] or len(parts) > 3:
        raise ValueError(f"expected {scheme}://host:port,host:port/master[/db]: the master's name is missing")
    params = _params(url, _SENTINEL_PARAMS)
    sentinels = Sentinels(nodes=nodes, master=parts[1],
                          username=params.pop("sentinel_username", None) or None,
                          password=params.pop("sentinel_password", None))
    address = RedisAddress(host=nodes[0][0], port=nodes[0][1], sentinel=sentinels,
                           tls=RedisTLS() if scheme == "rediss+sentinel" else None)
    return _credentials(address, url, params, path_db="/" + parts[2] if len(parts) == 3 else None)


def _sentinel_node(text: str) -> tuple[str, int]:
    text = unquote(text)
    if text.startswith("["):
        host, _, port_text = text[1:].partition("]")
        port_text = port_text[1:] if port_text.startswith(":") else port_text
    else:
        host, _, port_text = text.partition(":")
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise ValueError("expected sentinels as host:port,host:port")
    port = string2ll(port_text) if port_text else _SENTINEL_PORT
    if port is None or not 1 <= port <= 65535:
        raise ValueError("expected a port from 1 to 65535")
    return host, port


_SECRET_PARAM = re.compile(r"([?&](?:sentinel_)?password=)[^&#]*", re.IGNORECASE)


def redact_redis_url(text: str) -> str:
    """``text`` with every password in it (user info, ``password=``, ``sentinel_password=``)
    replaced by ``***``: for quoting a bad ``--upstream`` back."""
    text = _SECRET_PARAM.sub(r"\1***", text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    userinfo, at, hosts = rest[:end].rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{userinfo}{at}{hosts}{rest[end:]}"
