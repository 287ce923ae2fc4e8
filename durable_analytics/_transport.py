"""HTTP delivery of one batch: the request, its status classification and Retry-After.

One ``Transport`` per flusher, each with its own ``requests.Session`` created in the process
that uses it (a session is never shared across a fork). Proxies and the CA bundle are taken
from the environment once, not on every request, and redirects are never followed so the
write key cannot be sent to a third host.
"""

from __future__ import annotations

import base64
import gzip as gzip_module
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Literal

import requests
import requests.adapters
import requests.utils

from ._config import ca_bundle_from_env
from ._version import __version__

__all__ = [
    "MAX_RESPONSE_BYTES",
    "MAX_RETRY_AFTER",
    "Outcome",
    "Transport",
    "batch_body",
    "classify",
    "envelope_overhead",
    "parse_retry_after",
]

log = logging.getLogger("durable_analytics")

#: Response bodies are read to at most this many bytes.
MAX_RESPONSE_BYTES = 64 * 1024
#: A Retry-After above this is capped: a guard against an absurd header.
MAX_RETRY_AFTER = 300.0

USER_AGENT = f"durable-analytics/{__version__}"

Kind = Literal["ok", "retry", "reject", "config"]

_RETRYABLE = frozenset({408, 410, 429, 460})
_REJECTED = frozenset({400, 413, 422})


def classify(status: int) -> Kind:
    """What a status means for the batch: deliver, retry, split-and-reject, or config error.

    2xx ok; 408, 410, 429, 460 and 5xx (but 501, 505) retry; 400, 413, 422 reject (split the
    batch until the bad message is alone); everything else (401, 403, 404, 3xx, ...) is a
    configuration error: the messages are kept and the destination backs off.
    """
    if 200 <= status < 300:
        return "ok"
    if status in _RETRYABLE or (500 <= status < 600 and status not in (501, 505)):
        return "retry"
    if status in _REJECTED:
        return "reject"
    return "config"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or HTTP date), capped at 300.

    Returns None for a missing or unparseable header, which is then ignored.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        current = time.time() if now is None else now
        seconds = when.timestamp() - current
    else:
        if math.isnan(seconds):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _sent_at() -> bytes:
    return (
        datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    ).encode("ascii")


_HEAD = b'{"batch":['
_TAIL = b'],"sentAt":"'
_END = b'"}'


def envelope_overhead() -> int:
    """Bytes the batch envelope adds around the messages (the commas are counted apart)."""
    return len(_HEAD) + len(_TAIL) + len(_sent_at()) + len(_END)


def batch_body(bodies: tuple[bytes, ...] | list[bytes]) -> bytes:
    """The request body: the stored messages, byte for byte, and a fresh ``sentAt``."""
    return b"".join((_HEAD, b",".join(bodies), _TAIL, _sent_at(), _END))


@dataclass(frozen=True)
class Outcome:
    """The result of one POST, classified."""

    kind: Kind
    status: int | None
    retry_after: float | None = None
    excerpt: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        """True for a 2xx."""
        return self.kind == "ok"


class Transport:
    """POSTs batch bodies to ``{host}/v1/batch`` with Basic auth, never following redirects."""

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        gzip: bool = False,
        proxies: Mapping[str, str] | None = None,
        verify: bool | str = True,
        trust_env: bool = True,
    ) -> None:
        self.timeout = timeout
        self.gzip = gzip
        self._proxies = dict(proxies) if proxies is not None else None
        self._verify = verify
        self._trust_env = trust_env
        self._session: requests.Session | None = None
        self._pid = 0
        self._env_cache: dict[str, tuple[dict[str, str], bool | str]] = {}
        self._auth_cache: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"Transport(timeout={self.timeout!r}, gzip={self.gzip!r})"

    def _get_session(self) -> requests.Session:
        if self._session is None or self._pid != os.getpid():
            session = requests.Session()
            # Environment proxies and CA bundle are resolved once per host in _settings_for,
            # not by requests on every call (which costs more than the request itself here).
            session.trust_env = False
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=8)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._session = session
            self._pid = os.getpid()
        return self._session

    def _settings_for(self, url: str) -> tuple[dict[str, str], bool | str]:
        cached = self._env_cache.get(url)
        if cached is None:
            proxies = self._proxies
            verify = self._verify
            if proxies is None:
                proxies = requests.utils.get_environ_proxies(url) if self._trust_env else {}
            if verify is True and self._trust_env:
                verify = ca_bundle_from_env() or True
            cached = (dict(proxies), verify)
            self._env_cache[url] = cached
        return cached

    def _authorization(self, write_key: str) -> str:
        value = self._auth_cache.get(write_key)
        if value is None:
            token = base64.b64encode(f"{write_key}:".encode()).decode("ascii")
            value = f"Basic {token}"
            self._auth_cache[write_key] = value
        return value

    def close(self) -> None:
        """Close the session's connections (in the process that opened them)."""
        if self._session is not None and self._pid == os.getpid():
            self._session.close()
        self._session = None

    def post(
        self, host: str, write_key: str, body: bytes, *, timeout: float | None = None
    ) -> Outcome:
        """POST one batch body; network failures come back as a retryable ``Outcome``."""
        url = f"{host}/v1/batch"
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Authorization": self._authorization(write_key),
        }
        data = body
        if self.gzip:
            headers["Content-Encoding"] = "gzip"
            data = gzip_module.compress(body, compresslevel=6)
        read_timeout = self.timeout if timeout is None else max(0.05, min(timeout, self.timeout))
        proxies, verify = self._settings_for(url)
        session = self._get_session()
        try:
            response = session.post(
                url,
                data=data,
                headers=headers,
                timeout=(min(read_timeout, 10.0), read_timeout),
                allow_redirects=False,
                stream=True,
                proxies=proxies,
                verify=verify,
            )
        except requests.exceptions.SSLError as exc:
            return Outcome("retry", None, error=f"TLS error talking to {host}: {_short(exc)}")
        except requests.exceptions.Timeout:
            return Outcome("retry", None, error=f"timed out after {read_timeout:g}s on {host}")
        except requests.exceptions.RequestException as exc:
            return Outcome("retry", None, error=f"network error talking to {host}: {_short(exc)}")
        try:
            raw = response.raw.read(MAX_RESPONSE_BYTES, decode_content=True) or b""
        except Exception as exc:
            raw = f"<unreadable response body: {type(exc).__name__}>".encode()
        finally:
            response.close()
        status = response.status_code
        kind = classify(status)
        excerpt = raw[:2000].decode("utf-8", "replace")
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        error = "" if kind == "ok" else f"HTTP {status} from {host}: {excerpt[:200]}".strip()
        return Outcome(kind, status, retry_after, excerpt, error)


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "…"
