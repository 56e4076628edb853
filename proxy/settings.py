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
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import SplitResult, unquote, urlsplit

from protocol.events import CLASS_LETTERS, parse_classes
from protocol.integers import LLONG_MAX, LLONG_MIN, string2ll
from protocol.keymask import normalize_masks
from protocol.requests import UnbalancedQuotes, split_args
from proxy.config import Config, RedisAddress
from proxy.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "add_arguments",
    "apply_module_args",
    "load",
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
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError("put an IPv6 address in brackets: [::1]:6380")
    if not sep or not host:
        raise ValueError("expected HOST:PORT")
    return {"listen_host": _host(host), "listen_port": _port(port)}


def _url(text: str, scheme: str, form: str) -> SplitResult:
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ValueError(f"expected {form}") from None
    if parts.scheme != scheme:
        raise ValueError(f"expected {form} (TLS and unix sockets are not supported)")
    if parts.query or parts.fragment or not parts.hostname:
        raise ValueError(f"expected {form}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("expected a port from 1 to 65535")
    return parts


def _upstream(text: str) -> dict[str, object]:
    form = "redis://[user:pass@]host:port[/db]"
    parts = _url(text, "redis", form)
    db = string2ll(parts.path[1:] or "0")
    if db is None or db < 0:
        raise ValueError(f"expected {form} with db a number >= 0")
    if not parts.hostname:  # _url() refuses a URL without a host
        raise ValueError(f"expected {form}")
    address = RedisAddress(
        host=parts.hostname,
        port=parts.port or 6379,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        db=db,
    )
    return {"upstream": address}


def _amqp(text: str) -> dict[str, object]:
    form = "amqp://user:pass@host:port/vhost"
    parts = _url(text, "amqp", form)
    vhost = parts.path[1:]
    if "/" in vhost:
        raise ValueError("URL-encode the vhost: %2F for /")
    defaults = Config()
    has_user = "@" in parts.netloc
    return {
        "amqp_host": parts.hostname,
        "amqp_port": parts.port or 5672,
        "amqp_user": unquote(parts.username or "") if has_user else defaults.amqp_user,
        "amqp_password": unquote(parts.password or "") if has_user else defaults.amqp_password,
        "amqp_vhost": unquote(vhost) if vhost else "/",
    }


def _redact_url(text: str) -> str:
    scheme, sep, rest = text.rpartition("://")
    userinfo, at, hostpart = (rest if sep else text).rpartition("@")
    if not at or ":" not in userinfo:
        return text
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hostpart}"


def _show_amqp(c: Config) -> str:
    vhost = c.amqp_vhost.replace("%", "%25").replace("/", "%2F")
    host = f"[{c.amqp_host}]" if ":" in c.amqp_host else c.amqp_host
    return f"amqp://{c.amqp_user}:***@{host}:{c.amqp_port}/{vhost}"


def _show_listen(c: Config) -> str:
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

    @property
    def name(self) -> str:
        return self.flag.replace("-", "_")


def _field(name: str, parse: Callable[[str], object]) -> Callable[[str], dict[str, object]]:
    return lambda text: {name: parse(text)}


def _shown(name: str) -> Callable[[Config], str]:
    return lambda c: str(getattr(c, name))


_OPTIONS = {
    o.name: o
    for o in (
        _Option("config", "PATH", "TOML file with these settings (keys: flag names with _)",
                None, lambda c: "none"),
        _Option("listen", "HOST:PORT", "where clients connect ([::1]:6380 for IPv6)",
                _listen, _show_listen),
        _Option("upstream", "URL", "the Redis behind the proxy: redis://[user:pass@]host:port[/db]",
                _upstream, lambda c: c.upstream.masked_url(), _redact_url),
        _Option("amqp", "URL", "RabbitMQ: amqp://user:pass@host:port/vhost (vhost URL-encoded)",
                _amqp, _show_amqp, _redact_url),
        _Option("heartbeat", "SECONDS", "AMQP heartbeat, 0 to disable",
                _field("heartbeat", _heartbeat), _shown("heartbeat")),
        _Option("exchange", "NAME", "exchange events are published to (never declared)",
                _field("exchange", _short_string), _shown("exchange")),
        _Option("routing-key", "KEY", "routing key of every message",
                _field("routing_key", _short_string), _shown("routing_key")),
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
        parser.add_argument(
            "--" + option.flag,
            dest=option.name,
            metavar=option.metavar,
            help=text,
            default=argparse.SUPPRESS,
            action="append" if option.name == "keymask" else "store",
        )


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
    path = given.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        layers.update(_from_file(path))
    layers.update(_from_environ(environ))
    layers.update({name: (("", "--" + _OPTIONS[name].flag), v) for name, v in given.items()})
    return _build(layers)


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
        if key in ("keymask", "module_args") and isinstance(value, list):
            if not all(isinstance(item, str) for item in value):
                raise ConfigError(f"{path}: invalid {key}: expected strings")
        elif isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{path}: invalid {key}: expected a string or a number")
        elif key == "keymask":
            value = [value]
        else:
            value = str(value)
        entries[key] = (label, value)
    return entries


def _build(layers: Mapping[str, _Entry]) -> Config:
    changes: dict[str, object] = {}
    for name, ((prefix, label), raw) in layers.items():
        option = _OPTIONS[name]
        if name == "keymask":
            masks = raw  # a list of str, whatever the source
            changes["keymasks"] = normalize_masks(_key_bytes(m) for m in masks)  # type: ignore  # the TOML/env value was checked to be a list of strings
        elif option.convert is not None:
            try:
                changes.update(option.convert(raw))  # type: ignore[arg-type]  # option tables map names to converters of mixed value types
            except ValueError as exc:
                shown = " " + _quote(option.redact(raw)) if option.redact else ""  # type: ignore  # redact takes the raw value, whatever its type
                raise ConfigError(f"{prefix}invalid {label}{shown}: {exc}") from None
    config = Config(**changes)  # type: ignore[arg-type]  # field values of mixed types; Config's __post_init__ validates them
    if "module_args" in layers:
        (prefix, label), raw = layers["module_args"]
        try:
            # TOML gives a list of strings here (a string otherwise): _check_types made sure.
            args = split_module_args(raw) if isinstance(raw, str) else [_key_bytes(a) for a in cast("list[str]", raw)]
            config = apply_module_args(config, args, with_flags=True)
        except ConfigError as exc:
            raise ConfigError(f"{prefix}invalid {label}: {exc}") from None
    return config


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
    ("routing_key", "routing_key", _short_string),
    ("delivery_mode", "delivery_mode", _delivery_mode),
    ("fallback_storage_size", "fallback_size", _fallback_size),
)


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
