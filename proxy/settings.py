"""Build the :class:`~proxy.config.Config` from flags, environment, a TOML file and module args.

Sources, lowest priority first; each setting is taken whole from the highest source that has it:

1. the defaults in :class:`~proxy.config.Config`;
2. the TOML file named by ``--config`` (or ``KEY_EVT_AMQP_CONFIG``), keys = long flag names with
   underscores or dashes (``routing_key = "rk"``, ``delivery-mode = 2``, ``keymask = ["^user:",
   "^order:"]``); an unknown key is an error;
3. environment variables ``KEY_EVT_AMQP_<FLAG>`` (``KEY_EVT_AMQP_ROUTING_KEY``); the key masks in
   ``KEY_EVT_AMQP_KEYMASK`` are comma-separated, and an empty value means no mask; an unknown
   ``KEY_EVT_AMQP_*`` variable is an error naming it;
4. command-line flags;
5. last, the module's positional list from ``--module-args`` (from whichever source gave it): a
   migrated ``loadmodule`` line keeps meaning what it meant, so its positions override the same
   settings from every other source. Positions it does not reach keep the result of 1-4.

Every value is validated; a bad one raises :class:`ConfigError`, whose text is one line naming the
setting and the value (passwords replaced by ``***``). :func:`apply_module_args` is also what the
``key_evt_amqp.config_set`` and ``key_evt_amqp.connect`` commands use: it validates every position
before changing anything, so a bad argument leaves the configuration as it was.
"""

from __future__ import annotations

from typing import NoReturn, cast

import argparse
import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence

from protocol.events import CLASS_LETTERS, parse_classes
from protocol.integers import LLONG_MAX, LLONG_MIN, string2ll
from protocol.keymask import normalize_masks
from protocol.routing import FORMATS, check_template
from protocol.requests import UnbalancedQuotes, split_args
from proxy.amqp_tls import client_context
from proxy.amqp_url import parse_amqp_urls, read_secret
from proxy.config import Config, RedisAddress, RedisTLS
from proxy.connect import server_tls_context, tls_context
from proxy.errors import ConfigError
from proxy.redis_url import FORMS, parse_redis_url, redact_redis_url

__all__ = [
    "COMMAND_SETTINGS",
    "ENV_PREFIX",
    "ConfigError",
    "add_arguments",
    "apply_module_args",
    "load",
    "module_arg_fields",
    "parse_setting",
    "split_module_args",
]

ENV_PREFIX = "KEY_EVT_AMQP_"

#: Longest piece of a bad value quoted back in an error (a client can send megabytes).
_SHOWN_MAX = 64


# -- value parsers: text -> value, or ValueError(reason) ------------------------------------------

_FLOAT = re.compile(r"[0-9]{1,12}(\.[0-9]*)?|\.[0-9]+")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _int(text: str, low: int, high: int, expected: str) -> int:
    # Redis's own syntax for every integer (protocol.integers), then the setting's range.
    value = string2ll(text)
    if value is None or not low <= value <= high:
        raise ValueError(expected)
    return value


def _port(text: str) -> int:
    return _int(text, 1, 65535, "expected a port from 1 to 65535")


def _heartbeat(text: str) -> int:
    # AMQP carries the heartbeat as a 16-bit number of seconds.
    return _int(text, 0, 65535, "expected whole seconds from 0 (off) to 65535")


def _delivery_mode(text: str) -> int:
    return _int(text, 1, 2, "expected 1 or 2")


def _fallback_size(text: str) -> int:
    return _int(text, LLONG_MIN, LLONG_MAX, "expected an integer (> 0 cap, 0 unlimited, < 0 off)")


def _positive_int(text: str) -> int:
    return _int(text, 1, LLONG_MAX, "expected an integer >= 1")


#: Most worker processes ``--workers`` starts (a security limit: a typo must not fork thousands).
WORKERS_MAX = 1024


def _workers(text: str) -> int:
    if text == "auto":
        return len(os.sched_getaffinity(0))  # the cores this process may run on, not all there are
    return _int(text, 1, WORKERS_MAX, f"expected a number of processes from 1 to {WORKERS_MAX}, or auto")


def _seconds(text: str) -> float:
    if not _FLOAT.fullmatch(text) or not 0 < float(text) < math.inf:
        raise ValueError("expected a number of seconds > 0")
    return float(text)


def _host(text: str) -> str:
    if not text or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError("expected a host name or address")
    return text


def _short_string(text: str) -> str:
    # AMQP short strings (exchange, routing key) hold at most 255 bytes.
    if len(text.encode()) > 255:
        raise ValueError("longer than 255 bytes")
    return text


def _format(text: str) -> str:
    if text not in FORMATS:
        raise ValueError("expected module or json")
    return text


def _events(text: str) -> str:
    parse_classes(text)
    return text


def _log_level(text: str) -> str:
    if text.upper() not in _LOG_LEVELS:
        raise ValueError("expected one of " + ", ".join(_LOG_LEVELS))
    return text.upper()


def _log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError("expected text or json")
    return text


def _metrics_listen(text: str) -> dict[str, object]:
    """``HOST:PORT`` or ``PORT`` (on 127.0.0.1: secure by default); ``""`` or ``off``: off."""
    if text in ("", "off"):
        return {"metrics_port": 0}
    if text.isdigit():
        return {"metrics_host": "127.0.0.1", "metrics_port": _port(text)}
    address = _listen(text)
    return {"metrics_host": address["listen_host"], "metrics_port": address["listen_port"]}


def _key_bytes(text: str) -> bytes:
    # surrogateescape: argv and environ bytes that are not UTF-8 come back exactly as given.
    return text.encode("utf-8", "surrogateescape")


def _listen(text: str) -> dict[str, object]:
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/") or "\0" in path:
            raise ValueError("expected unix:/absolute/path.sock")
        if len(path.encode()) > 107:  # sun_path holds 108 bytes with the terminating NUL
            raise ValueError("a unix socket path holds at most 107 bytes")
        return {"listen_unix": path}
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError("put an IPv6 address in brackets: [::1]:6380")
    if not sep or not host:
        raise ValueError("expected HOST:PORT")
    return {"listen_host": _host(host), "listen_port": _port(port)}


def _upstream(text: str) -> dict[str, object]:
    return {"upstream": parse_redis_url(text)}


def _secret_file(text: str) -> str:
    """The first line of the file at ``text`` (a password: the trailing newline is not part of
    it); ValueError names why it cannot be read, never the content."""
    try:
        with open(text, "rb") as file:
            data = file.read(64 * 1024 + 1)
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None
    if len(data) > 64 * 1024:
        raise ValueError("larger than 64 KiB: not a password file")
    line = data.split(b"\n", 1)[0].removesuffix(b"\r")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None


def _pem_file(text: str) -> str:
    if not text:
        raise ValueError("expected a file name")
    try:
        with open(text, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None
    return text


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


#: Settings that are parts of ``upstream`` (folded into its RedisAddress by _fold_upstream).
_UPSTREAM_PARTS = ("upstream_password_file", "upstream_tls_ca", "upstream_tls_cert", "upstream_tls_key",
                   "upstream_tls_server_name", "upstream_tls_insecure")


def _fold_upstream(changes: dict[str, object]) -> None:
    """Put the password file and the TLS options into the upstream's address (in ``changes``)."""
    parts = {name: changes.pop(name) for name in _UPSTREAM_PARTS if name in changes}
    if not parts:
        return
    address = cast(RedisAddress, changes.get("upstream", RedisAddress()))
    if "upstream_password_file" in parts:
        if address.password is not None:
            raise ConfigError("the upstream password is given twice: in the URL and in "
                              "--upstream-password-file (give it once)")
        address = dataclasses.replace(address, password=cast(str, parts.pop("upstream_password_file")))
    if parts:
        if address.tls is None:
            raise ConfigError("--upstream-tls-* options need a TLS upstream: rediss://... "
                              "(or rediss+sentinel://...)")
        tls = RedisTLS(
            ca_file=cast("str | None", parts.get("upstream_tls_ca")),
            cert_file=cast("str | None", parts.get("upstream_tls_cert")),
            key_file=cast("str | None", parts.get("upstream_tls_key")),
            server_name=cast("str | None", parts.get("upstream_tls_server_name")),
            verify=not parts.get("upstream_tls_insecure", False),
        )
        if (tls.cert_file is None) != (tls.key_file is None):
            raise ConfigError("--upstream-tls-cert and --upstream-tls-key go together (mutual TLS)")
        address = dataclasses.replace(address, tls=tls)
    if address.tls is not None:
        try:
            tls_context(address.tls)  # fails here, at start, on a bad file: not at the first client
        except ValueError as exc:
            raise ConfigError(f"upstream TLS: {exc}") from None
    changes["upstream"] = address


def _amqp(raw: str | list[str]) -> dict[str, object]:
    return parse_amqp_urls([raw] if isinstance(raw, str) else raw)


def _on_off(text: str) -> bool:
    if text.lower() not in ("on", "off"):
        raise ValueError("expected on or off")
    return text.lower() == "on"


def _connect_mode(text: str) -> str:
    if text not in ("start", "lazy"):
        raise ValueError("expected start or lazy")
    return text


def _path(text: str) -> str:
    if not text:
        raise ValueError("expected a file path")
    return text


def _redact_url(text: str) -> str:
    scheme, sep, rest = text.rpartition("://")
    userinfo, at, hostpart = (rest if sep else text).rpartition("@")
    if not at or ":" not in userinfo:
        return text
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hostpart}"


def _perm(text: str) -> int:
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ValueError("expected an octal file mode such as 660")
    return int(text, 8)


def _check_listen_tls(changes: dict[str, object]) -> None:
    cert, key, ca = (changes.get(n) for n in ("tls_cert", "tls_key", "tls_ca"))
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if ca is not None and cert is None:
        raise ConfigError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    if cert is not None:
        try:
            server_tls_context(cast(str, cert), cast(str, key), cast("str | None", ca))
        except ValueError as exc:
            raise ConfigError(f"client TLS: {exc}") from None


def _show_listen(c: Config) -> str:
    if c.listen_unix is not None:
        return f"unix:{c.listen_unix}"
    host = f"[{c.listen_host}]" if ":" in c.listen_host else c.listen_host
    return f"{host}:{c.listen_port}"


# -- the option table ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Option:
    flag: str
    metavar: str
    help: str
    convert: Callable[[str], dict[str, object]] | None  # None: handled by load() itself
    show: Callable[[Config], str]  # the default, for --help
    redact: Callable[[str], str] | None = str  # how a bad value is quoted; None: not at all
    boolean: bool = False  # a flag without a value (on: given); true/false in the file or environment

    @property
    def name(self) -> str:
        return self.flag.replace("-", "_")


def _redact_urls(raw: str | list[str]) -> str:
    return _redact_url(raw) if isinstance(raw, str) else ", ".join(_redact_url(url) for url in raw)


def _field(name: str, parse: Callable[[str], object]) -> Callable[[str], dict[str, object]]:
    return lambda text: {name: parse(text)}


def _shown(name: str) -> Callable[[Config], str]:
    return lambda c: str(getattr(c, name))


_OPTIONS = {
    o.name: o
    for o in (
        _Option("config", "PATH", "TOML file with these settings (keys: flag names with _)",
                None, lambda c: "none"),
        _Option("listen", "HOST:PORT", "where clients connect ([::1]:6380 for IPv6, unix:/path.sock "
                "for a unix socket)", _listen, _show_listen),
        _Option("listen-perm", "OCTAL", "file mode of the unix socket of --listen unix:...",
                _field("listen_perm", _perm), lambda c: f"{c.listen_perm:o}"),
        _Option("tls-cert", "PEM", "the proxy's certificate: clients must then speak TLS (on --listen, "
                "instead of plain TCP)", _field("tls_cert", _pem_file), lambda c: "none: plain TCP"),
        _Option("tls-key", "PEM", "its private key", _field("tls_key", _pem_file), lambda c: "none"),
        _Option("tls-ca", "PEM", "require client certificates that chain to these CAs",
                _field("tls_ca", _pem_file), lambda c: "none: no client certificate asked for"),
        _Option("upstream", "URL", f"the Redis behind the proxy: {FORMS}",
                _upstream, lambda c: c.upstream.masked_url(), redact_redis_url),
        _Option("upstream-password-file", "PATH", "read the upstream's password from this file "
                "(its first line) instead of the URL", _field("upstream_password_file", _secret_file),
                lambda c: "none"),
        _Option("upstream-tls-ca", "PEM", "CA certificates the upstream's certificate must chain to",
                _field("upstream_tls_ca", _pem_file), lambda c: "the system's"),
        _Option("upstream-tls-cert", "PEM", "client certificate for the upstream (mutual TLS)",
                _field("upstream_tls_cert", _pem_file), lambda c: "none"),
        _Option("upstream-tls-key", "PEM", "its private key", _field("upstream_tls_key", _pem_file),
                lambda c: "none"),
        _Option("upstream-tls-server-name", "NAME", "name the upstream's certificate must carry",
                _field("upstream_tls_server_name", _host), lambda c: "the URL's host"),
        _Option("upstream-tls-insecure", "", "do not verify the upstream's certificate (testing only)",
                _field("upstream_tls_insecure", _boolean), lambda c: "off", boolean=True),
        _Option("amqp", "URL", "RabbitMQ: amqp[s]://user:pass@host:port/vhost (vhost URL-encoded; "
                "?heartbeat= connection_timeout= channel_max= frame_max=); a cluster: repeat the flag "
                "or list the hosts (h1:5672,h2:5672)",
                _amqp, lambda c: c.amqp_masked_url(), _redact_urls),
        _Option("amqp-password-file", "PATH", "the AMQP password is this file's content (one final "
                "newline dropped), in place of the URL's; read once at start",
                None, lambda c: "none"),
        _Option("amqp-connect", "start|lazy", "start: connect to RabbitMQ at start and check the "
                "exchange; lazy: at the first event, as the module",
                _field("amqp_connect", _connect_mode), _shown("amqp_connect")),
        _Option("amqp-tls-ca", "PATH", "amqps: CA certificates (PEM) the broker's certificate must "
                "chain to", _field("amqp_tls_ca", _path), lambda c: "the system's"),
        _Option("amqp-tls-cert", "PATH", "amqps: client certificate (PEM) for mutual TLS",
                _field("amqp_tls_cert", _path), lambda c: "none"),
        _Option("amqp-tls-key", "PATH", "amqps: the client certificate's private key (PEM)",
                _field("amqp_tls_key", _path), lambda c: "in the certificate file"),
        _Option("amqp-tls-server-name", "NAME", "amqps: the name the broker's certificate must "
                "carry (and SNI)", _field("amqp_tls_server_name", _host), lambda c: "the host"),
        _Option("amqp-tls-verify", "on|off", "amqps: off accepts any certificate (insecure: a "
                "WARNING at start)", _field("amqp_tls_verify", _on_off), lambda c: "on"),
        _Option("heartbeat", "SECONDS", "AMQP heartbeat, 0 to disable",
                _field("heartbeat", _heartbeat), _shown("heartbeat")),
        _Option("exchange", "NAME", "exchange events are published to (never declared)",
                _field("exchange", _short_string), _shown("exchange")),
        _Option("routing-key", "KEY", "routing key of every message, or a template with {db} "
                "{event} {class} {key} {prefix} (escaped, cut to 255 bytes: README)",
                _field("routing_key", check_template), _shown("routing_key")),
        _Option("route", "'MASK KEY [EXCHANGE]'", "keys matching MASK get this routing key "
                "(template) and exchange; repeat the flag for more; the first match wins",
                None, lambda c: "none"),
        _Option("prefix-separator", "SEP", "where {prefix} ends in a key",
                _field("prefix_separator", lambda t: _nonempty(_key_bytes(t))), lambda c: ":"),
        _Option("format", "module|json", "message body: module (the module's, byte for byte) or "
                "json (application/json, docs/event.schema.json)",
                _field("event_format", _format), _shown("event_format")),
        _Option("delivery-mode", "1|2", "1 non-persistent, 2 persistent",
                _field("delivery_mode", _delivery_mode), _shown("delivery_mode")),
        _Option("fallback-size", "N", "fallback list size: > 0 cap (oldest dropped), 0 unlimited, "
                "< 0 off", _field("fallback_size", _fallback_size), _shown("fallback_size")),
        _Option("fallback-key", "KEY", "Redis list holding events while RabbitMQ is away",
                _field("fallback_key", lambda t: _nonempty(_key_bytes(t))),
                lambda c: c.fallback_key.decode("utf-8", "backslashreplace")),
        _Option("events", "LETTERS",
                f"event classes, from {CLASS_LETTERS} and A (= g$lshztxed); '' for none",
                _field("events", _events), _shown("events")),
        _Option("keymask", "MASK", "forward keys matching MASK (^ . * $ as in the module; repeat "
                "the flag for more; ALL for every key)", None, lambda c: "none: nothing forwarded"),
        _Option("module-args", "STRING", "the module's load arguments: [FLAGS] HOST PORT USER PASS "
                "HEARTBEAT EXCHANGE ROUTING_KEY DELIVERY_MODE FALLBACK_SIZE [MASK ...]; "
                "applied last",
                None, lambda c: "none", None),
        _Option("publish-window", "N", "messages in flight before events spill to the fallback",
                _field("publish_window", _positive_int), _shown("publish_window")),
        _Option("standby-buffer", "N", "events a standby instance keeps per stream for a takeover "
                "(past it the oldest are dropped; a takeover then starts with a gap marker)",
                _field("standby_buffer", _positive_int), _shown("standby_buffer")),
        _Option("publish-timeout", "SECONDS", "wait for a publisher confirm before giving up",
                _field("publish_timeout", _seconds), _shown("publish_timeout")),
        _Option("connect-timeout", "SECONDS", "connecting to Redis or RabbitMQ",
                _field("connect_timeout", _seconds), _shown("connect_timeout")),
        _Option("max-clients", "N", "client connections accepted at once",
                _field("max_clients", _positive_int), _shown("max_clients")),
        _Option("client-buffer-limit", "BYTES", "bytes buffered per direction before pausing",
                _field("client_buffer_limit", _positive_int), _shown("client_buffer_limit")),
        _Option("shutdown-timeout", "SECONDS", "grace period for clients and in-flight messages",
                _field("shutdown_timeout", _seconds), _shown("shutdown_timeout")),
        _Option("workers", "N|auto", "processes serving clients on the same port, under a supervisor "
                "that restarts them (auto: one per usable core)",
                _field("workers", _workers), _shown("workers")),
        _Option("log-level", "LEVEL", "one of " + ", ".join(_LOG_LEVELS),
                _field("log_level", _log_level), _shown("log_level")),
        _Option("log-format", "text|json", "text lines, or one JSON object per line",
                _field("log_format", _log_format), _shown("log_format")),
        _Option("metrics-listen", "[HOST:]PORT", "serve /metrics, /healthz and /readyz over HTTP "
                "(a port alone: on 127.0.0.1)", _metrics_listen,
                lambda c: f"{c.metrics_host}:{c.metrics_port}" if c.metrics_port else "off"),
    )
}


def _nonempty(value: bytes) -> bytes:
    if not value:
        raise ValueError("expected a non-empty key")
    return value


HELP_EPILOG = (
    f"Every flag can also be set in the environment as {ENV_PREFIX}<FLAG> "
    f"({ENV_PREFIX}ROUTING_KEY; {ENV_PREFIX}KEYMASK is comma-separated) or in the --config file. "
    "Priority: defaults < file < environment < flags < --module-args."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every setting's flag to ``parser``; each help line shows the default."""
    defaults = Config()
    for option in _OPTIONS.values():
        text = f"{option.help} (default: {option.show(defaults)})".replace("%", "%%")
        if option.boolean:
            parser.add_argument("--" + option.flag, dest=option.name, help=text, default=argparse.SUPPRESS,
                                action="store_const", const="true")
            continue
        parser.add_argument(
            "--" + option.flag,
            dest=option.name,
            metavar=option.metavar,
            help=text,
            default=argparse.SUPPRESS,
            action="append" if option.name in _REPEATED else "store",
        )


#: Flags that may be given more than once (a list in the TOML file).
_REPEATED = ("keymask", "amqp", "route")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


# -- sources ---------------------------------------------------------------------------------------

# A source entry: setting name -> ((message prefix, how the setting is named), raw value).
_Entry = tuple[tuple[str, str], object]


def load(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Build and validate the configuration from ``serve``'s flags, ``environ`` and the files."""
    parser = _Parser(prog="key-evt-amqp serve", add_help=False)
    add_arguments(parser)
    given = vars(parser.parse_args(list(argv)))
    layers: dict[str, _Entry] = {}
    ranks: dict[str, int] = {}  # the source each setting comes from: 0 file, 1 environment, 2 flags
    path = given.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    sources = [_from_file(path) if path else {}, _from_environ(environ),
               {name: (("", "--" + _OPTIONS[name].flag), v) for name, v in given.items()}]
    for rank, source in enumerate(sources):
        layers.update(source)
        ranks.update(dict.fromkeys(source, rank))
    return _build(layers, ranks)


def _from_environ(environ: Mapping[str, str]) -> dict[str, _Entry]:
    known = {ENV_PREFIX + name.upper() for name in _OPTIONS}
    unknown = sorted(v for v in environ if v.startswith(ENV_PREFIX) and v not in known)
    if unknown:  # a typo must not silently leave a setting at its default
        raise ConfigError(f"unknown environment variable {unknown[0]} (settings are {ENV_PREFIX}<FLAG>, "
                          f"e.g. {ENV_PREFIX}ROUTING_KEY)")
    entries: dict[str, _Entry] = {}
    for name in _OPTIONS:
        variable = ENV_PREFIX + name.upper()
        if name != "config" and variable in environ:
            text = environ[variable]
            value: object = (text.split(",") if text else []) if name == "keymask" else text
            if name == "route":  # routes hold blanks and commas: one per line
                value = [line for line in text.splitlines() if line.strip()]
            entries[name] = (("", variable), value)
    return entries


def _from_file(path: str) -> dict[str, _Entry]:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid config file {path!r}: {exc}") from None
    entries: dict[str, _Entry] = {}
    for given, value in data.items():
        key = given.replace("-", "_")  # delivery-mode and delivery_mode alike
        if key not in _OPTIONS or key == "config":
            raise ConfigError(f"{path}: unknown setting {given!r}")
        if key in entries:
            raise ConfigError(f"{path}: {given!r} given twice (- and _ name the same setting)")
        label = (f"{path}: ", key)
        if key in (*_REPEATED, "module_args") and isinstance(value, list):
            if not all(isinstance(item, str) for item in value):
                raise ConfigError(f"{path}: invalid {key}: expected strings")
        elif isinstance(value, bool) and _OPTIONS[key].boolean:
            value = str(value)
        elif isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{path}: invalid {key}: expected a string or a number")
        elif key in ("keymask", "route"):
            value = [value]
        else:
            value = str(value)
        entries[key] = (label, value)
    return entries


def _source(prefix: str, label: str) -> str:
    """Where an entry came from, for ``config_get``'s origins: a file's entries carry its path as
    their message prefix, a flag's label is ``--flag``, an environment variable's its name."""
    if prefix:
        return "file"
    return "flag" if label.startswith("--") else "env"


def _build(layers: Mapping[str, _Entry], ranks: Mapping[str, int]) -> Config:
    changes: dict[str, object] = {}
    origins: dict[str, str] = {}  # Config field -> source; a field not named here is a default
    # Lowest source first, so that a higher one wins where two settings overlap (the URL's
    # ?heartbeat= and --heartbeat); within one source the URL first, the single setting after it.
    for name in sorted(layers, key=lambda n: (ranks[n], n != "amqp")):
        (prefix, label), raw = layers[name]
        option = _OPTIONS[name]
        if name == "keymask":
            masks = raw  # a list of str, whatever the source
            changes["keymasks"] = normalize_masks(_key_bytes(m) for m in masks)  # type: ignore  # the TOML/env value was checked to be a list of strings
            origins["keymasks"] = _source(prefix, label)
        elif name == "route":
            try:
                changes["routes"] = tuple(parse_route(split_module_args(r)) for r in raw)  # type: ignore[attr-defined]  # a list of str, whatever the source
            except ValueError as exc:
                raise ConfigError(f"{prefix}invalid {label}: {exc}") from None
            origins["routes"] = _source(prefix, label)
        elif option.convert is not None:
            try:
                converted = option.convert(raw)  # type: ignore[arg-type]  # option tables map names to converters of mixed value types
            except ValueError as exc:
                shown = " " + _quote(option.redact(raw)) if option.redact else ""  # type: ignore  # redact takes the raw value, whatever its type
                raise ConfigError(f"{prefix}invalid {label}{shown}: {exc}") from None
            changes.update(converted)
            origins.update(dict.fromkeys(converted, _source(prefix, label)))
    _fold_upstream(changes)
    _check_listen_tls(changes)
    if "amqp_password_file" in layers:
        # A password file, from any source, is the password: the URL can then stay without one.
        (prefix, label), raw = layers["amqp_password_file"]
        try:
            changes["amqp_password"] = read_secret(_path(str(raw)))
        except ValueError as exc:
            raise ConfigError(f"{prefix}invalid {label} {_quote(str(raw))}: {exc}") from None
        origins["amqp_password"] = _source(prefix, label)
    config = Config(**changes)  # type: ignore[arg-type]  # field values of mixed types; Config's __post_init__ validates them
    _check_amqp_tls(config)
    if "module_args" in layers:
        (prefix, label), raw = layers["module_args"]
        try:
            # TOML gives a list of strings here (a string otherwise): _check_types made sure.
            args = split_module_args(raw) if isinstance(raw, str) else [_key_bytes(a) for a in cast("list[str]", raw)]
            config = apply_module_args(config, args, with_flags=True)
        except ConfigError as exc:
            raise ConfigError(f"{prefix}invalid {label}: {exc}") from None
        origins.update(dict.fromkeys(module_arg_fields(args, with_flags=True), _source(prefix, label)))
    return dataclasses.replace(config, start_origins=tuple(sorted(origins.items())))


def _check_amqp_tls(config: Config) -> None:
    """TLS settings need amqps://; the files must load (a wrong path fails the start, not the
    first connection). Verification off is allowed here and shouted about at start."""
    given = [name for name in ("amqp_tls_ca", "amqp_tls_cert", "amqp_tls_key", "amqp_tls_server_name")
             if getattr(config, name)]
    if not config.amqp_tls_verify:
        given.append("amqp_tls_verify")
    if given and not config.amqp_tls:
        raise ConfigError(f"--{given[0].replace('_', '-')} needs an amqps:// URL in --amqp")
    try:
        client_context(config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _quote(text: str) -> str:
    if len(text) > _SHOWN_MAX:
        text = text[:_SHOWN_MAX] + "..."
    return repr(text)  # repr: no raw newline can break the one-line message or a RESP reply


# -- the module's positional list ------------------------------------------------------------------

# Position (after the flags) -> (name in messages, Config field, parser). Names are the README's.
_POSITIONS: tuple[tuple[str, str, Callable[[str], object]], ...] = (
    ("host", "amqp_host", _host),
    ("port", "amqp_port", _port),
    ("username", "amqp_user", str),
    ("password", "amqp_password", str),
    ("heartbeat", "heartbeat", _heartbeat),
    ("exchange_name", "exchange", _short_string),
    ("routing_key", "routing_key", check_template),
    ("delivery_mode", "delivery_mode", _delivery_mode),
    ("fallback_storage_size", "fallback_size", _fallback_size),
)


#: The settings our commands change (``config_set``/``connect`` positions, ``events_set``, the
#: ``keymask_*`` commands, ``fallback_storage_size_set``): what a fleet of proxies shares through
#: Redis (proxy/fleet/shared_config.py). Everything else is fixed at start.
COMMAND_SETTINGS: tuple[str, ...] = (*(name for _, name, _ in _POSITIONS), "events", "keymasks",
                                     "routes", "event_format")

_PARSERS: dict[str, Callable[[str], object]] = {
    **{name: parse for _, name, parse in _POSITIONS}, "events": _events, "event_format": _format}


def parse_route(args: Sequence[bytes]) -> tuple[bytes, str, str | None]:
    """``MASK ROUTING_KEY [EXCHANGE]`` (``route_add``'s arguments, a ``--route``'s words) as a
    route. Raises ValueError: the reason."""
    if len(args) not in (2, 3):
        raise ValueError("a route is MASK ROUTING_KEY [EXCHANGE]")
    try:
        texts = [bytes(a).decode("utf-8") for a in args[1:]]
    except UnicodeDecodeError:
        raise ValueError("the routing key and exchange must be UTF-8") from None
    check_template(texts[0])
    if len(texts) == 2:
        _short_string(texts[1])
    return bytes(args[0]), texts[0], texts[1] if len(texts) == 2 else None


def parse_setting(name: str, text: str) -> object:
    """The value of the command setting ``name`` (in :data:`COMMAND_SETTINGS`, not ``keymasks``,
    which are bytes) from its text, checked as a command checks it: the text ``str(value)`` of
    any valid value parses back to it. Raises ValueError (the reason) or KeyError (not a
    setting of that kind)."""
    return _PARSERS[name](text)


def module_arg_fields(args: Sequence[bytes], *, with_flags: bool) -> tuple[str, ...]:
    """The Config fields :func:`apply_module_args` sets from ``args`` (the positions given, the
    event flags first ``with_flags``, the masks when any is given)."""
    count = len(args) - (1 if with_flags and args else 0)
    fields = tuple(name for _, name, _ in _POSITIONS[:count])
    if with_flags and args:
        fields = ("events", *fields)
    return fields + (("keymasks",) if count > len(_POSITIONS) else ())


def apply_module_args(config: Config, args: Sequence[bytes], *, with_flags: bool) -> Config:
    """A new config with the module's positional arguments applied.

    ``args`` is ``[FLAGS] HOST PORT USER PASS HEARTBEAT EXCHANGE ROUTING_KEY DELIVERY_MODE
    FALLBACK_SIZE [MASK ...]`` (FLAGS only ``with_flags``, as on the ``loadmodule`` line). Any
    prefix is accepted and only the positions given change; masks replace the current ones only
    when at least one is given (``ALL`` anywhere: every key). Every position is checked first:
    on a ConfigError (its text fits a Redis error reply) nothing is applied.
    """
    args = [bytes(a) for a in args]
    changes: dict[str, object] = {}
    if with_flags and args:
        flags = _decode("event flags", args.pop(0))
        try:
            parse_classes(flags)
        except ValueError as exc:
            raise ConfigError(f"invalid event flags {_quote(flags)}: {exc}") from None
        changes["events"] = flags
    for (what, name, parse), raw in zip(_POSITIONS, args):
        text = _decode(what, raw)
        try:
            changes[name] = parse(text)
        except ValueError as exc:
            shown = "" if what == "password" else " " + _quote(text)
            raise ConfigError(f"invalid {what}{shown}: {exc}") from None
    if (changes.get("amqp_host", config.amqp_host), changes.get("amqp_port", config.amqp_port)) != \
            (config.amqp_host, config.amqp_port):
        changes["amqp_other_nodes"] = ()  # the module names one broker: another replaces a cluster
    if len(args) > len(_POSITIONS):
        changes["keymasks"] = normalize_masks(args[len(_POSITIONS):])
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]  # field values of mixed types; Config's __post_init__ validates them


def _decode(what: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"invalid {what}: not UTF-8") from None


def split_module_args(line: str) -> list[bytes]:
    """Split a ``loadmodule`` argument string the way redis.conf does: Redis's sdssplitargs
    (:func:`protocol.requests.split_args`). Blanks separate arguments (``\\v`` and ``\\f`` only
    between arguments: inside an unquoted one they are ordinary bytes); ``"..."`` understands
    ``\\n \\r \\t \\b \\a \\xHH`` and ``\\"``, ``'...'`` only ``\\'``; anything else (a backslash
    outside quotes too) is literal. A closing quote must end the argument.
    """
    try:
        return split_args(line.encode("utf-8", "surrogateescape"))
    except UnbalancedQuotes as exc:
        raise ConfigError("a closing quote must be followed by a space" if exc.closed
                          else "unbalanced quotes in module arguments") from None
