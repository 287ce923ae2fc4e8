"""OAuth as segment does it, end to end on 127.0.0.1: a signed JWT, a token, Bearer requests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from durable_analytics.testing import Collector, TokenEndpoint, generate_key_pair

from .conftest import WRITE_KEY
from .harness import Lib, differs

CLIENT_ID = "client-compat-1"
KEY_ID = "key-compat-1"


@pytest.fixture(scope="module")
def key_pair() -> tuple[str, str]:
    return generate_key_pair()


@pytest.fixture
def endpoint(key_pair: tuple[str, str]) -> TokenEndpoint:
    endpoint = TokenEndpoint(expires_in=3600)
    endpoint.register(CLIENT_ID, key_pair[1], KEY_ID)
    return endpoint


@pytest.fixture
def bearer_collector(endpoint: TokenEndpoint) -> Iterator[Collector]:
    """A collector with no write key: only the endpoint's Bearer tokens are authorized."""
    with Collector(token_endpoint=endpoint) as collector:
        yield collector


def test_oauth_delivers_with_a_bearer_token_fetched_once(
    lib: Lib,
    bearer_collector: Collector,
    endpoint: TokenEndpoint,
    key_pair: tuple[str, str],
) -> None:
    """Ten calls: one token request with a valid RS256 assertion, every batch Bearer-authorized."""
    client = lib.client(
        WRITE_KEY,
        host=bearer_collector.url,
        oauth_client_id=CLIENT_ID,
        oauth_client_key=key_pair[0],
        oauth_key_id=KEY_ID,
        oauth_auth_server=bearer_collector.url,
    )
    for i in range(10):
        client.track("u", f"E{i}")
    client.flush()
    assert sorted(m["event"] for m in bearer_collector.messages()) == sorted(
        f"E{i}" for i in range(10)
    )
    assert all(b.authorized for b in bearer_collector.batches)
    assert all(b.headers["Authorization"].startswith("Bearer ") for b in bearer_collector.batches)
    [request] = endpoint.requests
    assert request.status == 200
    assert request.jwt_headers["alg"] == "RS256"
    assert request.jwt_headers["kid"] == KEY_ID
    assert (request.claims["iss"], request.claims["sub"]) == (CLIENT_ID, CLIENT_ID)
    assert request.claims["aud"] == bearer_collector.url
    assert request.form["scope"] == "tracking_api:write"
    assert request.form["grant_type"] == "client_credentials"


def test_oauth_scope_is_sent(
    lib: Lib,
    bearer_collector: Collector,
    endpoint: TokenEndpoint,
    key_pair: tuple[str, str],
) -> None:
    """``oauth_scope`` reaches the token request."""
    client = lib.client(
        WRITE_KEY,
        host=bearer_collector.url,
        oauth_client_id=CLIENT_ID,
        oauth_client_key=key_pair[0],
        oauth_key_id=KEY_ID,
        oauth_auth_server=bearer_collector.url,
        oauth_scope="tracking_api:write other:read",
    )
    client.track("u", "E")
    client.flush()
    assert endpoint.requests[0].form["scope"] == "tracking_api:write other:read"


def test_oauth_with_a_malformed_key(lib: Lib, bearer_collector: Collector) -> None:
    """A key that is not a PEM private key."""
    kwargs = {
        "oauth_client_id": CLIENT_ID,
        "oauth_client_key": "not a key",
        "oauth_key_id": KEY_ID,
        "oauth_auth_server": bearer_collector.url,
    }
    if differs(lib, "oauth-key-checked-early", segment=False, durable=True):
        with pytest.raises(ValueError, match="oauth_client_key"):
            lib.client(WRITE_KEY, send=False, **kwargs)
    else:
        lib.client(WRITE_KEY, send=False, **kwargs)
