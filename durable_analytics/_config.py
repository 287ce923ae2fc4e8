"""The frozen settings object, its defaults and validation, and every environment variable.

This is the only module that reads ``os.environ``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypedDict
from urllib.parse import urlsplit

from ._oauth import DEFAULT_AUTH_SERVER, DEFAULT_SCOPE, OAuthSettings
from ._urls import normalize_host, url_without_secrets
from .exceptions import ConfigError

__all__ = [
    "DEFAULT_HOST",
    "SEGMENT_PARAMETERS",
    "Config",
    "Durability",
    "FlusherMode",
    "OnError",
    "OnExit",
    "Overflow",
    "Settings",
    "ca_bundle_from_env",
    "default_queue_path",
    "env_debug",
    "env_host",
    "env_queue_url",
    "env_write_key",
    "is_queue_url",
    "proxy_for_url",
    "redact",
]

DEFAULT_HOST = "https://api.segment.io"
#: Requests outstanding per destination by default (measured: ``benchmarks/bench_delivery.py``).
DEFAULT_MAX_IN_FLIGHT = 32

Durability = Literal["normal", "full"]
FlusherMode = Literal["thread", "process", "none"]
OnExit = Literal["flush", "spawn", "none"]
Overflow = Literal["drop_newest", "drop_oldest"]
OnError = Callable[[Exception, list[dict[str, Any]]], object]

#: segment-analytics-python's ``Client`` parameters, in its positional order.
SEGMENT_PARAMETERS = (
    "write_key",
    "host",
    "debug",
    "max_queue_size",
    "send",
    "on_error",
    "gzip",
    "max_retries",
    "sync_mode",
    "timeout",
    "proxies",
    "thread",
    "upload_size",
    "upload_interval",
    "log_handler",
    "oauth_client_id",
    "oauth_client_key",
    "oauth_key_id",
    "oauth_auth_server",
    "oauth_scope",
    "max_total_backoff_duration",
    "max_rate_limit_duration",
)


class Settings(TypedDict, total=False):
    """The settings durable-analytics adds to segment's, keyword-only on ``Client``.

    ``Client(write_key, host, ..., **settings: Unpack[Settings])``: a type checker then
    catches ``flusher="nonee"`` or ``flush_at="20"`` in the caller's code.
    """

    queue_path: str | os.PathLike[str] | None
    queue_url: str | None
    flush_at: int | None
    flush_interval: float | None
    max_batch_bytes: int | None
    max_message_bytes: int | None
    durability: Durability | None
    flusher: FlusherMode | None
    on_exit: OnExit | None
    shutdown_timeout: float | None
    busy_timeout: float | None
    lease_timeout: float | None
    max_queue_bytes: int | None
    overflow: Overflow | None
    max_in_flight: int | None
    max_batch_messages: int | None


_ENV_WRITE_KEY = "DURABLE_ANALYTICS_WRITE_KEY"
_ENV_HOST = "DURABLE_ANALYTICS_HOST"
_ENV_QUEUE = "DURABLE_ANALYTICS_QUEUE"


def env_write_key() -> str | None:
    """The write key from ``DURABLE_ANALYTICS_WRITE_KEY``, if set and not empty."""
    return os.environ.get(_ENV_WRITE_KEY) or None


def env_host() -> str | None:
    """The host from ``DURABLE_ANALYTICS_HOST``, if set and not empty."""
    return os.environ.get(_ENV_HOST) or None


def env_debug() -> bool:
    """True when ``DEBUG`` names ``analytics`` (``DEBUG=analytics`` or ``DEBUG=*``)."""
    value = os.environ.get("DEBUG", "")
    parts = {p.strip() for p in value.replace(",", " ").split()}
    return bool(parts & {"analytics", "durable_analytics", "durable-analytics", "*"})


def ca_bundle_from_env() -> str | None:
    """The CA bundle named by ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE``, as requests reads it."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None


def proxy_for_url(url: str) -> str | None:
    """The proxy that ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` name for ``url``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if urllib.request.proxy_bypass(host):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all") or None


def is_queue_url(value: object) -> bool:
    """Whether ``value`` names a PostgreSQL queue (``postgresql://`` or ``postgres://``)."""
    return isinstance(value, str) and value.lower().startswith(("postgresql://", "postgres://"))


def env_queue_url() -> str | None:
    """``$DURABLE_ANALYTICS_QUEUE`` when it is a PostgreSQL queue URL."""
    from_env = os.environ.get(_ENV_QUEUE)
    return from_env if is_queue_url(from_env) else None


def default_queue_path() -> Path:
    """``$DURABLE_ANALYTICS_QUEUE``, else ``<user data dir>/durable-analytics/queue.sqlite3``.

    A ``postgresql://`` URL there is not a path: ``env_queue_url`` reads it instead.
    """
    from_env = os.environ.get(_ENV_QUEUE)
    if from_env and not is_queue_url(from_env):
        return Path(from_env).expanduser()
    import platformdirs  # imported here: only the default path needs it

    return Path(platformdirs.user_data_dir("durable-analytics", appauthor=False)) / "queue.sqlite3"


def redact(write_key: str) -> str:
    """Show only the first 4 characters of a write key, as ``status`` does."""
    return (write_key[:4] + "…") if len(write_key) > 4 else "…"


# Settings that are objects of this process (callables, handlers): they never travel.
_LOCAL_ONLY = frozenset({"on_error", "log_handler"})


def unknown_settings_message(unknown: list[str], known: set[str] | frozenset[str]) -> str:
    """``unknown setting(s): flush_intervall (did you mean flush_interval?)``."""
    import difflib

    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return f"unknown setting(s): {', '.join(parts)}"


def _positive(name: str, value: object, *, integer: bool = False, allow_zero: bool = False) -> None:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind}, got {type(value).__name__}")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {value!r}")


def _connect_and_read(value: tuple[object, ...]) -> float:
    """segment-analytics-python's ``timeout=(connect, read)`` (requests' form) as our one
    bound of a whole request: the two added."""
    if len(value) != 2:
        raise ConfigError(f"timeout must be a number or a (connect, read) pair, got {value!r}")
    for part in value:
        _positive("timeout", part)
    return float(value[0]) + float(value[1])  # type: ignore[arg-type]


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{name} must be one of {options}, got {value!r}")


#: Client settings segment-analytics-python reads as truthy or falsy, whatever their type.
_SEGMENT_FLAGS = ("send", "gzip", "sync_mode", "debug")


@dataclass(frozen=True)
class Config:
    """Every Client setting, validated. Build it with ``Config.build(write_key, **settings)``.

    The write key is kept out of ``repr`` so a logged config never leaks it. ``queue_path``
    is absolute from construction, so a later ``os.chdir`` or a child process started in
    another directory still opens the same file.
    """

    write_key: str = field(repr=False)
    host: str = DEFAULT_HOST
    queue_path: Path = field(default_factory=default_queue_path)
    #: A ``postgresql://`` URL: the queue lives there instead of at ``queue_path``. It may
    #: hold a password, so it is never in ``repr``; ``queue_name`` is what to show.
    queue_url: str | None = field(default=None, repr=False)
    flush_at: int = 20
    flush_interval: float = 5.0
    max_batch_bytes: int = 500_000
    max_message_bytes: int = 32_768
    durability: Durability = "normal"
    flusher: FlusherMode = "thread"
    on_exit: OnExit = "flush"
    shutdown_timeout: float = 5.0
    busy_timeout: float = 10.0
    timeout: float = 10.0
    max_retries: int = 3
    lease_timeout: float = 60.0
    max_queue_bytes: int = 1 << 30
    overflow: Overflow = "drop_newest"
    gzip: bool = False
    send: bool = True
    sync_mode: bool = False
    on_error: OnError | None = None
    debug: bool = False
    proxies: Mapping[str, str] | None = None
    log_handler: logging.Handler | None = None
    max_queue_size: int | None = None
    max_total_backoff_duration: float = 43200.0
    max_rate_limit_duration: float = 1800.0
    oauth_client_id: str | None = None
    oauth_client_key: str | None = field(default=None, repr=False)
    oauth_key_id: str | None = None
    oauth_auth_server: str = DEFAULT_AUTH_SERVER
    oauth_scope: str = DEFAULT_SCOPE
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_batch_messages: int | None = None

    @classmethod
    def build(cls, write_key: str | None = None, **settings: Any) -> Config:
        """Validate ``settings`` (the Client keyword arguments) and fill in the defaults.

        Takes segment-analytics-python's names too: ``upload_size`` (→ ``flush_at``) and
        ``upload_interval`` (→ ``flush_interval``) and ``thread`` (→ ``max_in_flight``: N
        sender threads keep at most N batches in flight, so do we) when those are not given;
        ``on_error=False`` means no callback, as ``None`` does.
        """
        aliases = {
            "upload_size": "flush_at",
            "upload_interval": "flush_interval",
            "thread": "max_in_flight",
        }
        if settings.get("thread") is not None:
            _positive("thread", settings["thread"], integer=True)  # named as the user wrote it
        for old, new in aliases.items():
            if old in settings:
                value = settings.pop(old)
                if value is not None and settings.get(new) is None:
                    settings[new] = value
        if settings.get("on_error") is False:
            settings["on_error"] = None
        size = settings.get("max_queue_size")
        if isinstance(size, int) and not isinstance(size, bool) and size <= 0:
            # segment's queue.Queue(maxsize) reads 0 or less as "no limit": so do we.
            settings["max_queue_size"] = None

        known = {f.name for f in fields(cls)} - {"write_key"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(unknown_settings_message(unknown, known))
        for flag in _SEGMENT_FLAGS:
            # segment-analytics-python keeps these as given and reads them as truthy or
            # falsy (send=1, gzip=0, send=None): so do we, as True or False, but for a
            # string, whose "false" or "0" (a setting read from the environment) would mean
            # on. (debug=None leaves it to the DEBUG environment variable.)
            value = settings.get(flag)
            if isinstance(value, (str, bytes)):
                raise ConfigError(
                    f"{flag} must be True or False, got the string {value!r}: a string "
                    'from the environment is not a switch ("false" would mean on)'
                )
            if flag in settings and (value is not None or flag != "debug"):
                settings[flag] = bool(value)
        # None means "the default", as segment-analytics-python's module settings do.
        settings = {k: v for k, v in settings.items() if v is not None}

        if write_key is None:
            write_key = env_write_key()
        if write_key is None:
            raise ConfigError(
                "write_key is required: pass Client(write_key) or set DURABLE_ANALYTICS_WRITE_KEY"
            )
        if not isinstance(write_key, str):
            raise ConfigError("write_key must be a non-empty string")
        # send=False takes an empty key (a development setup: the key from an unset
        # environment variable): segment accepts it, and nothing is ever sent with it.
        if not write_key.strip() and settings.get("send", True):
            raise ConfigError("write_key must be a non-empty string")
        if any(c in write_key for c in "\r\n\x00"):
            raise ConfigError("write_key must not contain line breaks or NUL")

        host = settings.get("host") or env_host() or DEFAULT_HOST
        settings["host"] = normalize_host(host)
        if is_queue_url(settings.get("queue_path")):
            # A URL given where a path goes (the CLI's --queue, the module-level setting).
            if "queue_url" in settings:
                raise ConfigError("give queue_path or queue_url, not both")
            settings["queue_url"] = settings.pop("queue_path")
        if "queue_url" in settings:
            if "queue_path" in settings:
                raise ConfigError("give queue_path or queue_url, not both")
        elif "queue_path" not in settings and env_queue_url():
            settings["queue_url"] = env_queue_url()
        if "queue_path" in settings:
            qp = settings["queue_path"]
            if not isinstance(qp, (str, os.PathLike)) or not os.fspath(qp):
                raise ConfigError("queue_path must be a path (str or os.PathLike)")
            settings["queue_path"] = Path(os.fspath(qp)).expanduser()
        else:
            settings["queue_path"] = default_queue_path()
        settings["queue_path"] = settings["queue_path"].absolute()
        if settings.get("debug") is None and env_debug():
            settings["debug"] = True
        timeout = settings.get("timeout")
        if isinstance(timeout, tuple):
            timeout = settings["timeout"] = _connect_and_read(timeout)
        if (
            "lease_timeout" not in settings
            and isinstance(timeout, (int, float))
            and not isinstance(timeout, bool)
            and timeout > cls.lease_timeout
        ):
            # Only a lease_timeout given explicitly is refused for being too short: the
            # default grows with a long request timeout.
            settings["lease_timeout"] = float(timeout)
        config = cls(write_key=write_key, **settings)
        config.validate()
        return config

    @classmethod
    def for_delivery(cls, **settings: Any) -> Config:
        """Settings for a process that only delivers what is queued (``drain``, ``worker``).

        Every queued message carries its own destination, so no write key is needed: the
        result's ``write_key`` is empty (a Client cannot be built from it). ``settings`` are
        validated as ``build`` does.
        """
        return replace(cls.build("unused", **settings), write_key="")

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first invalid setting."""
        _positive("flush_at", self.flush_at, integer=True)
        _positive("flush_interval", self.flush_interval)
        _positive("max_message_bytes", self.max_message_bytes, integer=True)
        _positive("max_batch_bytes", self.max_batch_bytes, integer=True)
        if self.max_batch_bytes < self.max_message_bytes + 64:
            raise ConfigError(
                "max_batch_bytes must leave room for one max_message_bytes message and the "
                f"envelope (at least {self.max_message_bytes + 64}), got {self.max_batch_bytes}"
            )
        _positive("shutdown_timeout", self.shutdown_timeout, allow_zero=True)
        _positive("busy_timeout", self.busy_timeout)
        _positive("timeout", self.timeout)
        _positive("max_retries", self.max_retries, integer=True, allow_zero=True)
        _positive("lease_timeout", self.lease_timeout)
        if self.lease_timeout < self.timeout:
            raise ConfigError(
                f"lease_timeout ({self.lease_timeout:g}s) must not be shorter than the request "
                f"timeout ({self.timeout:g}s): a batch could be leased and sent again while "
                "its first request is still waiting for an answer"
            )
        _positive("max_in_flight", self.max_in_flight, integer=True)
        if self.max_batch_messages is not None:
            _positive("max_batch_messages", self.max_batch_messages, integer=True)
        _positive("max_queue_bytes", self.max_queue_bytes, integer=True)
        _choice("durability", self.durability, ("normal", "full"))
        if self.queue_url is not None and not is_queue_url(self.queue_url):
            raise ConfigError("queue_url must be a postgresql:// (or postgres://) URL")
        _choice("flusher", self.flusher, ("thread", "process", "none"))
        _choice("on_exit", self.on_exit, ("flush", "spawn", "none"))
        _choice("overflow", self.overflow, ("drop_newest", "drop_oldest"))
        for name in ("gzip", "send", "sync_mode", "debug"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False")
        if self.on_error is not None and not callable(self.on_error):
            raise ConfigError("on_error must be callable as on_error(exception, messages)")
        if self.proxies is not None and not isinstance(self.proxies, Mapping):
            raise ConfigError("proxies must be a mapping like {'https': 'http://proxy:3128'}")
        if self.log_handler is not None and not isinstance(self.log_handler, logging.Handler):
            raise ConfigError("log_handler must be a logging.Handler")
        if self.max_queue_size is not None:
            _positive("max_queue_size", self.max_queue_size, integer=True)
        for name in ("max_total_backoff_duration", "max_rate_limit_duration"):
            # segment's own message, and like segment a ValueError (ConfigError is one).
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number")
        _ = self.oauth  # built here so that a bad key fails at construction

    @property
    def oauth(self) -> OAuthSettings | None:
        """The OAuth settings when ``oauth_client_id``/``_key``/``_key_id`` are all set."""
        return OAuthSettings.build(
            self.oauth_client_id,
            self.oauth_client_key,
            self.oauth_key_id,
            self.oauth_auth_server,
            self.oauth_scope,
        )

    def to_json(self) -> str:
        """Every setting that can cross into another process, as JSON (write key included).

        ``on_error`` and ``log_handler`` are objects of this process and are left out. The
        text holds the write key and proxy credentials: hand it to a child over a pipe or a
        0600 file, never on a command line.
        """
        values: dict[str, Any] = {}
        for f in fields(self):
            if f.name in _LOCAL_ONLY:
                continue
            value = getattr(self, f.name)
            if f.name == "queue_path":
                value = os.fspath(value)
            elif f.name == "proxies" and value is not None:
                value = dict(value)
            values[f.name] = value
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Config:
        """The Config ``to_json`` wrote, validated again; ``ConfigError`` if it is not one."""
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"settings are not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError("settings must be a JSON object")
        known = {f.name for f in fields(cls)} - _LOCAL_ONLY
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        write_key = values.get("write_key")
        if not isinstance(write_key, str) or not write_key:
            raise ConfigError("settings must hold the write key")
        queue_path = values.get("queue_path")
        if not isinstance(queue_path, str) or not os.path.isabs(queue_path):
            raise ConfigError("settings must hold an absolute queue_path")
        values["queue_path"] = Path(queue_path)
        values["host"] = normalize_host(values.get("host", DEFAULT_HOST))
        try:
            config = cls(**values)
        except TypeError as exc:
            raise ConfigError(f"invalid settings: {exc}") from None
        config.validate()
        return config

    @property
    def queue_name(self) -> str:
        """Where the queue lives, safe to show: the path, or the URL without its password."""
        if self.queue_url is None:
            return str(self.queue_path)
        return url_without_secrets(self.queue_url)

    @property
    def batch_messages(self) -> int:
        """Messages per request: ``max_batch_messages`` when set, else ``flush_at``."""
        return self.flush_at if self.max_batch_messages is None else self.max_batch_messages

    @property
    def redacted_key(self) -> str:
        """The write key as shown in logs and ``status``: its first 4 characters."""
        return redact(self.write_key)
