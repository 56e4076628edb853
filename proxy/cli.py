"""The ``key-evt-amqp`` command line: ``key-evt-amqp serve [flags]``.

Exit status: whatever the server (or the supervisor of ``--workers``) returns, 2 for a bad
configuration or usage (the message goes to stderr as one ``key-evt-amqp: ...`` line), 0 after
``--help``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Sequence

from proxy import settings, workers
from proxy.tail import add_arguments as tail_arguments


def version() -> str:
    """The installed distribution's version (the checkout's pyproject.toml when not installed)."""
    try:
        return importlib.metadata.version("key-evt-amqp")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        prog="key-evt-amqp",
        description="A RESP proxy in front of Redis that forwards keyspace events to RabbitMQ.",
    )
    parser.add_argument("--version", action="version", version=f"key-evt-amqp {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy until SIGINT or SIGTERM.",
        epilog=settings.HELP_EPILOG,
    )
    settings.add_arguments(serve)
    tail = commands.add_parser(
        "tail",
        help="print the events as they reach the broker",
        description="Bind an exclusive, auto-delete queue to the configured exchange and routing key "
        "and print one line per event (the connection flags, environment and config file are serve's).",
        epilog=settings.HELP_EPILOG,
    )
    settings.add_arguments(tail)
    tail_arguments(tail)
    return parser, serve


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, serve = _parser()
    try:
        _, unknown = parser.parse_known_args(argv)
        if unknown:  # a misspelled serve flag: serve's usage, not the top level's
            serve.error("unrecognized arguments: " + " ".join(unknown))
    except SystemExit as exc:  # argparse after --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if argv[0] == "tail":
        from proxy.tail import main as tail

        return tail(argv[1:], os.environ)
    # argv[0] is "serve", the rest are its flags.
    try:
        config = settings.load(argv[1:], os.environ)
    except settings.ConfigError as exc:
        print(f"key-evt-amqp: {exc}", file=sys.stderr)
        return 2
    # Late: the server pulls in asyncio, uvloop and aiormq. Before forking workers, so that each
    # starts with them imported (and an install that cannot import them fails here, once).
    from proxy.server import run

    if config.workers == 1:
        return run(config)
    from proxy import logs

    try:
        workers.check_port(config.listen_host, config.listen_port)
    except OSError as exc:
        print(f"key-evt-amqp: cannot listen on {config.listen_host}:{config.listen_port}: "
              f"{exc.strerror}", file=sys.stderr)
        return 1
    logs.setup(config.log_level, config.log_format, tag="supervisor")
    return workers.Supervisor(config, run).run()
