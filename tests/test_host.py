"""The ``host`` setting: a base URL (``/v1/batch`` is appended), and when plain http:// warns."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from durable_analytics import Client, ConfigError
from durable_analytics._urls import is_loopback_host, normalize_host
from tests.conftest import WRITE_KEY


@pytest.mark.parametrize(
    ("host", "base"),
    [
        ("https://api.segment.io/v1/batch", "https://api.segment.io"),
        ("https://api.segment.io/v1/batch/", "https://api.segment.io"),
        ("https://api.segment.io/v1", "https://api.segment.io"),
        ("https://api.segment.io/v1/track", "https://api.segment.io"),
        ("https://events.example.com/batch", "https://events.example.com"),
        ("https://proxy.example.com/segment/v1/batch", "https://proxy.example.com/segment"),
        ("http://127.0.0.1:8080/V1/Batch", "http://127.0.0.1:8080"),
        ("https://api.example.com/v1//batch", "https://api.example.com"),
        ("https://v1/v1/batch", "https://v1"),
    ],
)
def test_a_host_holding_the_api_path_is_refused_at_construction_naming_the_base(
    host: str, base: str, tmp_path: Path
) -> None:
    """Accepted, it would POST to .../v1/batch/v1/batch and every batch would get a 404."""
    queue_path = tmp_path / "q" / "queue.sqlite3"
    with pytest.raises(ConfigError) as caught:
        Client(WRITE_KEY, host=host, queue_path=queue_path, flusher="none", on_exit="none")
    text = str(caught.value)
    assert "the library appends /v1/batch itself" in text
    assert f"use {base!r}" in text
    assert WRITE_KEY not in text
    assert not queue_path.parent.exists()  # refused before anything was created


@pytest.mark.parametrize(
    "host",
    [
        "https://proxy.example.com/segment",
        "https://proxy.example.com/analytics/",
        "https://proxy.example.com/v10",
        "https://proxy.example.com/batches",
    ],
)
def test_a_path_prefix_of_a_proxy_is_kept(host: str) -> None:
    """segment-analytics-python posts to {host}/v1/batch whatever the path: so does this."""
    assert normalize_host(host) == host.rstrip("/")


def test_the_environment_host_is_checked_the_same_way(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DURABLE_ANALYTICS_HOST", "https://api.segment.io/v1/batch")
    with pytest.raises(ConfigError, match=re.escape("use 'https://api.segment.io'")):
        Client(WRITE_KEY, queue_path=tmp_path / "q.sqlite3", flusher="none", on_exit="none")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("http://127.0.0.1:8080", True),
        ("http://127.9.8.7", True),
        ("http://localhost:3000", True),
        ("http://LOCALHOST.:3000", True),
        ("http://collector.localhost", True),
        ("http://[::1]:8080", True),
        ("http://[::ffff:127.0.0.1]:8080", True),
        ("http://10.0.0.5:8080", False),
        ("http://0.0.0.0:8080", False),
        ("http://[::ffff:10.0.0.1]", False),
        ("http://localhost.example.com", False),
        ("http://127.0.0.1.nip.io", False),
        ("http://analytics.example.com", False),
    ],
)
def test_plain_http_warns_only_for_a_host_off_this_machine(
    host: str, loopback: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A local collector, test server or sidecar is not a leak; anything else is."""
    caplog.set_level(logging.WARNING, logger="durable_analytics")
    assert is_loopback_host(host) is loopback
    Client(WRITE_KEY, host=host, queue_path=tmp_path / "q.sqlite3", flusher="none", on_exit="none")
    warned = [
        r
        for r in caplog.records
        if r.name == "durable_analytics.client" and "plain http://" in r.getMessage()
    ]
    assert len(warned) == (0 if loopback else 1)
    assert all(WRITE_KEY not in r.getMessage() for r in caplog.records)


def test_https_never_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="durable_analytics")
    Client(
        WRITE_KEY,
        host="https://analytics.example.com",
        queue_path=tmp_path / "q.sqlite3",
        flusher="none",
        on_exit="none",
    )
    assert not [r for r in caplog.records if "plain http://" in r.getMessage()]


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("http://127.0.0.1:99999", "port 99999, outside 1-65535"),
        ("http://127.0.0.1:0", "port 0, outside 1-65535"),
        ("http://[::1]:65536", "port 65536, outside 1-65535"),
        ("http://example.com:abc", "invalid port 'abc'"),
        ("http://example.com:-1", "invalid port '-1'"),
        ("http://example.com:", "invalid port ''"),
        ("http://[::1", "is not a valid URL"),
        ("http://[::1:8080", "is not a valid URL"),
        ("http://[not-an-address]", "invalid IPv6 address [not-an-address]"),
        ("http://[v1.x]", "invalid IPv6 address [v1.x]"),
        ("http://[::1]x:8080", "'x:8080' after its IPv6 address"),
        ("http://::1:8080", "an IPv6 address must be in brackets"),
        ("http://example..com", "invalid host name 'example..com'"),
        ("http://-example.com", "invalid host name '-example.com'"),
        ("http://exa%20mple.com", "invalid host name 'exa%20mple.com'"),
        ("http://:8080", "invalid host name ''"),
    ],
)
def test_a_malformed_host_is_a_config_error_at_construction_naming_the_problem(
    host: str, problem: str, tmp_path: Path
) -> None:
    """Accepted, it was stored with every message and failed only at delivery, retried forever
    (an out-of-range port), or raised a bare ValueError from urlsplit (a bad IPv6 literal)."""
    queue_path = tmp_path / "q" / "queue.sqlite3"
    with pytest.raises(ConfigError) as caught:
        Client(WRITE_KEY, host=host, queue_path=queue_path, flusher="none", on_exit="none")
    assert problem in str(caught.value)
    assert not queue_path.parent.exists()  # refused before anything was stored


@pytest.mark.parametrize(
    "host",
    [
        "http://127.0.0.1:1",
        "http://127.0.0.1:65535",
        "http://[::1]:8080",
        "http://[fe80::1%25eth0]:8080",
        "https://bücher.example",
        "http://collector_1.internal:8080",
        "https://api.segment.io.",
    ],
)
def test_well_formed_hosts_at_the_edges_are_accepted(host: str) -> None:
    assert normalize_host(host) == host
