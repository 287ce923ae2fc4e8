"""Fixtures of the differential suite: ``lib`` runs each scenario on both libraries.

``@pending(reason)`` marks a scenario durable-analytics does not pass yet: its durable run
is ``xfail(strict=True)``, so the suite stays green and the mark must go once it passes.
The segment run is never marked: it proves the scenario states segment's real behaviour.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import segment.analytics as segment_analytics

import durable_analytics
from durable_analytics.testing import Collector

from .harness import Lib, make_libs

F = TypeVar("F", bound=Callable[..., Any])

WRITE_KEY = "compat-write-key-0001"

#: segment's module-level settings with their defaults, restored around every test.
SEGMENT_SETTINGS = {
    name: getattr(segment_analytics, name)
    for name in (
        "write_key",
        "host",
        "on_error",
        "debug",
        "log_handler",
        "send",
        "sync_mode",
        "max_queue_size",
        "gzip",
        "timeout",
        "max_retries",
        "oauth_client_id",
        "oauth_client_key",
        "oauth_key_id",
        "oauth_auth_server",
        "oauth_scope",
    )
}
#: Our module's public non-callable attributes at import: its settings and constants.
DURABLE_SETTINGS = {
    name: value
    for name, value in vars(durable_analytics).items()
    if not name.startswith("_")
    and not callable(value)
    and not isinstance(value, type(durable_analytics))
}


def pending(reason: str) -> Callable[[F], F]:
    """Mark a scenario that durable-analytics does not pass yet (xfail, strict)."""
    return pytest.mark.compat_pending(reason=reason)  # type: ignore[no-any-return]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "compat_pending(reason): durable-analytics does not pass this scenario yet"
    )
    config.addinivalue_line(
        "markers", "difference(key): the test pins a row of tests/compat/differences.py"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("compat_pending")
        callspec = getattr(item, "callspec", None)
        if marker is None or callspec is None or callspec.params.get("lib") != "durable":
            continue
        item.add_marker(pytest.mark.xfail(strict=True, reason=marker.kwargs["reason"]))


@pytest.fixture(params=["segment", "durable"])
def lib(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Lib]:
    """Each library in turn, with its module-level settings at their defaults."""
    made = make_libs()[request.param]()
    # The same constructor call must work on both: our queue file comes from the
    # environment, as a deployment would set it, not from an extra argument.
    directory = tmp_path / "queue"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("DURABLE_ANALYTICS_QUEUE", str(directory / "queue.sqlite3"))
    for name in ("DURABLE_ANALYTICS_WRITE_KEY", "DURABLE_ANALYTICS_HOST", "DEBUG"):
        monkeypatch.delenv(name, raising=False)
    settings = SEGMENT_SETTINGS if made.is_segment else DURABLE_SETTINGS
    for name, value in settings.items():
        monkeypatch.setattr(made.module, name, value)
    monkeypatch.setattr(made.module, "default_client", None)
    segment_logger = logging.getLogger("segment")
    ours = logging.getLogger("durable_analytics")
    levels = (segment_logger.level, ours.level)
    handlers = (list(segment_logger.handlers), list(ours.handlers))
    yield made
    default = made.module.default_client
    if default is not None:
        made.made.append(default)
    for client in made.made:
        made.stop(client)
    segment_logger.setLevel(levels[0])
    ours.setLevel(levels[1])
    segment_logger.handlers[:] = handlers[0]
    ours.handlers[:] = handlers[1]


@pytest.fixture
def collector() -> Iterator[Collector]:
    """A real Segment-compatible server on 127.0.0.1 checking ``WRITE_KEY``."""
    with Collector(WRITE_KEY) as c:
        yield c
