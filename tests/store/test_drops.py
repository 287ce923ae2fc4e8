"""The WARNING a queue gives when a cap drops its oldest messages, on every backend.

One line per minute at most, naming the cap that was hit (``max_queue_bytes`` or
``max_queue_size``) and how many messages went; the drops are counted in ``stats()``
whether or not a line is logged.
"""

from __future__ import annotations

import logging

import pytest

from durable_analytics._store import QueueBackend

from .conftest import OpenBackend

HOST = "https://collector.test"
KEY = "drops-key"


def drop_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "durable_analytics.queue" and "oldest undelivered" in r.getMessage()
    ]


def count_capped(open_backend: OpenBackend, **settings: object) -> QueueBackend:
    try:
        return open_backend(**settings)
    except TypeError:
        pytest.skip("this backend has no max_queue_size (count cap) yet")


def test_the_count_cap_dropping_the_oldest_is_logged_naming_max_queue_size(
    open_backend: OpenBackend, caplog: pytest.LogCaptureFixture
) -> None:
    queue = count_capped(open_backend, max_queue_size=3, overflow="drop_oldest")
    dest = queue.destination(HOST, KEY)
    caplog.set_level(logging.WARNING, logger="durable_analytics.queue")
    for i in range(5):
        assert queue.append(dest, b'{"messageId":"m%d"}' % i)
    assert queue.stats().dropped == 2
    lines = drop_lines(caplog)
    assert len(lines) == 1  # rate-limited: the second drop waits for the next line
    assert "max_queue_size=3" in lines[0]
    assert "dropped the 1 oldest undelivered message " in lines[0]
