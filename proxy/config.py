"""The proxy's configuration: one immutable, validated object.

Built once at start from, in increasing priority: defaults, a TOML file, ``KEY_EVT_AMQP_*``
environment variables and command-line flags (see :func:`proxy.settings.load`). Admin commands
never mutate it: they build a new one with :func:`dataclasses.replace` and put it in force through
:class:`proxy.live.LiveConfig`, the one owner of the configuration while the proxy runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from urllib.parse import quote

SECONDS = 1.0

#: The module's fallback list key, kept so a drop-in replacement finds an existing backlog.
DEFAULT_FALLBACK_KEY = b"REDIS_MODULE-key_evt_amqp-fallback_storage"


@dataclass(frozen=True, slots=True)
class RedisTLS:
    """How to speak TLS to Redis (``rediss://``). Files are PEM paths; the context is built once
    from them (:func:`proxy.connect.tls_context`). ``verify`` False (``--upstream-tls-insecure``)
    accepts any certificate and name: only when asked for explicitly, with a WARNING at start."""

    ca_file: str | None = None  # None: the system's trusted CAs
    cert_file: str | None = None  # a client certificate (mutual TLS), with key_file
    key_file: str | None = None
    server_name: str | None = None  # checked against the certificate (and sent as SNI); None: the host
    verify: bool = True


@dataclass(frozen=True, slots=True)
class Sentinels:
    """Where Redis Sentinel is asked for the master named ``master`` (``redis+sentinel://``).
    ``username``/``password`` are the sentinels' own (the master's are the address's)."""

    nodes: tuple[tuple[str, int], ...]
    master: str
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str = "127.0.0.1"
    port: int = 6379
    username: str | None = None
    password: str | None = None
    db: int = 0
    unix_path: str | None = None  # set: a unix socket (host and port are unused)
    tls: RedisTLS | None = None  # set: TLS (rediss://)
    sentinel: Sentinels | None = None  # set: host and port are those of the master Sentinel names

    def at(self, node: tuple[str, int]) -> RedisAddress:
        """The same server settings (credentials, TLS) at another node of the cluster, in db 0 (a
        cluster has no other)."""
        return replace(self, host=node[0], port=node[1], db=0, unix_path=None, sentinel=None)

    def located(self, node: tuple[str, int]) -> RedisAddress:
        """The same settings (credentials, TLS, db) at ``node``: the master Sentinel named."""
        return replace(self, host=node[0], port=node[1], unix_path=None, sentinel=None)

    @property
    def name(self) -> str:
        """Which server: ``host:port`` (``[::1]:6379``), the unix socket's path, or
        ``sentinel:<master>``; for logs and gap markers."""
        if self.unix_path is not None:
            return self.unix_path
        if self.sentinel is not None:
            return f"sentinel:{self.sentinel.master}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def masked_url(self) -> str:
        """The address as a URL with the passwords replaced by ``***``: safe to log or reply."""
        auth = ""
        if self.username or self.password:
            auth = _quote(self.username or "") + (":***" if self.password else "") + "@"
        if self.unix_path is not None:
            return f"unix://{auth}{_quote(self.unix_path, '/')}?db={self.db}"
        scheme = "rediss" if self.tls is not None else "redis"
        if self.sentinel is not None:
            hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinel.nodes)
            query = ""
            if self.sentinel.username:
                query += "&sentinel_username=" + _quote(self.sentinel.username)
            if self.sentinel.password:
                query += "&sentinel_password=***"
            query = "?" + query[1:] if query else ""
            return f"{scheme}+sentinel://{auth}{hosts}/{_quote(self.sentinel.master)}/{self.db}{query}"
        return f"{scheme}://{auth}{self.name}/{self.db}"


def _quote(text: str, safe: str = "") -> str:
    return quote(text, safe=safe)


@dataclass(frozen=True, slots=True)
class Config:
    # Where clients connect, and the Redis we stand in front of.
    listen_host: str = "127.0.0.1"
    listen_port: int = 6380
    listen_unix: str | None = None  # set: clients connect to this unix socket instead (--listen unix:PATH)
    listen_perm: int = 0o660  # the unix socket's file mode
    # TLS for clients, instead of plain TCP (or on the unix socket): the proxy's certificate and
    # key, and the CAs client certificates must chain to (None: no client certificate asked for).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    upstream: RedisAddress = field(default_factory=RedisAddress)

    # RabbitMQ, with the module's defaults (its port default 5627 was a typo: 5672 is right).
    amqp_host: str = "127.0.0.1"
    amqp_port: int = 5672
    #: more nodes of the same RabbitMQ cluster (same credentials and vhost), as (host, port)
    amqp_other_nodes: tuple[tuple[str, int], ...] = ()
    amqp_user: str = "guest"
    amqp_password: str = "guest"
    amqp_vhost: str = "/"
    heartbeat: int = 30  # seconds; 0 disables heartbeats
    amqp_connect: str = "start"  # "start": connect (and check) at start; "lazy": at the first event
    amqp_connect_timeout: float = 0.0  # seconds; 0: connect_timeout (the URL's connection_timeout)
    amqp_frame_max: int = 0  # largest frame the proxy writes; 0: whatever the broker allows
    # TLS (amqps://): CA file (else the system's CAs), client certificate and key (mutual TLS), the
    # name checked in the broker's certificate (else the host), and verification (off only on request).
    amqp_tls: bool = False
    amqp_tls_ca: str = ""
    amqp_tls_cert: str = ""
    amqp_tls_key: str = ""
    amqp_tls_server_name: str = ""
    amqp_tls_verify: bool = True
    exchange: str = "amq.direct"
    routing_key: str = "redis_keyspace_events"
    delivery_mode: int = 1  # 1 non-persistent, 2 persistent
    # Routing by event and the message format (protocol/routing.py): routing_key may be a
    # template; routes are (key mask, routing key template, exchange or None: `exchange`), the
    # first match wins; prefix_separator ends {prefix}; event_format "module" (the module's body,
    # byte for byte) or "json".
    routes: tuple[tuple[bytes, str, str | None], ...] = ()
    prefix_separator: bytes = b":"
    event_format: str = "module"

    # Fallback list: > 0 keeps at most that many events (oldest dropped), 0 unlimited, < 0 off.
    fallback_size: int = 10_000_000
    fallback_key: bytes = DEFAULT_FALLBACK_KEY

    # Event selection: class letters (g $ l s h z x e t m n d, A) and key masks (module matcher).
    events: str = "xe"
    keymasks: tuple[bytes, ...] = ()

    # Publisher tuning.
    publish_window: int = 20_000  # messages in flight (and held while connecting) before spilling to the fallback list
    publish_timeout: float = 5 * SECONDS
    # Fleet: events a standby keeps per stream since the last done checkpoint (docs/fleet.md).
    standby_buffer: int = 100_000
    connect_timeout: float = 5 * SECONDS

    # Client side limits.
    max_clients: int = 10_000
    client_buffer_limit: int = 1024 * 1024  # bytes buffered per direction before pausing the peer
    shutdown_timeout: float = 5 * SECONDS

    # 1: this process serves. More: a supervisor and that many worker processes sharing the
    # listening port (proxy/workers.py). Fixed at start.
    workers: int = 1

    log_level: str = "INFO"
    log_format: str = "text"  # text or json (one object per line)
    #: where /metrics, /healthz and /readyz are served; port 0: off
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0

    #: Where each start value came from ((field, "file" | "env" | "flag"), ...; a field not
    #: named is a default), set by :func:`proxy.settings.load`: not a setting, never compared.
    start_origins: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    def start_origin(self, name: str) -> str:
        """``default``, ``file``, ``env`` or ``flag``: where the start value of ``name`` came from."""
        return dict(self.start_origins).get(name, "default")

    @property
    def amqp_nodes(self) -> tuple[tuple[str, int], ...]:
        """Every RabbitMQ node to try, the one of ``amqp_host``/``amqp_port`` first."""
        return ((self.amqp_host, self.amqp_port), *self.amqp_other_nodes)

    def amqp_masked_url(self) -> str:
        """The broker as a URL with the password replaced by ``***``: safe to log or reply.
        Several nodes are listed comma-separated; the vhost is URL-encoded (``/`` is ``%2F``)."""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.amqp_nodes)
        query = []
        if self.amqp_connect_timeout:
            query.append(f"connection_timeout={round(self.amqp_connect_timeout * 1000)}")
        if self.amqp_frame_max:
            query.append(f"frame_max={self.amqp_frame_max}")
        scheme = "amqps" if self.amqp_tls else "amqp"
        user = quote(self.amqp_user, safe="")
        vhost = quote(self.amqp_vhost, safe="")
        return f"{scheme}://{user}:***@{hosts}/{vhost}" + ("?" + "&".join(query) if query else "")

    def masked(self) -> dict[str, object]:
        """Every setting as plain values, passwords replaced by ``***``: for logs and replies."""
        values: dict[str, object] = {}
        for name in self.__dataclass_fields__:
            if name == "start_origins":
                continue
            value = getattr(self, name)
            if name == "amqp_password":
                value = "***"
            elif name == "upstream":
                value = value.masked_url()
            elif name == "amqp_other_nodes":
                value = [f"{host}:{port}" for host, port in value]
            elif name == "keymasks":
                value = [m.decode("utf-8", "backslashreplace") for m in value]
            elif name == "routes":
                value = [route_text(route) for route in value]
            elif isinstance(value, bytes):
                value = value.decode("utf-8", "backslashreplace")
            values[name] = value
        return values


def route_text(route: tuple[bytes, str, str | None]) -> str:
    """One route as ``route_add`` takes it: ``MASK ROUTING_KEY [EXCHANGE]`` (the mask's bytes
    that are not UTF-8 as ``\\xHH``)."""
    mask, routing_key, exchange = route
    text = f"{mask.decode('utf-8', 'backslashreplace')} {routing_key}"
    if exchange is None:
        return text
    return f"{text} {exchange}" if exchange else text + " ''"  # '': the default exchange
