"""TLS to RabbitMQ (``amqps://``): the client side's :class:`ssl.SSLContext`.

In the proxy's base layer so that :mod:`proxy.settings` can load the files when it reads the
configuration (a wrong path stops the start with its name, instead of failing every connection
later) and the publisher can build the same context for its connections.
"""

from __future__ import annotations

import ssl

from proxy.config import Config

__all__ = ["client_context"]


def client_context(config: Config) -> ssl.SSLContext | None:
    """The context for ``config``'s broker connections; None without TLS (``amqp://``).

    Certificates are checked against ``amqp_tls_ca`` (else the system's CAs) and must name the host
    connected to, or ``amqp_tls_server_name``; ``amqp_tls_cert``/``amqp_tls_key`` are sent when
    the broker asks for a client certificate. ``amqp_tls_verify`` False accepts any certificate.
    Raises ValueError naming the setting and the file when one does not load.
    """
    if not config.amqp_tls:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.amqp_tls_ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(_file_error("--amqp-tls-ca", config.amqp_tls_ca, exc)) from None
    if config.amqp_tls_key and not config.amqp_tls_cert:
        raise ValueError("--amqp-tls-key needs --amqp-tls-cert (the certificate it belongs to)")
    if config.amqp_tls_cert:
        try:
            context.load_cert_chain(config.amqp_tls_cert, config.amqp_tls_key or None)
        except (OSError, ssl.SSLError) as exc:
            flag, path = "--amqp-tls-cert", config.amqp_tls_cert
            if config.amqp_tls_key and isinstance(exc, OSError) and exc.filename == config.amqp_tls_key:
                flag, path = "--amqp-tls-key", config.amqp_tls_key
            raise ValueError(_file_error(flag, path, exc)) from None
    if not config.amqp_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _file_error(flag: str, path: str, exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        why = f"not a usable PEM file ({exc.reason or exc.strerror or 'unreadable'})"
    else:
        why = exc.strerror or str(exc)
    return f"invalid {flag} {path!r}: {why}"
