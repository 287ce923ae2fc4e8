"""The fleet-wide in-flight window of the PostgreSQL queue, one per destination.

Leasing refuses a destination whose live leases reached its stored window, atomically (two
sessions never both take the last slot); every settlement, a takeover and an expiry free
the slot; a congestion signal halves the window once per round trip and acks grow it by
one up to ``fleet_max_in_flight``. Real server, real sessions, real child processes.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from conftest import WRITE_KEY, start_python

from durable_analytics._metrics import queue_samples, render_prometheus
from durable_analytics._store import Destination, Lease
from durable_analytics._store.postgres._queue import PostgresQueue
from durable_analytics._store.window import PROCESS_WINDOW
from durable_analytics.cli.status import format_status
from durable_analytics.exceptions import ConfigError

from .pg_helpers import OpenPg, body

HOST = "https://collector.test"


def fill(queue: PostgresQueue, n: int, host: str = HOST) -> int:
    dest = queue.destination(host, WRITE_KEY)
    for i in range(n):
        assert queue.append(dest, body(i))
    return dest


def take(queue: PostgresQueue, n: int) -> list[Lease]:
    """Up to ``n`` leases of one message each (fewer when the window refuses)."""
    leases = []
    for _ in range(n):
        lease = queue.lease(1, 1 << 20)
        if lease is None:
            break
        leases.append(lease)
    return leases


def test_leases_stop_at_the_stored_window_and_every_settlement_frees_its_slot(
    open_pg: OpenPg,
) -> None:
    """With a window of 4 and 20 ready messages, a fifth lease is refused (and the rest
    counts as held by others: ``next_ready_at`` is None, nothing is ready) until a lease
    ends; ack, release, retry_later and dead_letter each end one, a partial ack only once
    the rest is settled."""
    queue = open_pg(fleet_max_in_flight=4)
    dest = fill(queue, 20)
    first = take(queue, 10)
    assert len(first) == 4
    assert queue.window.live(dest) == 4
    assert queue.lease(1, 1 << 20) is None
    assert queue.next_ready_at() is None
    assert queue.ready_summary(20) == (0, None)  # a flusher polls at its idle pace
    (shown,) = queue.stats().destinations
    assert (shown.window, shown.live_leases) == (4, 4)
    assert "window 4 (4 in flight)" in format_status(queue.identity, queue.stats())
    exported = render_prometheus(queue_samples(queue.stats(), now=time.time()))
    assert "durable_analytics_destination_window_requests{" in exported
    assert "durable_analytics_destination_live_leases{" in exported
    assert queue.pending() == 20  # nothing left the queue: it waits for a slot

    assert queue.ack(first[0]) == 1
    assert queue.release(first[1]) == 1
    queue.retry_later(first[2], lambda failures: 0.0, "HTTP 503")
    queue.clear_backoff(dest)
    assert queue.dead_letter(first[3], first[3].ids, status=400, reason="HTTP 400") == 1
    assert queue.window.live(dest) == 0

    # A lease of two messages: acking one keeps the slot, settling the other frees it.
    two = queue.lease(2, 1 << 20)
    assert two is not None
    assert len(two) == 2
    assert queue.ack(two, [two.ids[0]]) == 1
    assert queue.window.live(dest) == 1
    assert queue.release(two, ids=[two.ids[1]]) == 1
    assert queue.window.live(dest) == 0
    assert len(take(queue, 10)) == 4


def _lease_at_once(queues: list[PostgresQueue], dest: int) -> list[Lease]:
    """Each queue asks for one lease of ``dest`` at the same instant (a thread each)."""
    barrier = threading.Barrier(len(queues))
    got: list[Lease] = []
    lock = threading.Lock()

    def one(queue: PostgresQueue) -> None:
        barrier.wait()
        lease = queue.lease(1, 1 << 20, destination=dest)
        if lease is not None:
            with lock:
                got.append(lease)

    threads = [threading.Thread(target=one, args=(q,)) for q in queues]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return got


def test_two_sessions_never_both_take_the_last_slot(open_pg: OpenPg) -> None:
    """Eight queues (eight pools of sessions) lease at the same instant, 25 rounds, with a
    window of 1 and then of 3: never more leases than the window, always the window full."""
    for window in (1, 3):
        queues = [open_pg(fleet_max_in_flight=window) for _ in range(8)]
        dest = fill(queues[0], 200, host=f"https://window-{window}.test")
        for _ in range(25):
            got = _lease_at_once(queues, dest)
            assert len(got) == window
            assert queues[0].window.live(dest) == window
            for lease in got:
                assert queues[0].ack(lease) == 1


def test_a_congestion_halves_the_window_once_per_round_trip_and_acks_grow_it_to_the_max(
    open_pg: OpenPg,
) -> None:
    """8 → 4 on the first 429 of the leases taken at 8; another of the same round trip
    changes nothing; a lease taken after it halves again (2); never below 1; each ack adds
    one, never past ``fleet_max_in_flight``."""
    queue = open_pg(fleet_max_in_flight=8)
    dest = fill(queue, 40)
    assert queue.window.limit(dest) == 8
    early = take(queue, 3)
    queue.window.congested(early[0])
    assert queue.window.limit(dest) == 4
    queue.window.congested(early[1])  # sent before the halving: already counted
    assert queue.window.limit(dest) == 4
    later = take(queue, 1)
    assert later[0].window_epoch == early[0].window_epoch + 1
    queue.window.congested(later[0])
    assert queue.window.limit(dest) == 2
    assert queue.lease(1, 1 << 20) is None  # 4 live leases, a window of 2
    for lease in (*early, *later):
        assert queue.ack(lease) == 1
    assert queue.window.limit(dest) == 6
    for _ in range(4):
        for lease in take(queue, 8):
            queue.ack(lease)
    assert queue.window.limit(dest) == 8
    for _ in range(6):
        lease = take(queue, 1)[0]
        queue.window.congested(lease)
        queue.release(lease, count_attempt=False)
    assert queue.window.limit(dest) == 1
    assert len(take(queue, 3)) == 1


def test_an_expired_lease_frees_its_slot_and_reclaim_removes_it(open_pg: OpenPg) -> None:
    """On a test clock: two leases fill a window of 2; once they expire, they no longer
    count (two new leases are granted) and ``reclaim_expired`` removes their rows."""
    now = [1_900_000_000.0]
    queue = open_pg(fleet_max_in_flight=2, lease_timeout=30.0, clock=lambda: now[0])
    dest = fill(queue, 10)
    stale = take(queue, 5)
    assert len(stale) == 2
    now[0] += 31
    fresh = take(queue, 5)
    assert len(fresh) == 2
    assert queue.window.live(dest) == 2
    with psycopg.connect(queue.target.conninfo) as conn:
        rows = conn.execute(f'SELECT count(*) FROM "{queue.target.schema}".leases').fetchone()
    assert rows == (4,)
    now[0] += 31
    assert queue.reclaim_expired() == 2
    assert queue.window.live(dest) == 0
    with psycopg.connect(queue.target.conninfo) as conn:
        rows = conn.execute(f'SELECT count(*) FROM "{queue.target.schema}".leases').fetchone()
    assert rows == (0,)
    assert not queue.ack(stale[0])  # taken over long ago: fenced
    assert len(take(queue, 5)) == 2


# Takes as many one-message leases as the window gives, prints their ids, and waits for
# the SIGKILL while holding them.
HOLDER = """
import sys
from durable_analytics._store.postgres._queue import PostgresQueue

url, schema = sys.argv[1:3]
q = PostgresQueue(url, schema=schema, lease_timeout=600, fleet_max_in_flight=4)
ids = []
while (lease := q.lease(1, 1 << 20)) is not None:
    ids.extend(lease.ids)
print(",".join(map(str, ids)), flush=True)
sys.stdin.read()
"""


def test_a_sigkilled_holders_slots_come_back_at_once_and_nothing_is_lost(
    pg_dsn: str, pg_schema: str, open_pg: OpenPg
) -> None:
    """A child fills the window of 4 (leases of 600 s) and is killed; the slots it held are
    free at once (counted from the leases: 4, then 0), and every message is then leased
    and acked exactly once by the survivor: lost 0, duplicates 0."""
    queue = open_pg(fleet_max_in_flight=4, lease_timeout=600.0)
    dest = fill(queue, 12)
    holder = start_python(HOLDER, pg_dsn, pg_schema, stdin=-1)
    assert holder.stdout is not None
    held = holder.stdout.readline().split(",")
    assert len(held) == 4
    assert queue.window.live(dest) == 4
    assert queue.lease(1, 1 << 20) is None
    holder.kill()
    holder.wait()
    # What lease() does on its own at most once a second, until the server has ended the
    # killed client's session (it does so as soon as it reads the closed socket).
    end = time.monotonic() + 10
    while not queue.reclaim_expired() and time.monotonic() < end:
        time.sleep(0.02)
    assert queue.window.live(dest) == 0
    acked: list[int] = []
    while (lease := queue.lease(1, 1 << 20)) is not None:
        assert queue.ack(lease) == 1
        acked.extend(lease.ids)
    assert sorted(acked) == sorted(set(acked))
    assert len(acked) == 12
    assert queue.pending() == 0


def test_a_version_2_schema_is_migrated_and_its_live_leases_keep_their_slots(
    pg_dsn: str, pg_schema: str
) -> None:
    """Version 3 adds the window: a live lease made under version 2 is entered by the
    migration, so it holds a slot at once; its holder's ack frees it."""
    from durable_analytics._store.postgres import _schema

    sql = _schema.Sql(pg_schema)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql("CREATE SCHEMA {s}").decode())
        conn.execute(sql("CREATE TABLE {s}.meta (key text PRIMARY KEY, value text)").decode())
        conn.execute(sql(_schema._MIGRATIONS[0]).decode())
        conn.execute(sql(_schema._MIGRATIONS[1]).decode())
        conn.execute(
            sql("INSERT INTO {s}.meta VALUES ('version', '2'), ('instance', 'abc')").decode()
        )
        conn.execute(
            sql("INSERT INTO {s}.destinations (host, write_key) VALUES (%s, %s)").decode(),
            (HOST, WRITE_KEY),
        )
        conn.execute(
            sql(
                "INSERT INTO {s}.messages (dest, body, size, lease_token, lease_expires) "
                "SELECT 1, '\\x7b7d', 2, gen_random_uuid(), now() + interval '10 minutes'"
            ).decode()
        )
    queue = PostgresQueue(pg_dsn, schema=pg_schema, fleet_max_in_flight=1)
    try:
        dest = fill(queue, 1)
        assert queue.window.live(dest) == 1
        assert queue.lease(1, 1 << 20) is None
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            version = conn.execute(
                sql("SELECT value FROM {s}.meta WHERE key = 'version'").decode()
            ).fetchone()
            token = conn.execute(
                sql("SELECT lease_token FROM {s}.messages WHERE lease_token IS NOT NULL").decode()
            ).fetchone()
        assert version == (str(_schema.SCHEMA_VERSION),) == ("3",)
        assert token is not None
        old = Lease(token[0].hex, Destination(dest, HOST, WRITE_KEY), (1,), (b"{}",), 0, 0.0)
        assert queue.ack(old) == 1
        assert queue.window.live(dest) == 0
        assert queue.lease(1, 1 << 20) is not None
    finally:
        queue.close()


def test_fleet_max_in_flight_comes_from_the_url_and_a_bad_value_is_refused(
    pg_dsn: str, pg_schema: str, open_pg: OpenPg
) -> None:
    """``?fleet_max_in_flight=3`` sets the window's max (default 32); 0, -1 and words are
    refused with a ConfigError naming the setting. SQLite and memory keep no stored
    window: theirs lives in each process."""
    queue = PostgresQueue(f"{pg_dsn}&fleet_max_in_flight=3", schema=pg_schema)
    try:
        dest = fill(queue, 1)
        assert queue.window.limit(dest) == 3
    finally:
        queue.close()
    assert open_pg().window.limit(dest) == 32
    for bad in ("0", "-1", "many", "²"):
        with pytest.raises(ConfigError, match="fleet_max_in_flight"):
            PostgresQueue(f"{pg_dsn}&fleet_max_in_flight={bad}", schema=pg_schema)
    assert PROCESS_WINDOW.limit(dest) is None


def test_a_pass_starts_no_more_helper_threads_than_the_stored_window_has_slots(
    open_pg: OpenPg,
) -> None:
    """The pipeline (``deliver_pass``) of a Deliverer allowed 8 requests starts 7 helpers
    beside its own thread on a queue that keeps no window, and 1 where the stored window
    is 2 (more would only be refused a lease and end)."""
    from durable_analytics._pass import _helpers_for
    from durable_analytics._store import MemoryQueue

    queue = open_pg(fleet_max_in_flight=2)
    fill(queue, 4)
    lease = take(queue, 1)[0]
    assert _helpers_for(queue, lease, 8) == 1
    assert _helpers_for(queue, lease, 1) == 0
    memory = MemoryQueue()
    memory.append(memory.destination(HOST, WRITE_KEY), body(0))
    other = memory.lease(1, 1 << 20)
    assert other is not None
    assert _helpers_for(memory, other, 8) == 7
