"""Who waits for whom inside one process: appends go before delivering transactions.

Each test's name states the behaviour it proves. Orders are counted (which transaction
committed before which), never timed.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from durable_analytics._store.settle import SETTLE_GRACE, settling
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite import waits
from durable_analytics._store.sqlite.waits import busy_pause
from durable_analytics.exceptions import QueueBusy

from .sqlite_helpers import body, index

DELIVERING_THREADS = 12


def _until(condition: object, what: str) -> None:
    """Poll (briefly) until ``condition()`` holds."""
    deadline = time.monotonic() + 10
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_an_append_waits_behind_at_most_one_delivering_transaction_besides_the_holder(
    queue: Queue, dest: int
) -> None:
    """With a dozen delivering threads queued for the write lock, a waiting append is
    passed by at most one of them: each delivering transaction looks whether the append's
    row is committed yet, and the process's own count (``most_passed``) agrees."""
    db = queue._db
    order = db.waits.order
    saw_append: list[bool] = []  # per delivering transaction: the append had committed
    holding = threading.Event()
    release = threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        holding.set()
        release.wait(10)

    def look(conn: sqlite3.Connection) -> None:
        count = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        saw_append.append(count == 1)

    def delivering(n: int) -> None:
        db.write(look)

    holder = threading.Thread(target=db.write, args=(hold,))
    holder.start()
    assert holding.wait(10)
    threads = [threading.Thread(target=delivering, args=(n,)) for n in range(DELIVERING_THREADS)]
    for thread in threads:
        thread.start()
    # One of them has its turn (and waits for the lock), the others wait for theirs.
    _until(lambda: not order.turn.acquire(blocking=False), "a delivering thread took its turn")
    time.sleep(0.05)  # let the others reach their wait (not needed for correctness)

    appended: list[int] = []
    producer = threading.Thread(target=lambda: appended.append(queue.append(dest, body(1))))
    producer.start()
    _until(lambda: order.waiting, "the append waits for the write lock")
    release.set()
    producer.join(10)
    for thread in [holder, *threads]:
        thread.join(10)
    assert appended
    assert appended[0] > 0

    assert len(saw_append) == DELIVERING_THREADS
    before = saw_append.count(False)
    assert before <= 1, f"{before} delivering transactions went before the waiting append"
    assert order.most_passed <= 1, order.most_passed
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    assert [index(b) for b in lease.bodies] == [1]  # stored once, readable


def test_a_delivering_transaction_that_ends_while_an_append_waits_hands_over_the_gil(
    queue: Queue, dest: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delivering thread gives up the GIL (``sleep(0)``) right after its transaction
    when an append was waiting for the lock, and only then: without a waiting append it
    goes straight on."""
    db = queue._db
    order = db.waits.order
    yields: list[str] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        if seconds == 0:
            yields.append(threading.current_thread().name)
        real_sleep(seconds)

    monkeypatch.setattr(waits.time, "sleep", sleep)
    db.write(lambda conn: conn.execute("SELECT 1").fetchone())
    assert yields == []  # nobody waited

    holding = threading.Event()
    release = threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        holding.set()
        release.wait(10)

    holder = threading.Thread(target=db.write, args=(hold,), name="delivering")
    holder.start()
    assert holding.wait(10)
    producer = threading.Thread(target=queue.append, args=(dest, body(1)))
    producer.start()
    _until(lambda: order.waiting, "the append waits for the write lock")
    release.set()
    holder.join(10)
    producer.join(10)
    assert yields == ["delivering"]
    assert queue.pending() == 1


def test_appends_are_ordered_before_deliveries_when_both_wait(queue: Queue, dest: int) -> None:
    """Whenever appends and delivering transactions both wait for the write lock, every
    append commits before all but at most one of the delivering transactions that were
    waiting with it (counted over many rounds)."""
    db = queue._db
    order = db.waits.order
    log: list[str] = []
    log_lock = threading.Lock()
    stop = threading.Event()

    def delivering() -> None:
        while not stop.is_set():
            db.write(lambda conn: conn.execute("SELECT 1").fetchone())
            with log_lock:
                log.append("d")

    threads = [threading.Thread(target=delivering) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        for i in range(300):
            assert queue.append(dest, body(i)) > 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert order.entered > 0  # the delivering threads did run their transactions
    assert order.most_passed <= 1, order.most_passed
    assert queue.pending() == 300


def test_a_delivering_transaction_waiting_for_its_turn_gives_up_at_the_deadline(
    queue: Queue,
) -> None:
    """A delivering thread waits for its turn no longer than a flush's deadline allows:
    QueueBusy, and the transaction never ran."""
    db = queue._db
    ran: list[int] = []
    holding = threading.Event()
    release = threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        holding.set()
        release.wait(10)

    holder = threading.Thread(target=db.write, args=(hold,))
    holder.start()
    try:
        assert holding.wait(10)
        with db.bounded(0.0), pytest.raises(QueueBusy):
            db.write(lambda conn: ran.append(1))
    finally:
        release.set()
        holder.join(10)
    assert ran == []


def test_settling_a_delivered_batch_may_wait_half_a_second_past_the_deadline_not_more(
    queue: Queue, queue_path: Path, dest: int
) -> None:
    """Another process holds the write lock for 0.1 s past a deadline that has passed. An
    ack gave up after the 50 ms every wait keeps, so the batch the server had went again;
    inside ``settling`` it waits for the lock (the grace is 0.5 s), while an ordinary write
    still gives up. A holder that outlasts the grace is given up on too, at the grace."""
    queue.append(dest, body(1))
    lease = queue.lease(10, 1 << 20)
    assert lease is not None
    other = sqlite3.connect(queue_path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        with queue.bounded(0.0):
            with pytest.raises(QueueBusy):
                queue.extend(lease)
            releasing = threading.Timer(0.1, other.rollback)  # well inside the 0.5 s grace
            releasing.start()
            with settling():
                assert queue.ack(lease) == 1
        releasing.join(10)
        assert queue.pending() == 0

        other.execute("BEGIN IMMEDIATE")  # held until the end: a stuck holder
        started = time.monotonic()
        with queue.bounded(0.0), settling(), pytest.raises(QueueBusy):
            queue.append(dest, body(2))
        waited = time.monotonic() - started
        assert SETTLE_GRACE - 0.05 <= waited < SETTLE_GRACE + 1.5
    finally:
        if other.in_transaction:
            other.rollback()
        other.close()


def test_an_appends_busy_wait_retries_often_at_first_then_backs_off() -> None:
    """Against another process's lock an append pauses at most PRODUCER_MAX_PAUSE between
    retries for PRODUCER_FINE_FOR seconds, then backs off to MAX_PAUSE like a delivering
    connection, which backs off to MAX_PAUSE from the start."""
    delay, waited, pauses = 0.00002, 0.0, []
    while waited < waits.PRODUCER_FINE_FOR * 3:
        pause, delay = busy_pause(delay, waited, producer=True)
        pauses.append((waited, pause))
        waited += pause
    assert all(p <= waits.PRODUCER_MAX_PAUSE for w, p in pauses if w < waits.PRODUCER_FINE_FOR)
    assert pauses[-1][1] == waits.MAX_PAUSE
    delay, waited, delivering = 0.00002, 0.0, []
    for _ in range(20):
        pause, delay = busy_pause(delay, waited, producer=False)
        delivering.append(pause)
        waited += pause
    assert max(delivering) == waits.MAX_PAUSE
    assert delivering == sorted(delivering)
