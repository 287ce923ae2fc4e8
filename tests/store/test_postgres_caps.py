"""The PostgreSQL queue's caps under a fleet: ``max_queue_size`` with concurrent sessions,
and the ``drop_oldest`` warning (the single-queue rules are in test_contract.py).

Each ``PostgresQueue`` has its own connections, so two of them are two sessions appending
at once, as two processes would.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

import pytest
from conftest import WRITE_KEY

from durable_analytics import Client
from durable_analytics._store import drops as _drops
from durable_analytics._store.postgres._caps import COUNT_EVERY
from durable_analytics._store.postgres._queue import PostgresQueue
from durable_analytics.testing import Collector

HOST = "https://collector.test"
KEY = "write-key-caps"


def append_at_once(queues: list[PostgresQueue], each: int, pad: int = 10) -> list[list[int]]:
    """Every queue appends ``each`` messages from its own thread, all started together."""
    results: list[list[int]] = [[] for _ in queues]
    start = threading.Barrier(len(queues))

    def run(i: int) -> None:
        queue = queues[i]
        dest = queue.destination(HOST, KEY)
        start.wait()
        for n in range(each):
            results[i].append(queue.append(dest, b'{"q":%d,"n":%d,"p":"%s"}' % (i, n, b"x" * pad)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(queues))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
def test_sessions_appending_at_the_count_cap_at_once_never_both_take_the_last_place(
    open_pg: Callable[..., PostgresQueue], overflow: str
) -> None:
    """Near max_queue_size every append counts under the queue's lock: four sessions racing
    for the last places leave exactly the cap stored, and every refused or displaced
    message counted as dropped."""
    cap = 60
    first = open_pg(max_queue_size=cap, overflow=overflow)
    dest = first.destination(HOST, KEY)
    assert all(first.append(dest, b'{"pre":%d}' % i) for i in range(cap - 5))
    racers = [open_pg(max_queue_size=cap, overflow=overflow) for _ in range(4)]
    results = append_at_once(racers, 25)
    stats = first.stats()
    assert stats.pending == cap
    stored = sum(1 for r in results for x in r if x)
    assert stats.dropped == (cap - 5) + 100 - cap
    if overflow == "drop_newest":
        assert stored == 5
    else:
        assert stored == 100  # each new one took an old one's place
        assert first.stats().pending == cap


def test_a_fleet_passes_the_count_cap_by_at_most_count_every_per_session_and_counts_all(
    open_pg: Callable[..., PostgresQueue],
) -> None:
    """Sessions that start far below the cap append uncounted until their next count: the
    documented bound is COUNT_EVERY messages per appending session, and each message is
    either stored or counted as dropped."""
    cap = 300
    sessions = [open_pg(max_queue_size=cap, overflow="drop_newest") for _ in range(4)]
    append_at_once(sessions, 150)
    stats = sessions[0].stats()
    assert cap <= stats.pending <= cap + COUNT_EVERY * len(sessions)
    assert stats.pending + stats.dropped == 600


def test_leased_messages_count_and_an_ack_makes_room_for_another_session(
    open_pg: Callable[..., PostgresQueue],
) -> None:
    """A session's estimate is no excuse: what another session acked frees the place."""
    producer = open_pg(max_queue_size=3)
    consumer = open_pg(max_queue_size=3)
    dest = producer.destination(HOST, KEY)
    assert all(producer.append(dest, b'{"n":%d}' % i) for i in range(3))
    assert producer.append(dest, b'{"n":3}') == 0
    lease = consumer.lease(10, 1 << 20)
    assert lease is not None
    assert producer.append(dest, b'{"n":4}') == 0  # leased: not delivered, still counted
    assert consumer.ack(lease) == 3
    assert producer.append(dest, b'{"n":5}') > 0
    assert producer.stats().dropped == 2


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "durable_analytics.queue" and r.levelno == logging.WARNING
    ]


@pytest.mark.parametrize("cap", ["bytes", "count"])
def test_drop_oldest_warns_at_once_then_once_a_minute_with_the_count(
    open_pg: Callable[..., PostgresQueue],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    cap: str,
) -> None:
    """As the other backends: the first drop is told at once naming the cap, later ones
    wait out WARN_EVERY and are told with their count; stats().dropped counts every one."""
    caplog.set_level(logging.WARNING, logger="durable_analytics.queue")
    settings: dict[str, object] = {"overflow": "drop_oldest", "max_queue_bytes": 64 * 1024}
    if cap == "count":
        settings["max_queue_size"] = 20
    queue = open_pg(**settings)
    dest = queue.destination(HOST, KEY)
    pad = b"x" * 1000
    for i in range(100):
        assert queue.append(dest, b'{"n":%d,"p":"%s"}' % (i, pad)) > 0
    dropped = queue.stats().dropped
    assert dropped > 2
    told = warnings_of(caplog)
    assert len(told) == 1
    found = re.search(r"dropped the (\d+) oldest undelivered messages? to make room", told[0])
    assert found is not None, told[0]
    first = int(found.group(1))
    assert 1 <= first < dropped
    assert "max_queue_bytes=65536" in told[0]
    assert ("max_queue_size=20" in told[0]) == (cap == "count")
    monkeypatch.setattr(_drops, "WARN_EVERY", 0.0)
    assert queue.append(dest, b'{"n":100,"p":"%s"}' % pad) > 0
    last = warnings_of(caplog)[-1]
    since = queue.stats().dropped - first
    assert f"dropped the {since} oldest undelivered messages since the last warning" in last


def test_a_client_with_max_queue_size_on_postgres_refuses_past_it(
    collector: Collector, pg_dsn: str, pg_schema: str
) -> None:
    """Client(max_queue_size=, queue_url=) is no longer refused: the call past the cap
    returns (False, message) and stats() counts it."""
    url = f"{pg_dsn}&schema={pg_schema}"
    client = Client(
        WRITE_KEY,
        host=collector.url,
        queue_url=url,
        max_queue_size=3,
        flusher="none",
        on_exit="none",
    )
    try:
        results = [client.track("u", "E")[0] for _ in range(5)]
        assert results == [True, True, True, False, False]
        assert client.stats().dropped == 2
    finally:
        client.close(timeout=0)
