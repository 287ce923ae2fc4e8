"""The ``QueueBackend`` contract, run against every backend (``BACKENDS`` in conftest.py).

Each test states one rule of the contract written in ``durable_analytics/_store/base.py``;
a backend that passes them all can carry delivery, the client and the CLI. Time rules run
under freezegun, which moves the wall and the monotonic clock together.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import freezegun
import pytest

from durable_analytics._store import MAX_BACKOFF_SECONDS, DeadLetterMark, Lease, QueueBackend
from durable_analytics.exceptions import QueueError

from .conftest import OpenBackend

HOST = "https://api.example.test"
KEY = "wk_SECRET_write_key_0123456789"
OTHER_HOST = "https://eu.example.test"
OTHER_KEY = "wk_OTHER_write_key_9876543210"
BIG = 1 << 30


def body(i: int, pad: int = 0) -> bytes:
    """A serialized message that names its index ``i``."""
    msg: dict[str, Any] = {"type": "track", "event": "E", "messageId": f"m-{i}"}
    msg["properties"] = {"i": i, "pad": "x" * pad}
    return json.dumps(msg, separators=(",", ":")).encode()


def index(b: bytes) -> int:
    """The index ``body`` put in a message."""
    return int(json.loads(b)["properties"]["i"])


def fill(queue: QueueBackend, dest: int, n: int, start: int = 0, pad: int = 0) -> list[int]:
    """Append messages ``start`` … ``start + n - 1``; their ids."""
    return [queue.append(dest, body(i, pad)) for i in range(start, start + n)]


def take(queue: QueueBackend, n: int = 100, **kwargs: Any) -> Lease:
    """Lease up to ``n`` messages; fails the test when nothing was ready."""
    lease = queue.lease(n, BIG, **kwargs)
    assert lease is not None
    return lease


@pytest.fixture
def dest(backend: QueueBackend) -> int:
    return backend.destination(HOST, KEY)


# --------------------------------------------------------------------------- order and budget


def test_messages_are_leased_oldest_first_and_never_twice_while_leased(
    backend: QueueBackend, dest: int
) -> None:
    ids = fill(backend, dest, 10)
    assert ids == sorted(ids)
    assert all(ids)
    first = take(backend, 4)
    second = take(backend, 4)
    assert list(first.ids) == ids[:4]
    assert list(second.ids) == ids[4:8]
    assert [index(b) for b in first.bodies + second.bodies] == list(range(8))
    assert backend.ack(first) == 4
    third = take(backend)
    assert list(third.ids) == ids[8:]
    assert backend.lease(10, BIG) is None


def test_released_messages_come_back_in_their_order_before_newer_ones(
    backend: QueueBackend, dest: int
) -> None:
    fill(backend, dest, 3)
    lease = take(backend)
    fill(backend, dest, 2, start=3)
    assert backend.release(lease, None, count_attempt=False) == 3
    assert [index(b) for b in take(backend).bodies] == [0, 1, 2, 3, 4]


def test_lease_keeps_within_max_messages_and_max_bytes_counting_the_overhead(
    backend: QueueBackend, dest: int
) -> None:
    fill(backend, dest, 20, start=100, pad=100)  # all of one size
    size = len(body(100, 100))
    assert len(backend.lease(3, BIG) or ()) == 3
    lease = take_budget(backend, 5 * (size + 1))
    assert len(lease) == 5
    lease = take_budget(backend, 5 * (size + 1) - 1)
    assert len(lease) == 4
    lease = take_budget(backend, 2 * (size + 10), per_message_overhead=10)
    assert len(lease) == 2
    assert lease.size == 2 * size


def take_budget(queue: QueueBackend, max_bytes: int, **kwargs: Any) -> Lease:
    lease = queue.lease(100, max_bytes, **kwargs)
    assert lease is not None
    return lease


def test_the_first_message_is_always_taken_however_large(backend: QueueBackend, dest: int) -> None:
    fill(backend, dest, 1, pad=5000)
    fill(backend, dest, 1, start=1)
    lease = backend.lease(10, 100)
    assert lease is not None
    assert [index(b) for b in lease.bodies] == [0]  # alone: the next does not fit either
    assert backend.lease(0, BIG) is None


def test_a_batch_holds_one_destination_and_filters_choose_which(backend: QueueBackend) -> None:
    a = backend.destination(HOST, KEY)
    b = backend.destination(OTHER_HOST, OTHER_KEY)
    assert backend.destination(HOST, KEY) == a != b
    ids = [backend.append(d, body(i)) for i, d in enumerate([a, b, a, b, a])]
    only_b = take(backend, destination=b)
    assert list(only_b.ids) == [ids[1], ids[3]]
    assert only_b.destination.host == OTHER_HOST
    assert only_b.destination.write_key == OTHER_KEY
    early = take(backend, up_to_id=ids[2])
    assert list(early.ids) == [ids[0], ids[2]]
    assert early.destination.id == a
    assert list(take(backend).ids) == [ids[4]]


def test_qsize_and_empty_read_what_is_pending_leased_or_not(
    backend: QueueBackend, dest: int
) -> None:
    """``qsize()``/``empty()`` (``queue.Queue``'s names, as segment's ``client.queue``):
    the pending count, a leased message included, down to 0 once acknowledged."""
    assert (backend.qsize(), backend.empty()) == (0, True)
    fill(backend, dest, 3)
    assert (backend.qsize(), backend.empty()) == (3, False)
    lease = take(backend, 3)
    assert (backend.qsize(), backend.empty()) == (3, False)
    backend.ack(lease)
    assert (backend.qsize(), backend.empty()) == (0, True)


def test_dead_lettered_since_counts_the_dead_letters_newer_than_the_mark_by_destination(
    backend: QueueBackend, dest: int
) -> None:
    """``dead_letter_mark()`` then ``dead_lettered_since(mark, destination)``: the dead
    letters moved after the mark of messages queued by then, of that destination (or of
    any); not the older dead letters, not a message queued after the mark, and not fewer
    once older ones are purged."""
    other = backend.destination(OTHER_HOST, OTHER_KEY)
    assert backend.dead_letter_mark().id == 0
    old = fill(backend, dest, 2)
    backend.dead_letter(take(backend, 2), old[:1], status=400, reason="bad")
    new = fill(backend, dest, 3, start=10)
    backend.append(other, body(20))
    mark = backend.dead_letter_mark()
    assert mark.id > 0
    assert backend.dead_lettered_since(mark) == 0
    late = backend.append(dest, body(30), enqueued_at=mark.at + 60)  # queued after the mark
    lease = take(backend, 10, destination=dest)
    assert late in lease.ids
    backend.dead_letter(lease, [*new[:2], late], status=422, reason="bad")
    elsewhere = take(backend, 10, destination=other)
    backend.dead_letter(elsewhere, elsewhere.ids, status=400, reason="bad")
    assert backend.dead_lettered_since(mark, destination=dest) == 2
    assert backend.dead_lettered_since(mark, destination=other) == 1
    assert backend.dead_lettered_since(mark) == 3
    assert backend.dead_lettered_since(DeadLetterMark(0, mark.at), destination=dest) == 3
    oldest = backend.dead_letters()[0].id
    assert backend.purge_dead_letters([oldest]) == 1
    assert backend.dead_lettered_since(mark) == 3


def test_pending_max_id_and_ready_summary_count_what_is_stored(
    backend: QueueBackend, dest: int
) -> None:
    assert (backend.pending(), backend.max_id(), backend.ready_summary(10)) == (0, 0, (0, None))
    other = backend.destination(OTHER_HOST, OTHER_KEY)
    ids = fill(backend, dest, 3)
    backend.append(other, body(9), enqueued_at=1000.0)
    assert backend.max_id() > ids[-1]
    assert backend.pending() == 4
    assert backend.pending(up_to_id=ids[1]) == 2
    assert backend.pending(destination=other) == 1
    lease = take(backend, 2)
    assert backend.pending() == 4  # leased messages are still pending
    count, oldest = backend.ready_summary(10)
    assert count == 2
    assert oldest == pytest.approx(1000.0, abs=1.0)  # (PostgreSQL: by the server clock)
    assert backend.ready_summary(1)[0] == 1
    backend.ack(lease)
    assert backend.pending() == 2


def test_unleased_reads_a_destinations_messages_no_lease_holds_in_order_changing_nothing(
    backend: QueueBackend, dest: int
) -> None:
    """What a flush reports as kept when it stops at a backoff: this destination's
    messages in the id range, oldest first, past the leased ones, a page at a time; those
    of another destination, past the range or leased are not read, and nothing changes."""
    other = backend.destination(OTHER_HOST, OTHER_KEY)
    ids = fill(backend, dest, 3)
    backend.append(other, body(99))
    ids += fill(backend, dest, 4, start=3)
    lease = take(backend, 2, destination=dest)
    assert lease.ids == tuple(ids[:2])

    found = backend.unleased(dest, up_to_id=ids[5])
    assert [i for i, _ in found] == ids[2:6]
    assert [index(b) for _, b in found] == [2, 3, 4, 5]
    page = backend.unleased(dest, up_to_id=ids[-1], limit=2)
    assert [i for i, _ in page] == ids[2:4]
    rest = backend.unleased(dest, up_to_id=ids[-1], after_id=page[-1][0], limit=10)
    assert [i for i, _ in rest] == ids[4:]
    assert backend.unleased(other, up_to_id=ids[0]) == []

    assert backend.pending() == 8
    assert take(backend, 100, destination=dest).ids == tuple(ids[2:])  # none was leased
    backend.release(lease, None, count_attempt=False)
    assert [i for i, _ in backend.unleased(dest, up_to_id=ids[-1])] == ids[:2]


def test_holds_others_names_messages_of_any_destination_outside_the_given_ones(
    backend: QueueBackend, dest: int
) -> None:
    """``holds_others`` answers what ``pending`` would (leased messages included) for every
    destination but the given ones, without counting."""
    other = backend.destination(OTHER_HOST, OTHER_KEY)
    assert not backend.holds_others([])
    assert not backend.holds_others([dest, other])
    fill(backend, dest, 3)
    assert backend.holds_others([])
    assert backend.holds_others([other])
    assert not backend.holds_others([dest])
    backend.append(other, body(9))
    assert backend.holds_others([dest])
    assert not backend.holds_others([dest, other])
    leased = take(backend, 10, destination=other)
    assert backend.holds_others([dest])  # a leased message is still pending
    backend.ack(leased)
    assert not backend.holds_others([dest])
    backend.ack(take(backend, 10, destination=dest))
    assert not backend.holds_others([])


def test_holds_others_counts_a_message_whatever_its_destinations_record_says(
    backend: QueueBackend, dest: int
) -> None:
    """A message stored under an id no destination has (a damaged file, a bad id) is
    pending like any other, so it is another destination's for ``holds_others``."""
    fill(backend, dest, 2)
    stray = 987_654
    backend.append(stray, body(5))
    assert backend.pending() == 3
    assert backend.holds_others([dest])
    assert not backend.holds_others([dest, stray])


def test_calls_that_met_no_busy_file_are_never_held_back(backend: QueueBackend, dest: int) -> None:
    """``held_back`` names only calls not in the queue yet (a SQLite producer's spool): an
    append nobody contended for is in the queue when it returns, so ``flush`` has nothing
    more to wait for than ``max_id``."""
    fill(backend, dest, 3)
    assert backend.held_back() == {}
    assert backend.held_back(destination=dest) == {}
    assert backend.held_back_left({}, destination=dest) == 0


# --------------------------------------------------------------------------- fencing, expiry


def test_a_stale_holder_changes_nothing_after_a_takeover(open_backend: OpenBackend) -> None:
    with freezegun.freeze_time("2030-01-01") as frozen:
        queue = open_backend(lease_timeout=60)
        dest = queue.destination(HOST, KEY)
        ids = fill(queue, dest, 5)
        stale = take(queue)
        frozen.tick(30)
        assert queue.lease(10, BIG) is None  # still live
        frozen.tick(31)
        current = take(queue)  # expired: taken over
        assert list(current.ids) == ids
        assert current.token != stale.token

        assert queue.ack(stale) == 0
        assert queue.ack(stale, ids[:1]) == 0
        assert queue.release(stale, time.time() + 300) == 0
        assert queue.dead_letter(stale, ids, status=400, reason="bad") == 0
        assert not queue.extend(stale)
        assert queue.pending() == 5
        assert queue.dead_letters() == []
        assert queue.stats().leased == 5
        assert queue.lease(10, BIG) is None  # the new holder still holds them

        assert queue.dead_letter(current, ids[:1], status=400, reason="bad") == 1
        assert queue.release(current, None, ids=ids[1:2]) == 1
        assert queue.ack(current) == 3
        assert queue.pending() == 1
        assert queue.live_leases() == 0


def test_extend_keeps_a_lease_alive_and_reclaim_expired_ends_it(
    open_backend: OpenBackend,
) -> None:
    with freezegun.freeze_time("2030-01-01") as frozen:
        queue = open_backend(lease_timeout=60)
        fill(queue, queue.destination(HOST, KEY), 2)
        lease = take(queue)
        for _ in range(3):
            frozen.tick(40)
            assert queue.extend(lease)
            assert queue.extend(lease, whole=True)  # all of it still held
        assert queue.reclaim_expired() == 0
        assert queue.lease(10, BIG) is None  # 120 s after it was taken, still held
        assert queue.live_leases() == 1
        frozen.tick(61)
        assert queue.stats().leased == 0  # expired: no longer counted as leased
        assert queue.reclaim_expired() == 1
        assert queue.live_leases() == 0
        assert not queue.extend(lease)
        assert not queue.extend(lease, whole=True)
        assert len(take(queue)) == 2


def test_an_expired_lease_counts_no_attempt_and_a_release_counts_one(
    open_backend: OpenBackend,
) -> None:
    with freezegun.freeze_time("2030-01-01") as frozen:
        queue = open_backend(lease_timeout=60)
        fill(queue, queue.destination(HOST, KEY), 1)
        assert take(queue).attempts == 0
        frozen.tick(61)
        lease = take(queue)
        assert lease.attempts == 0
        assert queue.release(lease) == 1
        lease = take(queue)
        assert lease.attempts == 1
        assert queue.release(lease, count_attempt=False) == 1
        assert take(queue).attempts == 1


# --------------------------------------------------------------------------- backoff


def test_backoff_holds_back_only_its_destination_until_its_time(backend: QueueBackend) -> None:
    a = backend.destination(HOST, KEY)
    b = backend.destination(OTHER_HOST, OTHER_KEY)
    backend.append(a, body(0))
    backend.append(b, body(1))
    now = time.time()
    backend.set_backoff(a, now + 30, "HTTP 503")
    assert backend.backoff(a) == (pytest.approx(now + 30), 1)
    held = take(backend, now=now)
    assert held.destination.id == b
    assert backend.ack(held) == 1
    assert backend.lease(10, BIG, now=now + 29) is None
    assert backend.ready_summary(10, now)[0] == 0
    assert backend.next_ready_at() == pytest.approx(now + 30)
    assert [index(x) for x in take(backend, now=now + 31).bodies] == [0]


def test_next_ready_at_of_one_destination_ignores_another_destinations_ready_messages(
    backend: QueueBackend,
) -> None:
    """What a flush of A waits for: A's backoff, not B's messages that are ready now."""
    a = backend.destination(HOST, KEY)
    b = backend.destination(OTHER_HOST, OTHER_KEY)
    top = max(fill(backend, a, 2) + fill(backend, b, 3, start=2))
    now = time.time()
    backend.set_backoff(a, now + 30, "HTTP 503")
    assert (backend.next_ready_at() or 0) <= time.time()  # B's are ready
    assert backend.next_ready_at(destination=a) == pytest.approx(now + 30)
    assert backend.next_ready_at(up_to_id=top, destination=a) == pytest.approx(now + 30)
    assert (backend.next_ready_at(destination=b) or 0) <= time.time()
    held = take(backend, now=now)
    assert held.destination.id == b
    backend.ack(held)
    assert backend.next_ready_at(destination=b) is None  # nothing of B is left


def test_a_destination_is_leased_at_once_while_another_backs_off_behind_a_backlog(
    backend: QueueBackend,
) -> None:
    """B's fresh messages, stored after A's backlog while A backs off, are what the next
    lease takes (no destination named), what the poll reports as ready now, and what is
    counted as B's; once B is delivered nothing is ready until A's backoff ends, and A's
    backlog is all still there."""
    a = backend.destination(HOST, KEY)
    b = backend.destination(OTHER_HOST, OTHER_KEY)
    fill(backend, a, 300)
    now = time.time()
    backend.set_backoff(a, now + 60, "HTTP 503")
    b_ids = fill(backend, b, 5, start=300)
    assert backend.ready_summary(100, now)[0] == 5
    next_at = backend.next_ready_at()
    assert next_at is not None
    assert next_at <= time.time()
    assert (backend.pending(destination=b), backend.pending(destination=a)) == (5, 300)
    lease = take(backend, 100, now=now)
    assert lease.destination.id == b
    assert list(lease.ids) == b_ids
    assert [index(x) for x in lease.bodies] == list(range(300, 305))
    assert backend.ack(lease) == 5
    assert backend.lease(100, BIG, now=now + 59) is None
    assert backend.ready_summary(100, now)[0] == 0
    assert backend.next_ready_at() == pytest.approx(now + 60)
    assert (backend.pending(), backend.pending(destination=b)) == (300, 0)
    # A's backoff over: its backlog comes out whole, oldest first.
    later = now + 61
    leased: list[int] = []
    while (held := backend.lease(128, BIG, now=later)) is not None:
        assert held.destination.id == a
        leased.extend(index(x) for x in held.bodies)
        backend.ack(held)
    assert leased == list(range(300))
    assert backend.pending() == 0


def test_a_backoff_beyond_the_longest_one_is_ignored_as_a_clock_jump(
    backend: QueueBackend, dest: int
) -> None:
    fill(backend, dest, 1)
    now = time.time()
    backend.set_backoff(dest, now + MAX_BACKOFF_SECONDS + 3600, "before the clock jumped back")
    lease = take(backend, now=now)
    backend.release(lease, now + MAX_BACKOFF_SECONDS + 3600)
    assert backend.ready_summary(10, now)[0] == 1
    assert (backend.next_ready_at() or 0) <= time.time()
    # ... and a real backoff set afterwards replaces the leftover.
    backend.set_backoff(dest, now + 30, "HTTP 503")
    assert backend.backoff(dest)[0] == pytest.approx(now + 30)
    assert backend.lease(10, BIG, now=now) is None


def test_a_longer_backoff_is_never_shortened_and_failures_add_up(
    backend: QueueBackend, dest: int
) -> None:
    now = time.time()
    backend.set_backoff(dest, now + 120)
    backend.set_backoff(dest, now + 10, "second")
    assert backend.backoff(dest) == (pytest.approx(now + 120), 2)
    backend.clear_backoff(dest)
    assert backend.backoff(dest) == (0.0, 0)


def test_clear_backoff_with_messages_makes_a_retried_batch_ready_at_once(
    backend: QueueBackend, dest: int
) -> None:
    fill(backend, dest, 3)
    lease = take(backend)
    backend.retry_later(lease, lambda n: 300.0, "HTTP 503")
    assert backend.lease(10, BIG) is None  # the destination and its messages wait
    backend.clear_backoff(dest)
    assert backend.lease(10, BIG) is None  # the messages still carry their retry time
    backend.clear_backoff(dest, messages=True)
    again = backend.lease(10, BIG)
    assert again is not None
    assert len(again) == 3
    assert backend.backoff(dest) == (0.0, 0)
    other = backend.destination("https://other.example", "key-2")
    backend.append(other, b'{"n":9}')
    backend.retry_later(again, lambda n: 300.0, "HTTP 503")
    backend.set_backoff(other, time.time() + 300, "HTTP 500")
    backend.clear_backoff(None, messages=True)  # every destination at once
    assert backend.backoff(dest) == (0.0, 0)
    assert backend.backoff(other) == (0.0, 0)
    assert backend.pending() == 4
    assert (backend.next_ready_at() or 0) <= time.time()


def test_retry_later_counts_every_holders_failures_and_releases_with_one_attempt(
    backend: QueueBackend, dest: int
) -> None:
    fill(backend, dest, 3)
    lease = take(backend)
    backend.set_backoff(dest, 0.0, "another holder failed first")
    seen: list[int] = []
    before = time.time()
    until = backend.retry_later(lease, lambda n: seen.append(n) or 42.0, "HTTP 503")
    assert seen == [2]
    assert before + 42.0 <= until <= time.time() + 42.0
    assert backend.backoff(dest) == (pytest.approx(until), 2)
    assert backend.live_leases() == 0
    assert backend.lease(10, BIG, now=until - 1) is None
    again = take(backend, now=until + 1)
    assert again.attempts == 1
    assert [index(b) for b in again.bodies] == [0, 1, 2]
    last = backend.stats().last_error
    assert last is not None
    assert (last["message"], last["host"]) == ("HTTP 503", HOST)


def test_retry_later_of_a_stale_holder_still_counts_the_failure_but_moves_nothing(
    open_backend: OpenBackend,
) -> None:
    with freezegun.freeze_time("2030-01-01") as frozen:
        queue = open_backend(lease_timeout=60)
        dest = queue.destination(HOST, KEY)
        fill(queue, dest, 2)
        stale = take(queue)
        frozen.tick(61)
        current = take(queue)
        queue.retry_later(stale, lambda n: 5.0, "timeout")
        assert queue.backoff(dest)[1] == 1
        assert queue.stats().leased == 2  # the current holder's batch is untouched
        assert queue.ack(current) == 2


def test_concurrent_retry_later_calls_each_see_one_more_failure(
    backend: QueueBackend, dest: int
) -> None:
    """Read, back off and release are one step: no two holders see the same count."""
    n = 8
    fill(backend, dest, n)
    leases = [take(backend, 1) for _ in range(n)]
    seen: list[int] = []
    start = threading.Barrier(n)

    def fail(lease: Lease) -> None:
        start.wait()
        backend.retry_later(lease, lambda k: seen.append(k) or 1.0, "HTTP 500")

    threads = [threading.Thread(target=fail, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == list(range(1, n + 1))
    assert backend.backoff(dest)[1] == n
    assert backend.live_leases() == 0


def test_ack_clears_the_destinations_backoff_for_every_holder(
    backend: QueueBackend, dest: int
) -> None:
    fill(backend, dest, 2)
    lease = take(backend, 1)
    backend.set_backoff(dest, time.time() + 300, "HTTP 500")
    assert backend.lease(10, BIG) is None
    assert backend.ack(lease) == 1
    assert backend.backoff(dest) == (0.0, 0)
    assert len(take(backend)) == 1


def test_ack_and_lease_acks_the_whole_batch_clears_the_backoff_and_leases_the_next(
    backend: QueueBackend, dest: int
) -> None:
    """Batch after batch through ack_and_lease: each message is acked once, none is leased
    twice, the last step answers None, and the step clears a backoff like an ack."""
    ids = fill(backend, dest, 45)
    lease = take(backend, 20)
    backend.set_backoff(dest, 0.0, "HTTP 500")  # a failure on record, not waiting
    acked: list[int] = []
    leased: list[int] = list(lease.ids)
    while True:
        held = list(lease.ids)
        deleted, nxt = backend.ack_and_lease(lease, 20, BIG, destination=dest)
        assert deleted == len(held)
        acked += held
        assert backend.backoff(dest) == (0.0, 0)
        if nxt is None:
            break
        assert not set(nxt.ids) & set(acked)  # never a delivered message again
        leased += nxt.ids
        lease = nxt
    assert acked == leased == ids  # oldest first, each once
    assert backend.pending() == 0
    assert backend.live_leases() == 0


def test_ack_and_lease_of_a_stale_holder_acks_nothing_and_still_leases(
    open_backend: OpenBackend,
) -> None:
    """After a takeover the stale holder's step deletes nothing of the new holder's batch;
    its lease half is an ordinary lease of what is ready."""
    with freezegun.freeze_time("2030-01-01") as frozen:
        queue = open_backend(lease_timeout=60)
        dest = queue.destination(HOST, KEY)
        ids = fill(queue, dest, 5)
        stale = take(queue, 3)
        frozen.tick(61)
        current = take(queue, 3)  # expired: taken over
        assert list(current.ids) == ids[:3]
        deleted, nxt = queue.ack_and_lease(stale, 10, BIG)
        assert deleted == 0
        assert nxt is not None
        assert list(nxt.ids) == ids[3:]
        assert queue.pending() == 5
        assert queue.ack(current) == 3
        assert queue.ack(nxt) == 2
        assert queue.pending() == 0


# --------------------------------------------------------------------------- in-flight window


def test_a_stored_window_refuses_a_lease_once_halved_below_the_live_leases(
    backend: QueueBackend, dest: int
) -> None:
    """Where the backend keeps a window (``window.limit`` is a number), two congestion
    signals of two round trips halve it twice, below the 13 live leases, and the next lease
    is refused until settlements free the slots; where the window lives in each process
    (None) the queue refuses none. A signal never raises and never moves a message."""
    fill(backend, dest, 60)
    leases = [take(backend, 1) for _ in range(12)]
    backend.window.congested(leases[-1])
    leases.append(take(backend, 1))  # taken after the first halving: its signal counts
    backend.window.congested(leases[-1])
    limit = backend.window.limit(dest)
    assert limit is None or limit < len(leases)
    granted = backend.lease(1, BIG)
    assert (granted is None) == (limit is not None)
    assert backend.pending() == 60
    for lease in [*leases, *([granted] if granted else [])]:
        assert backend.ack(lease) == 1
    assert backend.lease(1, BIG) is not None


# --------------------------------------------------------------------------- dead letters


def test_dead_letters_keep_status_reason_excerpt_and_can_be_listed(
    backend: QueueBackend, dest: int
) -> None:
    ids = fill(backend, dest, 3)
    lease = take(backend)
    assert backend.dead_letter(lease, [], status=400, reason="none") == 0
    moved = backend.dead_letter(
        lease, ids[:2], status=400, reason="r" * 900, excerpt='{"error":"bad"}' + "e" * 3000
    )
    assert moved == 2
    assert backend.ack(lease) == 1
    assert backend.pending() == 0
    dead = backend.dead_letters()
    assert [index(d.body) for d in dead] == [0, 1]
    first = dead[0]
    assert (first.status, first.attempts, first.type, first.event) == (400, 1, "track", "E")
    assert first.message_id == "m-0"
    assert first.host == HOST
    assert KEY not in first.write_key
    assert len(first.reason) == 500
    assert len(first.excerpt) == 2000
    assert first.excerpt.startswith('{"error":"bad"}')
    assert first.as_dict()["body"]["messageId"] == "m-0"
    assert [d.id for d in backend.dead_letters([dead[1].id, 999_999])] == [dead[1].id]
    assert backend.stats().dead_letters == 2


def test_requeue_and_purge_take_all_dead_letters_or_the_chosen_ones(
    backend: QueueBackend, dest: int
) -> None:
    ids = fill(backend, dest, 4)
    backend.dead_letter(take(backend), ids, status=400, reason="bad")
    dead = backend.dead_letters()
    assert backend.requeue_dead_letters([dead[1].id]) == 1
    assert backend.purge_dead_letters([dead[0].id]) == 1
    assert backend.requeue_dead_letters([]) == 0
    assert backend.purge_dead_letters([]) == 0
    assert [index(d.body) for d in backend.dead_letters()] == [2, 3]
    assert backend.requeue_dead_letters() == 2
    assert [index(b) for b in take(backend).bodies] == [1, 2, 3]
    assert backend.purge_dead_letters() == 0
    assert backend.dead_letters() == []


def test_dead_letters_keep_to_their_share_of_the_cap_the_oldest_purged(
    open_backend: OpenBackend,
) -> None:
    cap = 512 * 1024
    queue = open_backend(max_queue_bytes=cap)
    dest = queue.destination(HOST, KEY)
    dead = 0
    for round_ in range(20):
        assert all(fill(queue, dest, 50, start=round_ * 50, pad=1000))
        lease = take(queue, 50)
        dead += queue.dead_letter(lease, lease.ids, status=400, reason="poison")
    # At the cap, dead letters beyond their share are purged before a message is refused.
    accepted = 0
    while queue.append(dest, body(accepted, pad=1000)):
        accepted += 1
    kept = queue.dead_letters()
    assert 0 < len(kept) < dead == 1000
    assert sum(len(d.body) for d in kept) <= cap // 10
    newest = [index(d.body) for d in kept]
    assert newest == list(range(1000 - len(kept), 1000))  # the oldest went first
    assert accepted * 1000 > cap // 2  # most of the cap is for messages


# --------------------------------------------------------------------------- caps


CAP = 256 * 1024


def test_drop_newest_refuses_at_the_cap_counts_exactly_and_accepts_after_delivery(
    open_backend: OpenBackend,
) -> None:
    queue = open_backend(max_queue_bytes=CAP, overflow="drop_newest")
    dest = queue.destination(HOST, KEY)
    results = fill(queue, dest, 400, pad=1000)
    stored = [r for r in results if r]
    refused = results.count(0)
    assert refused > 0
    assert results[: len(stored)] == stored  # once full, every later one was refused
    stats = queue.stats()
    assert stats.dropped == refused
    assert stats.pending == len(stored)
    assert stats.bytes <= CAP
    everything = take(queue, 1000)
    assert [index(b) for b in everything.bodies] == list(range(len(stored)))
    assert queue.append(dest, body(998, pad=1000)) == 0
    assert queue.ack(everything) == len(stored)
    assert queue.append(dest, body(999, pad=1000)) > 0
    assert queue.stats().dropped == refused + 1


def test_drop_oldest_drops_the_oldest_unleased_and_never_a_leased_message(
    open_backend: OpenBackend,
) -> None:
    queue = open_backend(max_queue_bytes=CAP, overflow="drop_oldest")
    dest = queue.destination(HOST, KEY)
    fill(queue, dest, 10, pad=1000)
    held = take(queue, 5)
    appended = 10
    for i in range(10, 600):
        assert queue.append(dest, body(i, pad=1000)) > 0
        appended += 1
    stats = queue.stats()
    assert stats.dropped > 0
    assert stats.dropped == appended - stats.pending
    assert stats.bytes <= CAP
    assert queue.ack(held) == 5
    rest = take(queue, 10_000)
    left = [index(b) for b in rest.bodies]
    assert left[-1] == 599
    assert left == list(range(left[0], 600))  # only the oldest went


def test_drop_counters_of_both_policies_add_up(open_backend: OpenBackend) -> None:
    first = open_backend(max_queue_bytes=CAP, overflow="drop_oldest")
    dest = first.destination(HOST, KEY)
    fill(first, dest, 400, pad=1000)
    dropped_oldest = first.stats().dropped
    assert dropped_oldest > 0
    more = fill(first, dest, 50, start=400, pad=1000)
    assert all(more)
    # Every message appended is either still queued or counted as dropped (how many old
    # ones one new message displaces depends on how the rows fill the file's pages).
    stats = first.stats()
    assert stats.dropped > dropped_oldest
    assert stats.dropped == 450 - stats.pending


def count_capped(open_backend: OpenBackend, **settings: Any) -> QueueBackend:
    """A queue with a ``max_queue_size`` (every backend has the count cap)."""
    return open_backend(**settings)


def test_count_cap_drop_newest_refuses_the_message_past_max_queue_size(
    open_backend: OpenBackend,
) -> None:
    queue = count_capped(open_backend, max_queue_size=5, overflow="drop_newest")
    dest = queue.destination(HOST, KEY)
    results = fill(queue, dest, 8)
    assert [bool(r) for r in results] == [True] * 5 + [False] * 3
    assert queue.stats().dropped == 3
    assert queue.stats().pending == 5
    lease = take(queue, 2)
    assert queue.append(dest, body(8)) == 0  # leased messages still count: not delivered
    assert queue.ack(lease) == 2
    assert all(fill(queue, dest, 2, start=9))
    assert queue.append(dest, body(11)) == 0
    assert [index(b) for b in take(queue).bodies] == [2, 3, 4, 9, 10]


def test_count_cap_drop_oldest_drops_the_oldest_unleased_message(
    open_backend: OpenBackend,
) -> None:
    queue = count_capped(open_backend, max_queue_size=4, overflow="drop_oldest")
    dest = queue.destination(HOST, KEY)
    fill(queue, dest, 4)
    held = take(queue, 1)  # message 0 is leased: never dropped
    assert all(fill(queue, dest, 3, start=4))
    stats = queue.stats()
    assert (stats.pending, stats.dropped) == (4, 3)
    assert queue.ack(held) == 1
    assert [index(b) for b in take(queue).bodies] == [4, 5, 6]


def test_count_cap_refuses_when_everything_is_leased(open_backend: OpenBackend) -> None:
    queue = count_capped(open_backend, max_queue_size=3, overflow="drop_oldest")
    dest = queue.destination(HOST, KEY)
    fill(queue, dest, 3)
    take(queue)
    assert queue.append(dest, body(3)) == 0
    assert queue.stats().dropped == 1


def test_count_cap_holds_over_many_appends(open_backend: OpenBackend) -> None:
    """Past the estimate's refresh interval the cap is still exact."""
    queue = count_capped(open_backend, max_queue_size=300, overflow="drop_newest")
    dest = queue.destination(HOST, KEY)
    results = fill(queue, dest, 700)
    assert sum(1 for r in results if r) == 300
    assert queue.stats().pending == 300
    assert queue.stats().dropped == 400


# --------------------------------------------------------------------------- stats, close


def test_the_queues_last_error_is_a_still_failing_destinations_and_clears_on_delivery(
    backend: QueueBackend,
) -> None:
    """``status`` text said "none" once the destination delivered again while ``--json``
    (and ``Client.stats()``) kept the old error: now both say it is over."""
    with freezegun.freeze_time("2030-01-01") as frozen:
        a = backend.destination(HOST, KEY)
        b = backend.destination(OTHER_HOST, OTHER_KEY)
        backend.append(a, body(0))
        backend.append(b, body(1))
        backend.set_backoff(a, time.time() + 5, "HTTP 503")
        frozen.tick(10)
        backend.set_backoff(b, time.time() + 5, "HTTP 401")
        assert (backend.stats().last_error or {}).get("message") == "HTTP 401"
        frozen.tick(10)
        backend.ack(take(backend, destination=b))  # b delivers again: its error is over
        stats = backend.stats()
        assert stats.last_error is not None
        assert (stats.last_error["message"], stats.last_error["host"]) == ("HTTP 503", HOST)
        assert stats.last_error["at"].startswith("2030-01-01T00:00:00")
        backend.ack(take(backend, destination=a))
        stats = backend.stats()
        assert stats.last_error is None
        assert stats.as_dict()["last_error"] is None
        # Each destination keeps its own last error, as history, beside failures == 0.
        by_host = {d.host: (d.failures, d.last_error) for d in stats.destinations}
        assert by_host == {HOST: (0, "HTTP 503"), OTHER_HOST: (0, "HTTP 401")}


def test_stats_count_pending_leased_dead_letters_bytes_age_and_destinations(
    backend: QueueBackend,
) -> None:
    with freezegun.freeze_time("2030-01-01") as frozen:
        a = backend.destination(HOST, KEY)
        b = backend.destination(OTHER_HOST, OTHER_KEY)
        ids = [backend.append(a, body(i)) for i in range(3)]
        backend.append(b, body(3))
        frozen.tick(10)
        lease = take(backend, 2, destination=a)
        backend.dead_letter(lease, ids[:1], status=400, reason="bad")
        backend.set_backoff(b, time.time() + 60, "HTTP 503")
        stats = backend.stats()
        assert stats.pending == 3
        assert stats.leased == 1
        assert stats.dead_letters == 1
        assert stats.bytes == sum(len(body(i)) for i in (1, 2, 3))
        assert stats.oldest_age_seconds == 10.0
        assert stats.dropped == 0
        assert stats.last_error is not None
        assert stats.last_error["message"] == "HTTP 503"
        assert stats.last_error["host"] == OTHER_HOST
        assert stats.last_error["at"].startswith("2030-01-01T00:00:10")
        by_host = {d.host: d for d in stats.destinations}
        assert (by_host[HOST].pending, by_host[HOST].leased) == (2, 1)
        assert by_host[HOST].backoff_until is None
        assert by_host[OTHER_HOST].failures == 1
        assert (by_host[OTHER_HOST].backoff_until or "").startswith("2030-01-01T00:01:10")
        assert all(
            KEY not in d.write_key and OTHER_KEY not in d.write_key for d in stats.destinations
        )
        assert stats.as_dict()["destinations"][0]["host"] == HOST


def test_a_closed_queue_refuses_calls_with_queue_error(backend: QueueBackend, dest: int) -> None:
    fill(backend, dest, 1)
    backend.close()
    with pytest.raises(QueueError):
        backend.append(dest, body(1))
    with pytest.raises(QueueError):
        backend.lease(10, BIG)
