"""A test OAuth token endpoint: checks a client's signed JWT and issues access tokens.

It speaks what Segment's authorization server speaks to its tracking clients: a ``POST
/token`` form with ``grant_type=client_credentials``, an RFC 7523 JWT client assertion
(RS256, ``kid`` header, ``iss`` = ``sub`` = the client id, ``aud`` = the server's base URL)
and a ``scope``; the answer is ``{"access_token", "token_type", "expires_in", "scope"}`` or
an RFC 6749 error (``{"error", "error_description"}``). ``testing.Collector`` mounts it so a
client's OAuth can be tested end to end on 127.0.0.1; ``authorized(header)`` tells the
collector whether a ``Bearer`` header carries a live token it issued.

Needs PyJWT and cryptography (the ``oauth`` extra) once a client is registered.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs

__all__ = ["TOKEN_PATH", "TokenEndpoint", "TokenRequest", "generate_key_pair"]

TOKEN_PATH = "/token"  # noqa: S105 (a URL path, not a password)
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def generate_key_pair() -> tuple[str, str]:
    """A fresh 2048-bit RSA key pair as PEM text: ``(private_key, public_key)``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@dataclass(frozen=True)
class TokenRequest:
    """One request to the token endpoint as it saw it.

    ``claims`` and ``jwt_headers`` are the assertion's, decoded without trusting them (empty
    when it did not parse); ``status`` is what the endpoint answered; ``error`` the RFC 6749
    error code it gave, if any.
    """

    received_at: float
    form: Mapping[str, str]
    claims: Mapping[str, Any]
    jwt_headers: Mapping[str, Any]
    status: int
    error: str | None = None

    def __repr__(self) -> str:
        # The form holds the signed assertion: a bearer credential for a minute.
        return (
            f"TokenRequest(status={self.status}, error={self.error!r}, "
            f"client={self.claims.get('iss')!r})"
        )


@dataclass
class _Client:
    public_key: Any
    key_id: str
    scopes: frozenset[str] = field(default_factory=frozenset)


class TokenEndpoint:
    """Issues access tokens to registered clients whose JWT assertion verifies.

    ``register(client_id, public_key_pem, key_id)`` adds a client. ``audience`` is the base
    URL the assertions must name in ``aud`` (the collector sets it to its own URL).
    ``expires_in`` is the lifetime of the tokens it issues; ``clock`` (``time.time``) can be
    replaced to expire them in a test. ``script(status, ...)`` makes the next requests fail
    with those statuses (429 answers carry ``X-RateLimit-Reset: 1``). Thread-safe.
    """

    def __init__(
        self,
        *,
        audience: str | None = None,
        expires_in: int = 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self.expires_in = expires_in
        self._clock = clock
        self._lock = threading.Lock()
        self._clients: dict[str, _Client] = {}
        self._tokens: dict[str, tuple[str, float]] = {}
        self._script: list[int] = []
        self._requests: list[TokenRequest] = []

    def __repr__(self) -> str:
        return f"<TokenEndpoint {len(self._clients)} clients, {len(self._tokens)} tokens issued>"

    def register(self, client_id: str, public_key_pem: str | bytes, key_id: str) -> None:
        """Accept assertions from ``client_id`` signed by this key, with this ``kid``."""
        from cryptography.hazmat.primitives import serialization

        data = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
        key = serialization.load_pem_public_key(data)
        with self._lock:
            self._clients[client_id] = _Client(key, key_id)

    def script(self, *statuses: int) -> None:
        """Answer the next requests with these error statuses (then normally again)."""
        with self._lock:
            self._script.extend(statuses)

    @property
    def requests(self) -> list[TokenRequest]:
        """Every token request so far, in order (a new list)."""
        with self._lock:
            return list(self._requests)

    @property
    def tokens_issued(self) -> int:
        """How many access tokens were issued."""
        with self._lock:
            return len(self._tokens)

    def revoke_all(self) -> None:
        """Make every token issued so far invalid (the API then answers 401 to them)."""
        with self._lock:
            self._tokens.clear()

    def authorized(self, header: str | None) -> bool:
        """Whether ``header`` is ``Bearer <token>`` with a live token issued here."""
        if not header:
            return False
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        with self._lock:
            issued = self._tokens.get(token.strip())
        return issued is not None and self._clock() < issued[1]

    def handle(
        self, method: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """Answer one request to ``/token``: ``(status, headers, body)``."""
        now = self._clock()
        reply_headers = {
            "Content-Type": "application/json",
            "Date": formatdate(now, usegmt=True),
        }
        form: dict[str, str] = {}
        claims: dict[str, Any] = {}
        jwt_headers: dict[str, Any] = {}
        try:
            parsed = parse_qs(body.decode("ascii"), strict_parsing=True)
            form = {k: v[0] for k, v in parsed.items()}
        except (UnicodeDecodeError, ValueError):
            form = {}
        assertion = form.get("client_assertion", "")
        if assertion:
            claims, jwt_headers = _unverified(assertion)

        status, error, description, answer = self._decide(method, headers, form, assertion, now)
        if status == 429:
            reply_headers["X-RateLimit-Reset"] = "1"
        with self._lock:
            self._requests.append(
                TokenRequest(
                    now, form, claims, jwt_headers, status, error if status != 200 else None
                )
            )
        payload = answer if status == 200 else {"error": error, "error_description": description}
        return status, reply_headers, json.dumps(payload).encode()

    def _decide(
        self,
        method: str,
        headers: Mapping[str, str],
        form: Mapping[str, str],
        assertion: str,
        now: float,
    ) -> tuple[int, str, str, dict[str, Any]]:
        with self._lock:
            scripted = self._script.pop(0) if self._script else None
        if scripted is not None:
            return scripted, "scripted", f"scripted answer {scripted}", {}
        if method != "POST":
            return 405, "invalid_request", "use POST", {}
        content_type = next(
            (v for k, v in headers.items() if k.lower() == "content-type"), ""
        ).split(";")[0]
        if content_type.strip().lower() != "application/x-www-form-urlencoded":
            return 415, "invalid_request", "use application/x-www-form-urlencoded", {}
        if form.get("grant_type") != "client_credentials":
            return 400, "unsupported_grant_type", "grant_type must be client_credentials", {}
        if form.get("client_assertion_type") != _ASSERTION_TYPE or not assertion:
            return 400, "invalid_request", "a jwt-bearer client_assertion is required", {}
        verdict = self._verify(assertion, now)
        if verdict is not None:
            return verdict
        token = secrets.token_urlsafe(24)
        client_id = str(_unverified(assertion)[0].get("iss"))
        with self._lock:
            self._tokens[token] = (client_id, now + self.expires_in)
        scope = form.get("scope", "")
        return (
            200,
            "",
            "",
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": self.expires_in,
                "scope": scope,
            },
        )

    def _verify(self, assertion: str, now: float) -> tuple[int, str, str, dict[str, Any]] | None:
        import jwt

        claims, jwt_headers = _unverified(assertion)
        client_id = claims.get("iss")
        with self._lock:
            client = self._clients.get(client_id) if isinstance(client_id, str) else None
        if client is None:
            return 401, "invalid_client", "unknown client", {}
        if jwt_headers.get("kid") != client.key_id or jwt_headers.get("alg") != "RS256":
            return 401, "invalid_client", "unknown key id or algorithm", {}
        if claims.get("sub") != client_id:
            return 401, "invalid_client", "sub must equal iss", {}
        try:
            jwt.decode(
                assertion,
                client.public_key,
                algorithms=["RS256"],
                audience=self.audience,
                options={
                    "require": ["iss", "sub", "aud", "iat", "exp", "jti"],
                    "verify_aud": self.audience is not None,
                    # Checked below against this endpoint's clock, which a test may move.
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidAudienceError:
            return 401, "invalid_client", "wrong audience", {}
        except jwt.PyJWTError:
            return 401, "invalid_client", "the assertion does not verify", {}
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, (int, float)) or exp <= now:
            return 400, "invalid_request", "Token is expired", {}
        if not isinstance(iat, (int, float)) or iat > now + 5:
            return 400, "invalid_request", "Token used before issued", {}
        return None


def _unverified(assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The claims and header of a JWT, not verified (for recording and routing)."""
    import jwt

    try:
        claims = jwt.decode(assertion, options={"verify_signature": False})
        headers = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError:
        return {}, {}
    return dict(claims), dict(headers)
