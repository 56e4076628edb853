"""The proxy's configuration: one immutable, validated object.

Built once at start from, in increasing priority: defaults, a TOML file, ``KEY_EVT_AMQP_*``
environment variables and command-line flags (see :func:`proxy.settings.load`). Admin commands
never mutate it: they build a new one with :func:`dataclasses.replace` and put it in force through
:class:`proxy.live.LiveConfig`, the one owner of the configuration while the proxy runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

SECONDS = 1.0

#: The module's fallback list key, kept so a drop-in replacement finds an existing backlog.
DEFAULT_FALLBACK_KEY = b"REDIS_MODULE-key_evt_amqp-fallback_storage"


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str = "127.0.0.1"
    port: int = 6379
    username: str | None = None
    password: str | None = None
    db: int = 0

    def at(self, node: tuple[str, int]) -> RedisAddress:
        """The same server settings (credentials) at another node of the cluster, in db 0 (a
        cluster has no other)."""
        return replace(self, host=node[0], port=node[1], db=0)

    def masked_url(self) -> str:
        """The address as a URL with the password replaced by ``***``: safe to log or reply."""
        auth = ""
        if self.username or self.password:
            auth = (self.username or "") + (":***" if self.password else "") + "@"
        return f"redis://{auth}{self.host}:{self.port}/{self.db}"


@dataclass(frozen=True, slots=True)
class Config:
    # Where clients connect, and the Redis we stand in front of.
    listen_host: str = "127.0.0.1"
    listen_port: int = 6380
    upstream: RedisAddress = field(default_factory=RedisAddress)

    # RabbitMQ, with the module's defaults (its port default 5627 was a typo: 5672 is right).
    amqp_host: str = "127.0.0.1"
    amqp_port: int = 5672
    amqp_user: str = "guest"
    amqp_password: str = "guest"
    amqp_vhost: str = "/"
    heartbeat: int = 30  # seconds; 0 disables heartbeats
    exchange: str = "amq.direct"
    routing_key: str = "redis_keyspace_events"
    delivery_mode: int = 1  # 1 non-persistent, 2 persistent

    # Fallback list: > 0 keeps at most that many events (oldest dropped), 0 unlimited, < 0 off.
    fallback_size: int = 10_000_000
    fallback_key: bytes = DEFAULT_FALLBACK_KEY

    # Event selection: class letters (g $ l s h z x e t m n d, A) and key masks (module matcher).
    events: str = "xe"
    keymasks: tuple[bytes, ...] = ()

    # Publisher tuning.
    publish_window: int = 20_000  # messages in flight (and held while connecting) before spilling to the fallback list
    publish_timeout: float = 5 * SECONDS
    connect_timeout: float = 5 * SECONDS

    # Client side limits.
    max_clients: int = 10_000
    client_buffer_limit: int = 1024 * 1024  # bytes buffered per direction before pausing the peer
    shutdown_timeout: float = 5 * SECONDS

    log_level: str = "INFO"
    log_format: str = "text"  # text or json (one object per line)
    #: where /metrics, /healthz and /readyz are served; port 0: off
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0

    def masked(self) -> dict[str, object]:
        """Every setting as plain values, passwords replaced by ``***``: for logs and replies."""
        values: dict[str, object] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "amqp_password":
                value = "***"
            elif name == "upstream":
                value = value.masked_url()
            elif name == "keymasks":
                value = [m.decode("utf-8", "backslashreplace") for m in value]
            elif isinstance(value, bytes):
                value = value.decode("utf-8", "backslashreplace")
            values[name] = value
        return values
