"""Leases of the SQLite queue: batches, backoff, ack, fencing, release.

Each test's name states the behaviour it proves. Child processes are real (``start_python``,
``os.fork``); the heavier multi-process runs live in tests/reliability/.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from durable_analytics._store import MAX_BACKOFF_SECONDS
from durable_analytics._store.sqlite import SqliteQueue as Queue

from .sqlite_helpers import (
    HOST,
    KEY,
    OTHER_HOST,
    OTHER_KEY,
    body,
    body_of_size,
    fill,
    index,
)

# --------------------------------------------------------------------------- lease


def test_lease_takes_the_oldest_messages_first(queue: Queue, dest: int) -> None:
    ids = fill(queue, dest, 10)
    first = queue.lease(4, 1_000_000)
    second = queue.lease(4, 1_000_000)
    assert first is not None
    assert second is not None
    assert list(first.ids) == ids[:4]
    assert list(second.ids) == ids[4:8]
    assert [index(b) for b in first.bodies] == [0, 1, 2, 3]


def test_lease_never_takes_more_than_max_messages(queue: Queue, dest: int) -> None:
    fill(queue, dest, 25)
    sizes = []
    while (lease := queue.lease(7, 1_000_000)) is not None:
        sizes.append(len(lease))
    assert sizes == [7, 7, 7, 4]


@pytest.mark.parametrize(
    ("max_bytes", "expected"),
    [(1000, 10), (999, 9), (400, 4), (399, 3), (100, 1)],
)
def test_lease_never_exceeds_max_bytes_counting_size_plus_one_per_message(
    queue: Queue, dest: int, max_bytes: int, expected: int
) -> None:
    for i in range(10):
        queue.append(dest, body_of_size(i, 99))  # costs 99 + 1 = 100 bytes each
    lease = queue.lease(100, max_bytes)
    assert lease is not None
    assert len(lease) == expected
    assert sum(len(b) + 1 for b in lease.bodies) <= max_bytes
    assert lease.size == 99 * expected


def test_single_message_larger_than_the_budget_is_leased_alone(queue: Queue, dest: int) -> None:
    queue.append(dest, body_of_size(0, 5000))
    queue.append(dest, body_of_size(1, 100))
    lease = queue.lease(100, 1000)
    assert lease is not None
    assert [index(b) for b in lease.bodies] == [0]
    nxt = queue.lease(100, 1000)
    assert nxt is not None
    assert [index(b) for b in nxt.bodies] == [1]


def test_batches_never_mix_destinations(queue: Queue) -> None:
    a = queue.destination(HOST, KEY)
    b = queue.destination(OTHER_HOST, OTHER_KEY)
    c = queue.destination(HOST, OTHER_KEY)  # same host, another key: another destination
    assert len({a, b, c}) == 3
    owner = {}
    for i in range(60):
        d = (a, b, c)[i % 3 if i % 5 else 0]
        owner[i] = d
        queue.append(d, body(i))
    seen: list[int] = []
    first = True
    while (lease := queue.lease(8, 1_000_000)) is not None:
        idx = [index(x) for x in lease.bodies]
        assert {owner[i] for i in idx} == {lease.destination.id}
        assert idx == sorted(idx)
        if first:  # the batch of the oldest ready message goes first
            assert idx[0] == 0
            first = False
        seen.extend(idx)
    assert sorted(seen) == list(range(60))


def test_lease_reports_its_destination_host_and_key(queue: Queue) -> None:
    d = queue.destination(OTHER_HOST, OTHER_KEY)
    queue.append(d, body(1))
    lease = queue.lease(10, 10_000)
    assert lease is not None
    assert lease.destination.id == d
    assert lease.destination.host == OTHER_HOST
    assert lease.destination.write_key == OTHER_KEY
    assert lease.destination.redacted_key == OTHER_KEY[:4] + "…"


def test_destination_ids_are_stable_and_shared_across_queue_objects(queue_path: Path) -> None:
    q1 = Queue(queue_path)
    q2 = Queue(queue_path)
    assert q1.destination(HOST, KEY) == q2.destination(HOST, KEY)
    assert q1.destination(HOST, KEY) != q2.destination(OTHER_HOST, KEY)
    q1.close()
    q2.close()


def test_leased_messages_are_not_leased_again_while_the_lease_is_live(
    queue: Queue, dest: int, queue_path: Path
) -> None:
    fill(queue, dest, 5)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    assert len(lease) == 5
    assert queue.lease(10, 1_000_000) is None
    other = Queue(queue_path)  # another connection of this (live) process
    assert other.lease(10, 1_000_000) is None
    assert other.reclaim_expired() == 0
    other.close()
    queue.append(dest, body(99))
    nxt = queue.lease(10, 1_000_000)
    assert nxt is not None
    assert [index(b) for b in nxt.bodies] == [99]


def test_with_many_batches_in_flight_the_next_lease_takes_the_oldest_unleased_messages(
    queue: Queue, queue_path: Path
) -> None:
    """The pick reads a page at a time and jumps runs of leased ids: with 30 batches of two
    destinations in flight (their ids interleaved), a batch released in the middle and
    messages appended after (the unindexed tail), each next lease still takes exactly the
    oldest unleased messages of its destination, in order, and nothing twice."""
    a = queue.destination(HOST, KEY)
    b = queue.destination(OTHER_HOST, OTHER_KEY)
    stored: dict[int, list[int]] = {a: [], b: []}
    for i in range(400):
        dest = a if i % 3 else b
        stored[dest].append(queue.append(dest, body(i)))
    held = [queue.lease(5, 1_000_000, destination=a) for _ in range(20)]
    held += [queue.lease(5, 1_000_000, destination=b) for _ in range(10)]
    assert all(lease is not None for lease in held)
    taken = {x for lease in held if lease for x in lease.ids}
    assert len(taken) == 150
    assert [x for x in stored[a] if x in taken] == stored[a][:100]
    middle = held[7]
    assert middle is not None
    queue.release(middle, count_attempt=False)
    again = queue.lease(5, 1_000_000, destination=a)
    assert again is not None
    assert list(again.ids) == list(middle.ids)  # released: the oldest unleased again
    nxt = queue.lease(20, 1_000_000, destination=a)
    assert nxt is not None
    assert list(nxt.ids) == stored[a][100:120]
    other = Queue(queue_path)  # another connection: it sees the same leases
    rest_b = other.lease(1000, 10_000_000, destination=b)
    assert rest_b is not None
    assert list(rest_b.ids) == stored[b][50:]
    other.close()
    late = [queue.append(a, body(1000 + i)) for i in range(3)]
    rest_a = queue.lease(1000, 10_000_000, destination=a)
    assert rest_a is not None
    assert list(rest_a.ids) == stored[a][120:] + late


def test_with_two_batches_in_flight_a_lease_reads_its_batch_in_one_statement(
    queue: Queue, dest: int
) -> None:
    """A delivery pass keeps two batches out: the next lease's first page covers them (read
    and skipped) and reads the batch from the unindexed tail with one SELECT, not two
    pages, nor a look at the empty index."""
    ids = fill(queue, dest, 100)
    out = [queue.lease(20, 1_000_000) for _ in range(2)]
    assert all(lease is not None for lease in out)
    reads: list[str] = []
    conn = queue._db.conn()
    conn.set_trace_callback(lambda sql: reads.append(sql) if "m.body" in sql else None)
    try:
        third = queue.lease(20, 1_000_000)
    finally:
        conn.set_trace_callback(None)
    assert third is not None
    assert list(third.ids) == ids[40:60]
    assert len(reads) == 1


def test_single_message_leases_past_the_first_page_find_every_message(
    queue: Queue, dest: int
) -> None:
    """More leases in flight than the first page covers: each next lease goes on past the
    run of leased ids and takes the next message, until all are leased."""
    ids = fill(queue, dest, 12)
    taken = []
    while (lease := queue.lease(1, 1_000_000)) is not None:
        taken += list(lease.ids)
    assert taken == ids


def test_a_batch_larger_than_a_page_is_read_in_pages_and_stops_at_the_byte_budget(
    queue: Queue, dest: int
) -> None:
    """A lease of up to 250 messages (``max_batch_messages``) reads pages of about 100 and
    still takes the oldest in order with their own bodies; the byte budget ends it early."""
    ids = [queue.append(dest, body_of_size(i, 100)) for i in range(300)]
    big = queue.lease(250, 10_000_000)
    assert big is not None
    assert list(big.ids) == ids[:250]
    assert [index(b) for b in big.bodies] == list(range(250))
    queue.release(big, count_attempt=False)
    budget = queue.lease(250, 120 * 101)  # each message costs its 100 bytes + 1
    assert budget is not None
    assert list(budget.ids) == ids[:120]


def test_lease_destination_filter_takes_only_that_destination(queue: Queue) -> None:
    a = queue.destination(HOST, KEY)
    b = queue.destination(OTHER_HOST, OTHER_KEY)
    queue.append(a, body(0))
    queue.append(b, body(1))
    queue.append(a, body(2))
    lease = queue.lease(10, 1_000_000, destination=b)
    assert lease is not None
    assert [index(x) for x in lease.bodies] == [1]
    assert queue.lease(10, 1_000_000, destination=b) is None
    rest = queue.lease(10, 1_000_000, destination=a)
    assert rest is not None
    assert [index(x) for x in rest.bodies] == [0, 2]


def test_lease_up_to_id_filter_takes_only_messages_stored_up_to_that_id(
    queue: Queue, dest: int
) -> None:
    ids = fill(queue, dest, 6)
    lease = queue.lease(10, 1_000_000, up_to_id=ids[2])
    assert lease is not None
    assert list(lease.ids) == ids[:3]
    assert queue.lease(10, 1_000_000, up_to_id=ids[2]) is None
    assert queue.pending(up_to_id=ids[2]) == 3
    assert queue.pending() == 6


def test_lease_of_an_empty_queue_or_zero_messages_is_none(queue: Queue, dest: int) -> None:
    assert queue.lease(10, 1_000_000) is None
    queue.append(dest, body(1))
    assert queue.lease(0, 1_000_000) is None
    assert queue.lease(1, 1_000_000) is not None


def test_destination_in_backoff_yields_nothing_until_its_time(queue: Queue) -> None:
    a = queue.destination(HOST, KEY)
    b = queue.destination(OTHER_HOST, OTHER_KEY)
    queue.append(a, body(0))
    queue.append(b, body(1))
    now = time.time()
    queue.set_backoff(a, now + 30, "HTTP 503")
    assert queue.backoff(a)[0] == pytest.approx(now + 30)
    assert queue.backoff(a)[1] == 1

    held = queue.lease(10, 1_000_000, now=now)
    assert held is not None
    assert held.destination.id == b  # the other destination is not held back
    queue.ack(held)
    assert queue.lease(10, 1_000_000, now=now) is None
    assert queue.lease(10, 1_000_000, now=now + 29.9) is None
    assert queue.next_ready_at() == pytest.approx(now + 30)
    later = queue.lease(10, 1_000_000, now=now + 30.1)
    assert later is not None
    assert [index(x) for x in later.bodies] == [0]


def test_clear_backoff_makes_the_destination_ready_again(queue: Queue, dest: int) -> None:
    queue.append(dest, body(0))
    queue.set_backoff(dest, time.time() + 300, "HTTP 500")
    assert queue.lease(10, 1_000_000) is None
    queue.clear_backoff(dest)
    assert queue.backoff(dest) == (0.0, 0)
    assert queue.lease(10, 1_000_000) is not None


def test_backoff_far_beyond_max_backoff_is_ignored_as_a_clock_jump(queue: Queue, dest: int) -> None:
    queue.append(dest, body(0))
    now = time.time()
    # Only a wall clock that jumped back explains a not_before this far ahead.
    queue.set_backoff(dest, now + MAX_BACKOFF_SECONDS + 3600, "HTTP 500")
    lease = queue.lease(10, 1_000_000, now=now)
    assert lease is not None
    assert queue.ready_summary(10, now)[0] == 0  # leased now
    queue.release(lease, None)
    assert queue.ready_summary(10, now)[0] == 1
    assert queue.next_ready_at() is not None
    assert queue.next_ready_at() <= time.time()  # type: ignore[operator]


def test_backoff_within_max_backoff_is_honoured(queue: Queue, dest: int) -> None:
    queue.append(dest, body(0))
    now = time.time()
    queue.set_backoff(dest, now + MAX_BACKOFF_SECONDS, "HTTP 500")
    assert queue.lease(10, 1_000_000, now=now) is None


def test_new_backoff_replaces_a_far_future_leftover_of_a_clock_jump(
    queue: Queue, dest: int
) -> None:
    queue.append(dest, body(0))
    now = time.time()
    queue.set_backoff(dest, now + 10 * 3600, "before the clock jumped back")
    queue.set_backoff(dest, now + 30, "HTTP 503")
    assert queue.backoff(dest)[0] == pytest.approx(now + 30)
    assert queue.lease(10, 1_000_000, now=now) is None
    assert queue.lease(10, 1_000_000, now=now + 31) is not None


def test_longer_backoff_is_never_shortened_by_a_shorter_one(queue: Queue, dest: int) -> None:
    now = time.time()
    queue.set_backoff(dest, now + 120)
    queue.set_backoff(dest, now + 10)
    assert queue.backoff(dest) == (pytest.approx(now + 120), 2)


# --------------------------------------------------------------------------- ack and fencing


def test_ack_deletes_only_the_leases_messages(queue: Queue, dest: int) -> None:
    fill(queue, dest, 10)
    lease = queue.lease(4, 1_000_000)
    other = queue.lease(3, 1_000_000)
    assert lease is not None
    assert other is not None
    assert queue.ack(lease) == 4
    assert sorted(index(b) for b in queue.bodies()) == list(range(4, 10))
    assert queue.ack(lease) == 0  # a second ack changes nothing
    assert queue.pending() == 6
    assert queue.ack(other) == 3
    assert queue.live_leases() == 0


def test_ack_of_some_ids_keeps_the_rest_under_the_lease(queue: Queue, dest: int) -> None:
    ids = fill(queue, dest, 4)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    assert queue.ack(lease, ids[:2]) == 2
    assert queue.ack(lease, [12345]) == 0  # not in the queue at all
    assert queue.lease(10, 1_000_000) is None  # the rest is still leased
    assert queue.stats().leased == 2
    assert queue.ack(lease, ids[2:]) == 2
    assert queue.live_leases() == 0


def test_an_ack_of_a_batch_with_gaps_deletes_only_its_own_messages(queue: Queue, dest: int) -> None:
    """A lease whose ids are not one run (a message released out of its middle and leased
    by another) is acked message by message: the other holder's message in the gap stays."""
    ids = fill(queue, dest, 6)
    first = queue.lease(3, 1_000_000)
    assert first is not None
    assert queue.release(first, None, ids=ids[1:2], count_attempt=False) == 1
    second = queue.lease(10, 1_000_000)  # the released message and the three after
    assert second is not None
    assert list(second.ids) == [ids[1], *ids[3:]]
    assert queue.ack(first) == 2
    assert sorted(index(b) for b in queue.bodies()) == [1, 3, 4, 5]
    assert queue.ack(second) == 4
    assert queue.pending() == 0


def test_an_id_list_repeated_in_the_file_never_widens_an_ack(queue: Queue, dest: int) -> None:
    """A lease record whose id list was altered to repeat an id (``1,1,3``: as many ids as
    the range 1..3) deletes ids 1 and 3, never the 2 it does not name."""
    ids = fill(queue, dest, 3)
    lease = queue.lease(3, 1_000_000)
    assert lease is not None
    conn = queue._conn()
    conn.execute(
        "UPDATE leases SET ids = ? WHERE token = ?",
        (f"{ids[0]},{ids[0]},{ids[2]}", lease.token),
    )
    assert queue.ack(lease) == 2
    assert [index(b) for b in queue.bodies()] == [1]


def test_ack_and_lease_is_one_transaction(queue: Queue, dest: int) -> None:
    """The pipeline's step from one batch to the next commits once where ack then lease
    commit twice, and it acks and leases exactly what they would."""
    ids = fill(queue, dest, 60)
    commits: list[str] = []
    conn = queue._conn()
    conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    first = queue.lease(20, 1_000_000)
    assert first is not None
    commits.clear()
    deleted, second = queue.ack_and_lease(first, 20, 1_000_000)
    assert len(commits) == 1
    assert deleted == 20
    assert second is not None
    assert list(second.ids) == ids[20:40]
    commits.clear()
    assert queue.ack(second) == 20
    third = queue.lease(20, 1_000_000)
    assert len(commits) == 2
    assert third is not None
    assert list(third.ids) == ids[40:]
    conn.set_trace_callback(None)
    assert queue.ack_and_lease(third, 20, 1_000_000) == (20, None)
    assert queue.pending() == 0
    assert queue.live_leases() == 0


def test_stale_holder_cannot_ack_release_or_dead_letter_after_a_takeover(
    queue_path: Path,
) -> None:
    stale_q = Queue(queue_path, lease_timeout=0.05)
    new_q = Queue(queue_path, lease_timeout=60)
    dest_id = stale_q.destination(HOST, KEY)
    ids = fill(stale_q, dest_id, 5)
    stale = stale_q.lease(10, 1_000_000)
    assert stale is not None
    time.sleep(0.1)  # the stale lease expires (monotonic clock)
    current = new_q.lease(10, 1_000_000)
    assert current is not None
    assert list(current.ids) == ids
    assert current.token != stale.token

    assert stale_q.ack(stale) == 0
    assert stale_q.ack(stale, ids[:1]) == 0
    assert stale_q.release(stale, time.time() + 300) == 0
    assert stale_q.dead_letter(stale, ids, status=400, reason="bad", excerpt="{}") == 0
    assert new_q.pending() == 5
    assert new_q.dead_letters() == []
    assert new_q.lease(10, 1_000_000) is None  # still held by the new holder
    assert new_q.stats().leased == 5

    assert new_q.dead_letter(current, ids[:1], status=400, reason="bad data") == 1
    assert new_q.release(current, None, ids=ids[1:2]) == 1
    assert new_q.ack(current) == 3
    assert new_q.pending() == 1
    assert len(new_q.dead_letters()) == 1
    assert new_q.live_leases() == 0
    stale_q.close()
    new_q.close()


def test_extend_keeps_a_lease_alive_and_reports_a_lost_one(queue_path: Path) -> None:
    # A 2 s lease extended every 0.8 s: a loaded machine's late wake-up stays inside it.
    q = Queue(queue_path, lease_timeout=2.0)
    dest_id = q.destination(HOST, KEY)
    fill(q, dest_id, 2)
    lease = q.lease(10, 1_000_000)
    assert lease is not None
    leased_at = time.monotonic()
    for _ in range(3):
        time.sleep(0.8)
        assert q.extend(lease)
    assert time.monotonic() - leased_at > 2.0  # past the first expiry ...
    assert q.lease(10, 1_000_000) is None  # ... and still held
    time.sleep(2.2)
    taken = q.lease(10, 1_000_000)
    assert taken is not None
    assert not q.extend(lease)
    q.close()


# --------------------------------------------------------------------------- release


def test_release_with_not_before_is_not_leased_again_before_then(queue: Queue, dest: int) -> None:
    fill(queue, dest, 3)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    assert lease.attempts == 0
    now = time.time()
    assert queue.release(lease, now + 60) == 3
    assert queue.live_leases() == 0
    assert queue.lease(10, 1_000_000, now=now) is None
    assert queue.lease(10, 1_000_000, now=now + 59) is None
    assert queue.next_ready_at() == pytest.approx(now + 60)
    again = queue.lease(10, 1_000_000, now=now + 60.5)
    assert again is not None
    assert len(again) == 3
    assert again.attempts == 1
    queue.release(again, None)
    third = queue.lease(10, 1_000_000)
    assert third is not None
    assert third.attempts == 2


def test_release_without_counting_an_attempt(queue: Queue, dest: int) -> None:
    fill(queue, dest, 1)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    queue.release(lease, None, count_attempt=False)
    again = queue.lease(10, 1_000_000)
    assert again is not None
    assert again.attempts == 0


def test_released_messages_keep_their_order(queue: Queue, dest: int) -> None:
    fill(queue, dest, 6)
    lease = queue.lease(3, 1_000_000)
    assert lease is not None
    queue.release(lease, None)
    again = queue.lease(10, 1_000_000)
    assert again is not None
    assert [index(b) for b in again.bodies] == list(range(6))
