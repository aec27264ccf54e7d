"""Connections to Redis from a `RedisConfig`: credentials, TLS and timeouts in one place.

The URL may carry credentials (`redis://user:password@host:6379/0`, or `?password=` in the
query); `RedisConfig.username` and `RedisConfig.password` (or `password_file`) win over them.
redis-py lets the URL win over keyword arguments, so the credentials are taken out of the
URL here and passed as arguments. TLS: `RedisConfig.tls = true` or a `rediss://` URL.

`safe_url` is the form of a URL for messages and logs: no user, no password.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis

from ..config import RedisConfig, redact_url
from ..errors import StateError

_CREDENTIAL_PARAMS = ("username", "password")


def safe_url(url: str) -> str:
    """`url` with its user and password removed entirely: "redis://***@host:6379/0".

    Everything before the last "@" goes, so a password holding "@" or ":" leaks no part.
    """
    return redact_url(url)


def redis_client(cfg: RedisConfig) -> redis.Redis:
    """A client for `cfg` (no connection is made until the first command)."""
    url, url_user, url_password = _split_credentials(cfg.url)
    username = cfg.username or url_user
    password = cfg.password_value or url_password
    kwargs: dict[str, Any] = {
        "socket_timeout": cfg.timeout_s,
        "socket_connect_timeout": cfg.timeout_s,
    }
    if username:
        kwargs["username"] = username
    if password:
        kwargs["password"] = password
    if cfg.uses_tls:
        if url.startswith("redis://"):
            kwargs["connection_class"] = redis.SSLConnection
        kwargs["ssl_cert_reqs"] = "required"
        kwargs["ssl_check_hostname"] = cfg.tls_check_hostname
        for arg, value in (
            ("ssl_ca_certs", cfg.tls_ca_file),
            ("ssl_certfile", cfg.tls_cert_file),
            ("ssl_keyfile", cfg.tls_key_file),
        ):
            if value:
                kwargs[arg] = value
    try:
        return redis.Redis.from_url(url, **kwargs)
    except ValueError as exc:
        # redis-py's message may quote a piece of the URL; quote it only without credentials.
        detail = str(exc) if url == cfg.url else "cannot parse it"
        raise StateError(f"redis {safe_url(cfg.url)}: invalid URL: {detail}") from None


def _split_credentials(url: str) -> tuple[str, str, str]:
    """(url without credentials, user, password) of a Redis URL; '' for what it lacks."""
    if "@" not in url and not any(f"{p}=" in url for p in _CREDENTIAL_PARAMS):
        return url, "", ""
    parts = urlsplit(url)
    user = unquote(parts.username) if parts.username else ""
    password = unquote(parts.password) if parts.password else ""
    query = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "username":
            user = user or value
        elif key == "password":
            password = password or value
        else:
            query.append((key, value))
    netloc = parts.netloc.rpartition("@")[2]
    stripped = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        stripped += "?" + urlencode(query)
    return stripped, user, password
