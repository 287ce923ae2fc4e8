"""OAuth for the tracking API: a signed JWT exchanged for an access token, as Segment does it.

Segment's "OAuth for HTTP API sources" replaces the write key's Basic auth with a short-lived
``Bearer`` token. The client proves who it is with a JWT (RS256, signed with its private key,
``kid`` naming the key registered at Segment) sent to ``{auth_server}/token`` as an RFC 7523
client assertion; the answer is an access token and its lifetime.

``TokenSource`` keeps one token per client. Only delivery asks for it (the flusher, ``flush()``,
a ``sync_mode`` call's delivery), never the calls that queue a message, and at most one token
request is in flight at a time. A token is replaced once half its lifetime has passed (what
Segment's own clients do), so a batch never goes out with a token about to expire; a server
answer that says the token is bad (``invalidate``) makes the next delivery fetch a new one.

Needs the ``oauth`` extra (PyJWT and cryptography): ``pip install 'durable-analytics[oauth]'``.
Neither the private key nor a token appears in a ``repr``, a log line or an exception message.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlencode

from ._bounded_call import call_within
from .exceptions import ConfigError, ConfigurationRejected, RetryableError

__all__ = [
    "ASSERTION_TYPE",
    "DEFAULT_AUTH_SERVER",
    "DEFAULT_SCOPE",
    "OAuthSettings",
    "TokenPoster",
    "TokenResponse",
    "TokenSource",
    "load_private_key",
    "urllib3_poster",
]

log = logging.getLogger("durable_analytics.delivery")

DEFAULT_AUTH_SERVER = "https://oauth2.segment.io"
DEFAULT_SCOPE = "tracking_api:write"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

#: Lifetime assumed when the token answer has no usable ``expires_in``.
DEFAULT_LIFETIME = 120.0
#: The assertion is valid from a little before now (clock skew) to a minute after.
_ASSERTION_BACKDATE = 5
_ASSERTION_LIFETIME = 55
#: Answers that mean the client's own clock was off: retry at once with the server's time.
_SKEW_ERRORS = frozenset({"Token is expired", "Token used before issued"})
_MAX_ERROR_TEXT = 200
# An access token is sent in a header: RFC 6750's b64token characters (and any other visible
# ASCII but space), never empty.
_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))


def _missing_extra(exc: ImportError) -> ConfigError:
    return ConfigError(
        "OAuth needs the oauth extra (PyJWT and cryptography): "
        f"pip install 'durable-analytics[oauth]' ({exc.name} is not installed)"
    )


def load_private_key(pem: str | bytes) -> Any:
    """Parse a PEM private key (RSA, for RS256); ``ConfigError`` if it is not one.

    The error never quotes the key.
    """
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError as exc:
        raise _missing_extra(exc) from None
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # Not chained: the original message may quote part of the key.
        raise ConfigError(
            "oauth_client_key must be an unencrypted PEM private key (RSA, for RS256)"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError("oauth_client_key must be an RSA private key (Segment uses RS256)")
    return key


@dataclass(frozen=True)
class OAuthSettings:
    """The five OAuth settings, validated; the private key is never shown."""

    client_id: str
    client_key: str = field(repr=False)
    key_id: str
    auth_server: str = DEFAULT_AUTH_SERVER
    scope: str = DEFAULT_SCOPE

    @classmethod
    def build(
        cls,
        client_id: object,
        client_key: object,
        key_id: object,
        auth_server: object = None,
        scope: object = None,
    ) -> OAuthSettings | None:
        """The settings, or None when none of the three identifying ones is set.

        Segment's client turns OAuth on only when all three of ``oauth_client_id``,
        ``oauth_client_key`` and ``oauth_key_id`` are set; setting only some of them is a
        mistake that would silently send with the write key, so it raises ``ConfigError``.
        """
        given = {
            "oauth_client_id": client_id,
            "oauth_client_key": client_key,
            "oauth_key_id": key_id,
        }
        present = [name for name, value in given.items() if value]
        if not present:
            return None
        missing = [name for name in given if name not in present]
        if missing:
            raise ConfigError(
                f"OAuth needs all of oauth_client_id, oauth_client_key and oauth_key_id; "
                f"missing {', '.join(missing)}"
            )
        for name, value in given.items():
            if not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, got {type(value).__name__}")
        server = DEFAULT_AUTH_SERVER if auth_server is None else auth_server
        if not isinstance(server, str) or not server.startswith(("https://", "http://")):
            raise ConfigError(f"oauth_auth_server must be an http(s) URL, got {server!r}")
        chosen_scope = DEFAULT_SCOPE if scope is None else scope
        if not isinstance(chosen_scope, str) or not chosen_scope:
            raise ConfigError("oauth_scope must be a non-empty string")
        load_private_key(client_key)  # type: ignore[arg-type]
        return cls(
            client_id=client_id,  # type: ignore[arg-type]
            client_key=client_key,  # type: ignore[arg-type]
            key_id=key_id,  # type: ignore[arg-type]
            auth_server=server.rstrip("/"),
            scope=chosen_scope,
        )

    @property
    def token_url(self) -> str:
        """Where the assertion is exchanged: ``{auth_server}/token``."""
        return f"{self.auth_server}/token"


@dataclass(frozen=True)
class TokenResponse:
    """What the token endpoint answered (the status, the headers, the body)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class TokenPoster(Protocol):
    """POSTs a form to the token endpoint; raises ``OSError`` (or urllib3's errors) on I/O."""

    def __call__(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> TokenResponse:
        """Send ``body`` to ``url`` and return the answer."""
        ...


def urllib3_poster(pool: Any) -> TokenPoster:
    """A poster over a ``urllib3.PoolManager`` (the one the transport already keeps)."""

    def post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> TokenResponse:
        response = pool.request(
            "POST",
            url,
            body=body,
            headers=dict(headers),
            timeout=timeout,
            retries=False,
            redirect=False,
            preload_content=False,
        )
        try:
            data = response.read(64 * 1024)
        finally:
            response.release_conn()
        return TokenResponse(response.status, dict(response.headers), data)

    return post


def _default_poster() -> TokenPoster:
    import urllib3

    return urllib3_poster(urllib3.PoolManager())


class TokenSource:
    """One access token for one client: fetched on demand, cached, replaced at half-life.

    ``authorization()`` returns the ``Authorization`` header value (``Bearer …``), fetching a
    token first when there is none or the current one is past half its lifetime. It raises
    ``RetryableError`` when the authorization server cannot be reached, answers 429 or 5xx
    (the batch is kept and retried), and ``ConfigurationRejected`` when it refuses the client
    (a wrong client id, key or key id: the messages are kept until that is fixed).
    """

    def __init__(
        self,
        settings: OAuthSettings,
        *,
        timeout: float = 10.0,
        poster: TokenPoster | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._timeout = timeout
        self._poster = poster
        self._clock = clock
        self._key = load_private_key(settings.client_key)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self._expires_at = 0.0
        # Seconds our clock is ahead of the authorization server's, from its Date header.
        self._skew = 0.0
        # Set by a 429 with X-RateLimit-Reset / Retry-After: no token request before then.
        self._blocked_until = 0.0
        #: How many token requests were sent (for tests and stats).
        self.requests = 0

    def __repr__(self) -> str:
        state = "a token" if self._token is not None else "no token"
        return (
            f"TokenSource(client_id={self._settings.client_id!r}, "
            f"auth_server={self._settings.auth_server!r}, {state})"
        )

    def authorization(self, timeout: float | None = None) -> str:
        """The ``Authorization`` header value for the next batch request.

        ``timeout`` bounds a token request this may have to make (with the source's own
        timeout), so a ``flush(timeout)`` or an exit stays within its budget.
        """
        budget = self._timeout if timeout is None else min(timeout, self._timeout)
        deadline = time.monotonic() + max(0.05, budget)
        # Another thread may be fetching a token (for a caller with more time): wait for it
        # no longer than this caller's own budget.
        if not self._lock.acquire(timeout=max(0.05, budget)):
            raise RetryableError(
                "no OAuth access token within the time left: another thread's token "
                "request is still under way"
            )
        try:
            token = self._token
            if token is None or self._clock() >= self._refresh_at:
                token = self._fetch(deadline)
            return f"Bearer {token}"
        finally:
            self._lock.release()

    def invalidate(self, authorization: str | None = None) -> None:
        """Forget the token (the API refused it); the next ``authorization()`` fetches anew.

        With ``authorization`` given, only that token is forgotten, so a stale refusal cannot
        throw away a token fetched since.
        """
        with self._lock:
            if authorization is None or authorization == f"Bearer {self._token}":
                self._token = None

    def _assertion(self) -> str:
        import jwt

        now = int(self._clock() - self._skew)
        claims = {
            "iss": self._settings.client_id,
            "sub": self._settings.client_id,
            "aud": self._settings.auth_server,
            "iat": now - _ASSERTION_BACKDATE,
            "exp": now + _ASSERTION_LIFETIME,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(
            claims, self._key, algorithm="RS256", headers={"kid": self._settings.key_id}
        )

    def _fetch(self, deadline: float) -> str:
        """A new token; every request it makes ends by ``deadline`` (``time.monotonic()``)."""
        now = self._clock()
        if now < self._blocked_until:
            raise RetryableError(
                "the OAuth token endpoint asked to wait "
                f"{self._blocked_until - now:.0f}s more before the next token request",
                status=429,
            )
        # One retry at once when the server says our clock is off: the Date header of that
        # answer has just corrected the skew.
        attempt = 0
        while True:
            assertion = self._assertion()
            response = self._request(assertion, deadline - time.monotonic())
            self._learn_skew(response.headers)
            if response.status == 200:
                return self._accept(response)
            error, description = _oauth_error(response.body)
            if attempt == 0 and response.status == 400 and description in _SKEW_ERRORS:
                attempt += 1
                continue
            # A server that echoes the assertion must not put it in an exception or a log.
            description = description.replace(assertion, "<assertion>")
            raise self._failure(response, error, description)

    def _request(self, assertion: str, timeout: float) -> TokenResponse:
        settings = self._settings
        form = urlencode(
            {
                "grant_type": "client_credentials",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
                "scope": settings.scope,
            }
        ).encode()
        if self._poster is None:
            self._poster = _default_poster()
        self.requests += 1
        log.debug("requesting an OAuth access token from %s", settings.token_url)
        poster = self._poster
        timeout = max(0.05, timeout)
        try:
            # A poster's timeout (urllib3's) bounds each read, not the request: an endpoint
            # that answers a byte at a time would hold the token request, and the flush or
            # exit waiting for it, for as long as it likes.
            return call_within(
                timeout,
                lambda: poster(
                    settings.token_url,
                    form,
                    {"Content-Type": "application/x-www-form-urlencoded"},
                    timeout,
                ),
                "the OAuth token request",
            )
        except Exception as exc:
            raise RetryableError(
                f"OAuth token request to {settings.token_url} failed: {type(exc).__name__}"
            ) from None

    def _learn_skew(self, headers: Mapping[str, str]) -> None:
        date = _header(headers, "date")
        if not date:
            return
        try:
            server_time = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError, IndexError):
            return
        self._skew = self._clock() - server_time

    def _accept(self, response: TokenResponse) -> str:
        try:
            data = json.loads(response.body)
            token = data["access_token"]
        except (ValueError, KeyError, TypeError):
            raise RetryableError(
                "the OAuth token endpoint answered 200 without an access_token", status=200
            ) from None
        if not isinstance(token, str) or not token or not _TOKEN_CHARS.issuperset(token):
            # It goes into a header: no spaces, line breaks or non-ASCII.
            raise RetryableError(
                "the OAuth token endpoint sent an empty or malformed access_token", status=200
            )
        lifetime = data.get("expires_in") if isinstance(data, dict) else None
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = DEFAULT_LIFETIME
        now = self._clock()
        self._token = token
        self._expires_at = now + float(lifetime)
        self._refresh_at = now + float(lifetime) / 2
        log.debug("got an OAuth access token valid for %ss", lifetime)
        return token

    def _failure(
        self, response: TokenResponse, error: str, description: str
    ) -> RetryableError | ConfigurationRejected:
        status = response.status
        detail = f"{error}: {description}" if description else error
        detail = detail[:_MAX_ERROR_TEXT]
        message = f"the OAuth token endpoint answered HTTP {status} ({detail})"
        if status == 429 or status >= 500:
            wait = _rate_limit_reset(response.headers)
            if wait:
                self._blocked_until = self._clock() + wait
            return RetryableError(message, status=status, excerpt=detail)
        return ConfigurationRejected(
            message + ": check oauth_client_id, oauth_client_key and oauth_key_id",
            status=status,
            excerpt=detail,
        )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _rate_limit_reset(headers: Mapping[str, str]) -> float | None:
    value = _header(headers, "x-ratelimit-reset") or _header(headers, "retry-after")
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return None if seconds is None or seconds < 0 else min(seconds, 300.0)


def _oauth_error(body: bytes) -> tuple[str, str]:
    """``(error, error_description)`` from an RFC 6749 error answer, or ``("unknown", "")``."""
    try:
        data = json.loads(body)
    except ValueError:
        return "unknown", ""
    if not isinstance(data, dict):
        return "unknown", ""
    error = data.get("error")
    description = data.get("error_description")
    return (
        error if isinstance(error, str) else "unknown",
        description if isinstance(description, str) else "",
    )
