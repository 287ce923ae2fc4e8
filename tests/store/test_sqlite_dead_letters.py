"""Dead letters and stats of the SQLite queue.

Each test's name states the behaviour it proves. Child processes are real (``start_python``,
``os.fork``); the heavier multi-process runs live in tests/reliability/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from durable_analytics._store.sqlite import SqliteQueue as Queue

from .sqlite_helpers import (
    HOST,
    KEY,
    OTHER_HOST,
    OTHER_KEY,
    body,
    fill,
    index,
)

# --------------------------------------------------------------------------- dead letters


def test_dead_letter_moves_messages_with_status_reason_and_excerpt(queue: Queue, dest: int) -> None:
    ids = fill(queue, dest, 3)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    moved = queue.dead_letter(
        lease, [ids[1]], status=400, reason="HTTP 400: invalid", excerpt='{"error":"bad"}'
    )
    assert moved == 1
    assert queue.ack(lease) == 2
    assert queue.pending() == 0
    letters = queue.dead_letters()
    assert len(letters) == 1
    dl = letters[0]
    assert dl.status == 400
    assert dl.reason == "HTTP 400: invalid"
    assert dl.excerpt == '{"error":"bad"}'
    assert dl.body == body(1)
    assert dl.type == "track"
    assert dl.event == "E"
    assert dl.message_id == "m-1"
    assert dl.attempts == 1
    assert dl.host == HOST
    assert dl.write_key == KEY[:4] + "…"
    assert KEY not in repr(dl)
    assert dl.as_dict()["body"]["properties"]["i"] == 1
    assert queue.stats().dead_letters == 1
    assert queue.dead_letters([dl.id]) == [dl]
    assert queue.dead_letters([dl.id + 1000]) == []
    assert queue.dead_letters([]) == []


def test_dead_letter_truncates_long_reasons_and_excerpts(queue: Queue, dest: int) -> None:
    queue.append(dest, body(0))
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    queue.dead_letter(lease, lease.ids, status=413, reason="r" * 5000, excerpt="e" * 50_000)
    dl = queue.dead_letters()[0]
    assert len(dl.reason) <= 500
    assert len(dl.excerpt) <= 2000


def test_requeue_dead_letters_puts_all_or_chosen_ones_back(queue: Queue, dest: int) -> None:
    fill(queue, dest, 4)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    assert queue.dead_letter(lease, lease.ids, status=422, reason="bad") == 4
    letters = queue.dead_letters()
    assert [index(d.body) for d in letters] == [0, 1, 2, 3]

    assert queue.requeue_dead_letters([letters[2].id]) == 1
    assert [index(b) for b in queue.bodies()] == [2]
    assert queue.requeue_dead_letters([]) == 0
    assert queue.requeue_dead_letters() == 3
    assert queue.dead_letters() == []
    assert sorted(index(b) for b in queue.bodies()) == [0, 1, 2, 3]
    again = queue.lease(10, 1_000_000)
    assert again is not None
    assert len(again) == 4
    assert again.attempts == 0  # a requeued message starts over


def test_purge_dead_letters_deletes_all_or_chosen_ones(queue: Queue, dest: int) -> None:
    fill(queue, dest, 3)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    queue.dead_letter(lease, lease.ids, status=400, reason="bad")
    letters = queue.dead_letters()
    assert queue.purge_dead_letters([letters[0].id]) == 1
    assert len(queue.dead_letters()) == 2
    assert queue.purge_dead_letters() == 2
    assert queue.dead_letters() == []
    assert queue.pending() == 0
    assert queue.stats().dead_letters == 0


# --------------------------------------------------------------------------- stats


def test_stats_counts_pending_leased_dead_letters_bytes_and_age(queue: Queue, dest: int) -> None:
    empty = queue.stats()
    assert (empty.pending, empty.leased, empty.dead_letters, empty.bytes) == (0, 0, 0, 0)
    assert empty.oldest_age_seconds is None
    assert empty.dropped == 0
    assert empty.last_error is None

    bodies = [body(i, pad=i * 10) for i in range(6)]
    for i, b in enumerate(bodies):
        queue.append(dest, b, enqueued_at=time.time() - 100 + i)
    lease = queue.lease(2, 1_000_000)
    assert lease is not None
    dead = queue.lease(1, 1_000_000)
    assert dead is not None
    queue.dead_letter(dead, dead.ids, status=400, reason="bad")

    s = queue.stats()
    assert s.pending == 5  # leased messages are still pending
    assert s.leased == 2
    assert s.dead_letters == 1
    assert s.bytes == sum(len(b) for i, b in enumerate(bodies) if i != 2)
    assert s.oldest_age_seconds is not None
    assert 99 <= s.oldest_age_seconds <= 110
    assert len(s.destinations) == 1
    d = s.destinations[0]
    assert (d.host, d.pending, d.leased) == (HOST, 5, 2)
    assert set(s.as_dict()) == {
        "pending",
        "leased",
        "dead_letters",
        "bytes",
        "oldest_age_seconds",
        "dropped",
        "last_error",
        "destinations",
        "wal_bytes",
        "spooled",
    }


def test_stats_leased_counts_only_rows_under_live_leases(queue_path: Path) -> None:
    q = Queue(queue_path, lease_timeout=0.05)
    dest_id = q.destination(HOST, KEY)
    ids = fill(q, dest_id, 5)
    lease = q.lease(10, 1_000_000)
    assert lease is not None
    assert q.stats().leased == 5
    q.ack(lease, ids[:2])
    assert q.stats().leased == 3  # the acked ones are gone, not leased
    time.sleep(0.1)
    s = q.stats()  # expired, not yet reclaimed by anyone: no longer leased
    assert (s.pending, s.leased) == (3, 0)
    assert s.destinations[0].leased == 0
    q.close()


def test_stats_last_error_and_backoff_after_set_backoff(queue: Queue) -> None:
    a = queue.destination(HOST, KEY)
    b = queue.destination(OTHER_HOST, OTHER_KEY)
    queue.set_backoff(a, time.time() + 60, "HTTP 503 from the server")
    time.sleep(0.01)
    queue.set_backoff(b, time.time() + 60, "connection refused")
    s = queue.stats()
    assert s.last_error is not None
    assert s.last_error["message"] == "connection refused"
    assert s.last_error["host"] == OTHER_HOST
    assert s.last_error["at"].endswith("+00:00")
    by_host = {d.host: d for d in s.destinations}
    assert by_host[HOST].last_error == "HTTP 503 from the server"
    assert by_host[HOST].failures == 1
    assert by_host[HOST].backoff_until is not None
    queue.clear_backoff(a)
    assert {d.host: d for d in queue.stats().destinations}[HOST].backoff_until is None


def test_stats_destinations_show_a_redacted_key_and_never_the_full_key(queue: Queue) -> None:
    d = queue.destination(HOST, KEY)
    queue.append(d, body(0))
    lease = queue.lease(1, 1_000_000)
    assert lease is not None
    s = queue.stats()
    assert s.destinations[0].write_key == KEY[:4] + "…"
    assert s.destinations[0].write_key == "wk_S…"
    for text in (repr(s), str(s), json.dumps(s.as_dict()), repr(lease), repr(queue)):
        assert KEY not in text
        assert KEY[4:] not in text


def test_short_write_key_is_fully_redacted(queue: Queue) -> None:
    queue.destination(HOST, "abc")
    assert queue.stats().destinations[0].write_key == "…"
