"""OAuth: the token source against a real token endpoint on 127.0.0.1, with a movable clock."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from _rawserver import RawServer, read_request

from durable_analytics import Client
from durable_analytics._oauth import OAuthSettings, TokenResponse, TokenSource
from durable_analytics.exceptions import ConfigError, ConfigurationRejected, RetryableError
from durable_analytics.testing import Collector, TokenEndpoint, generate_key_pair

CLIENT_ID = "client-1"
KEY_ID = "key-1"


class Clock:
    """A wall clock a test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    return generate_key_pair()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def endpoint(keys: tuple[str, str], clock: Clock) -> TokenEndpoint:
    endpoint = TokenEndpoint(expires_in=600, clock=clock)
    endpoint.register(CLIENT_ID, keys[1], KEY_ID)
    return endpoint


@pytest.fixture
def server(endpoint: TokenEndpoint) -> Iterator[Collector]:
    """A collector serving the token endpoint at ``{url}/token``."""
    with Collector(token_endpoint=endpoint) as s:
        yield s


def source(
    server: Collector, keys: tuple[str, str], clock: Clock, *, key_id: str = KEY_ID
) -> TokenSource:
    settings = OAuthSettings.build(CLIENT_ID, keys[0], key_id, server.url)
    assert settings is not None
    return TokenSource(settings, timeout=5, clock=clock)


def test_one_token_serves_many_requests(
    server: Collector, endpoint: TokenEndpoint, keys: tuple[str, str], clock: Clock
) -> None:
    """The token is fetched once and reused; the endpoint sees one request."""
    tokens = source(server, keys, clock)
    headers = {tokens.authorization() for _ in range(20)}
    assert len(headers) == 1
    [header] = headers
    assert header.startswith("Bearer ")
    assert endpoint.authorized(header)
    assert tokens.requests == 1
    assert len(endpoint.requests) == 1


def test_token_is_replaced_at_half_life_before_it_expires(
    server: Collector, endpoint: TokenEndpoint, keys: tuple[str, str], clock: Clock
) -> None:
    """Past half its lifetime (300 of 600 s) the next delivery gets a new, live token."""
    tokens = source(server, keys, clock)
    first = tokens.authorization()
    clock.now += 299
    assert tokens.authorization() == first
    clock.now += 2
    second = tokens.authorization()
    assert second != first
    assert tokens.requests == 2
    assert endpoint.authorized(first)  # the old one had not expired yet
    clock.now += 300
    assert not endpoint.authorized(first)
    assert endpoint.authorized(second)


def test_invalidate_fetches_anew_but_ignores_a_stale_refusal(
    server: Collector, endpoint: TokenEndpoint, keys: tuple[str, str], clock: Clock
) -> None:
    """A refused token is dropped once; a late refusal of that old token keeps the new one."""
    tokens = source(server, keys, clock)
    old = tokens.authorization()
    endpoint.revoke_all()
    tokens.invalidate(old)
    new = tokens.authorization()
    assert new != old
    tokens.invalidate(old)
    assert tokens.authorization() == new
    assert tokens.requests == 2


def test_unknown_key_id_is_a_configuration_error_that_names_no_secret(
    server: Collector, keys: tuple[str, str], clock: Clock
) -> None:
    """401 from the endpoint: ``ConfigurationRejected``; neither key nor assertion in it."""
    tokens = source(server, keys, clock, key_id="wrong-key-id")
    with pytest.raises(ConfigurationRejected) as raised:
        tokens.authorization()
    text = str(raised.value)
    assert raised.value.status == 401
    assert "oauth_key_id" in text
    assert "PRIVATE KEY" not in text
    assert "eyJ" not in text  # no JWT


def test_a_key_the_endpoint_does_not_know_is_refused(server: Collector, clock: Clock) -> None:
    """An assertion signed with another key does not verify."""
    other_private, _ = generate_key_pair()
    settings = OAuthSettings.build(CLIENT_ID, other_private, KEY_ID, server.url)
    assert settings is not None
    with pytest.raises(ConfigurationRejected):
        TokenSource(settings, clock=clock).authorization()


@pytest.mark.parametrize("status", [500, 503])
def test_server_error_is_retryable_and_the_next_call_succeeds(
    server: Collector, endpoint: TokenEndpoint, keys: tuple[str, str], clock: Clock, status: int
) -> None:
    """5xx from the endpoint: ``RetryableError``; the next delivery fetches again."""
    endpoint.script(status)
    tokens = source(server, keys, clock)
    with pytest.raises(RetryableError):
        tokens.authorization()
    assert tokens.authorization().startswith("Bearer ")


def test_rate_limit_is_honoured_without_another_request(
    server: Collector, endpoint: TokenEndpoint, keys: tuple[str, str], clock: Clock
) -> None:
    """429 with ``X-RateLimit-Reset: 1``: no token request until that second has passed."""
    endpoint.script(429)
    tokens = source(server, keys, clock)
    with pytest.raises(RetryableError):
        tokens.authorization()
    with pytest.raises(RetryableError, match="wait"):
        tokens.authorization()
    assert tokens.requests == 1
    clock.now += 1.5
    assert tokens.authorization().startswith("Bearer ")
    assert tokens.requests == 2


def test_unreachable_endpoint_is_retryable(keys: tuple[str, str], clock: Clock) -> None:
    """Nothing listening: ``RetryableError`` (the batch is kept), not a crash."""
    settings = OAuthSettings.build(CLIENT_ID, keys[0], KEY_ID, "http://127.0.0.1:9")
    assert settings is not None
    with pytest.raises(RetryableError, match="failed"):
        TokenSource(settings, timeout=2, clock=clock).authorization()


def test_clock_ahead_of_the_server_is_corrected_from_its_date_header(
    server: Collector, endpoint: TokenEndpoint, keys: tuple[str, str]
) -> None:
    """Our clock 100 s ahead: 'used before issued', then one retry with the server's time."""
    ahead = Clock(1_800_000_100.0)
    tokens = source(server, keys, ahead)
    assert tokens.authorization().startswith("Bearer ")
    assert [r.status for r in endpoint.requests] == [400, 200]


def test_secrets_stay_out_of_repr_and_logs(
    server: Collector,
    keys: tuple[str, str],
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Neither the private key nor the token shows in a repr or a debug log line."""
    caplog.set_level(logging.DEBUG, logger="durable_analytics")
    tokens = source(server, keys, clock)
    token = tokens.authorization().split(" ", 1)[1]
    settings = OAuthSettings.build(CLIENT_ID, keys[0], KEY_ID, server.url)
    shown = repr(tokens) + repr(settings) + caplog.text
    assert token not in shown
    assert "PRIVATE KEY" not in shown
    assert keys[0].splitlines()[1] not in shown
    assert "a token" in repr(tokens)


def test_settings_need_all_three_identifying_values(keys: tuple[str, str]) -> None:
    """Some but not all of id, key and key id: ``ConfigError`` naming the missing ones."""
    assert OAuthSettings.build(None, None, None) is None
    with pytest.raises(ConfigError, match="oauth_key_id"):
        OAuthSettings.build(CLIENT_ID, keys[0], None)


def test_a_malformed_key_is_refused_without_quoting_it() -> None:
    """A key that is not PEM: ``ConfigError`` that does not repeat it."""
    with pytest.raises(ConfigError, match="oauth_client_key") as raised:
        OAuthSettings.build(CLIENT_ID, "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n", KEY_ID)
    assert "c2VjcmV0" not in str(raised.value)


def test_a_non_rsa_key_is_refused() -> None:
    """An EC key cannot sign RS256."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    with pytest.raises(ConfigError, match="RSA"):
        OAuthSettings.build(CLIENT_ID, pem, KEY_ID)


def test_endpoint_refuses_a_wrong_audience_and_an_expired_assertion(
    server: Collector, endpoint: TokenEndpoint, keys: tuple[str, str], clock: Clock
) -> None:
    """The test endpoint checks what Segment's server checks: audience and expiry."""
    endpoint.audience = "https://oauth2.segment.io"
    with pytest.raises(ConfigurationRejected):
        source(server, keys, clock).authorization()
    endpoint.audience = server.url
    behind = Clock(clock.now - 120)  # every assertion it signs is already expired
    tokens = source(server, keys, behind)
    # The first answer teaches it the skew; the retry then succeeds.
    assert tokens.authorization().startswith("Bearer ")
    assert [r.error for r in endpoint.requests[-2:]] == ["invalid_request", None]


class ScriptedPoster:
    """A token endpoint that answers what the test says (a server we cannot make misbehave)."""

    def __init__(self, status: int, body: bytes | None = None, echo: bool = False) -> None:
        self.status = status
        self.body = body
        self.echo = echo

    def __call__(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> TokenResponse:
        if self.echo:
            assertion = parse_qs(body.decode())["client_assertion"][0]
            answer = {"error": "invalid_client", "error_description": f"bad {assertion}"}
            return TokenResponse(self.status, {}, json.dumps(answer).encode())
        return TokenResponse(self.status, {}, self.body or b"{}")


@pytest.mark.parametrize("token", ["", "a b", "abc\r\nX-Injected: 1", "tökén", 42])
def test_a_malformed_access_token_is_refused_not_sent(
    keys: tuple[str, str], clock: Clock, token: object
) -> None:
    """A token that could not be a header value (or is empty) is a retryable failure."""
    settings = OAuthSettings.build(CLIENT_ID, keys[0], KEY_ID, "https://auth.example.test")
    assert settings is not None
    answer = json.dumps({"access_token": token, "expires_in": 60}).encode()
    tokens = TokenSource(settings, poster=ScriptedPoster(200, answer), clock=clock)
    with pytest.raises(RetryableError, match="malformed"):
        tokens.authorization()


def test_an_echoed_assertion_is_scrubbed_from_the_error(
    keys: tuple[str, str], clock: Clock
) -> None:
    """A server that quotes the signed assertion back: the exception does not carry it."""
    settings = OAuthSettings.build(CLIENT_ID, keys[0], KEY_ID, "https://auth.example.test")
    assert settings is not None
    tokens = TokenSource(settings, poster=ScriptedPoster(401, echo=True), clock=clock)
    with pytest.raises(ConfigurationRejected) as raised:
        tokens.authorization()
    assert "<assertion>" in str(raised.value)
    assert "eyJ" not in str(raised.value)


def test_a_flusher_process_delivers_with_oauth_too(keys: tuple[str, str], queue_path: Path) -> None:
    """``flusher="process"``: the child gets the OAuth settings and sends Bearer batches."""
    endpoint = TokenEndpoint()
    endpoint.register(CLIENT_ID, keys[1], KEY_ID)
    with Collector(token_endpoint=endpoint) as collector:
        client = Client(
            "WRITE_KEY",
            host=collector.url,
            queue_path=queue_path,
            flusher="process",
            flush_at=1,
            oauth_client_id=CLIENT_ID,
            oauth_client_key=keys[0],
            oauth_key_id=KEY_ID,
            oauth_auth_server=collector.url,
        )
        try:
            client.track("u", "From The Child")
            assert collector.wait_for_messages(1, timeout=30)
        finally:
            client.close(timeout=5)
    [batch] = [b for b in collector.batches if b.messages]
    assert batch.authorized
    assert batch.headers["Authorization"].startswith("Bearer ")
    assert len(endpoint.requests) == 1


def _stalling_endpoint(
    raw_server: Callable[..., RawServer], stop: threading.Event, trickle: bool
) -> tuple[RawServer, threading.Event]:
    """A token endpoint that reads the request, then for a minute answers a byte every 50 ms
    (``trickle``) or nothing; the event is set if that minute ran out."""
    ran_out = threading.Event()

    def handler(conn: socket.socket) -> None:
        read_request(conn)
        if trickle:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(1200):
            if stop.wait(0.05):
                return
            if trickle:
                conn.sendall(b"a")
        ran_out.set()

    return raw_server(handler), ran_out


def test_flush_returns_by_its_timeout_while_the_token_endpoint_trickles(
    keys: tuple[str, str], queue_path: Path, raw_server: Callable[..., RawServer]
) -> None:
    """A token endpoint answering a byte every 50 ms kept each of urllib3's reads within its
    timeout, and ``flush(timeout=0.5)`` waited as long as the endpoint went on (a minute
    here). It now returns while the endpoint is still trickling; the message stays queued."""
    stop = threading.Event()
    endpoint, ran_out = _stalling_endpoint(raw_server, stop, trickle=True)
    with Collector() as collector:
        client = Client(
            "WRITE_KEY",
            host=collector.url,
            queue_path=queue_path,
            flusher="none",
            on_exit="none",
            timeout=5,
            oauth_client_id=CLIENT_ID,
            oauth_client_key=keys[0],
            oauth_key_id=KEY_ID,
            oauth_auth_server=endpoint.url,
        )
        try:
            client.track("u", "Kept")
            result = client.flush(timeout=0.5)
            assert not ran_out.is_set()  # it returned while the endpoint was still trickling
        finally:
            stop.set()
        assert (result.sent, result.pending) == (0, 1)
        assert collector.requests == 0
        client.close(timeout=0)


def test_a_caller_waits_for_another_threads_token_request_no_longer_than_its_timeout(
    keys: tuple[str, str], raw_server: Callable[..., RawServer]
) -> None:
    """One thread's token request (budget 30 s) hangs on a silent endpoint; another thread
    asking with 0.2 s left gets a RetryableError while the first is still waiting, instead
    of waiting on the token lock for the first one's whole budget."""
    stop = threading.Event()
    endpoint, ran_out = _stalling_endpoint(raw_server, stop, trickle=False)
    settings = OAuthSettings.build(CLIENT_ID, keys[0], KEY_ID, endpoint.url)
    assert settings is not None
    tokens = TokenSource(settings, timeout=30)
    failed: list[Exception] = []

    def first_caller() -> None:
        try:
            tokens.authorization()
        except RetryableError as exc:
            failed.append(exc)

    first = threading.Thread(target=first_caller, daemon=True)
    try:
        first.start()
        while tokens.requests == 0:  # the first thread holds the lock, its request sent
            time.sleep(0.005)
        with pytest.raises(RetryableError, match="another thread"):
            tokens.authorization(timeout=0.2)
        assert first.is_alive()  # the first request is still waiting on the endpoint
        assert not ran_out.is_set()
    finally:
        stop.set()
    first.join(10)
    assert failed  # the endpoint closed without answering: a retryable failure
