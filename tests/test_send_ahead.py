"""The calling thread's second request in flight: ``_pass.send_ahead`` and its use in
``_pass.deliver_pass``.

A delivery pass sends the batch after the one in flight before it reads that one's answer,
so the server works on one batch while the thread settles the other, without a second
thread (on loopback, helper threads only fought over the GIL). Each test counts what the
collector received and what the client sent: no loss, no duplicate without a fault, at
most two requests of one thread outstanding, and every lease settled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _rawserver import RawServer, read_request
from conftest import WRITE_KEY

from durable_analytics import Client, _delivery, _pass, _pipeline
from durable_analytics._delivery import Deliverer
from durable_analytics._flusher import Flusher
from durable_analytics._pass import deliver_pass
from durable_analytics._pipeline import window_for, windows
from durable_analytics._store.sqlite import SqliteQueue
from durable_analytics._transport import HTTPTransport, Outcome
from durable_analytics.testing import Collector


class _Requests(HTTPTransport):
    """HTTP, with the client's own record of each request: (thread, started, answer read)."""

    def __init__(self, timeout: float = 5.0) -> None:
        super().__init__(timeout=timeout)
        self.log: list[tuple[int, float, float]] = []
        self._lock = threading.Lock()

    def send(self, destination: Any, bodies: Any, **kw: Any) -> Outcome:
        started = time.monotonic()
        return self._done(started, super().send(destination, bodies, **kw))

    def start(self, destination: Any, bodies: Any, **kw: Any) -> Any:
        started = time.monotonic()
        pending = super().start(destination, bodies, **kw)
        if pending is None:
            return None
        transport = self

        class Timed:
            def finish(self) -> Outcome:
                return transport._done(started, pending.finish())

            def cancel(self) -> None:
                pending.cancel()

        return Timed()

    def _done(self, started: float, outcome: Outcome) -> Outcome:
        with self._lock:
            self.log.append((threading.get_ident(), started, time.monotonic()))
        return outcome

    def most_outstanding(self) -> int:
        """The most requests this client had started and not yet read at once."""
        events = sorted([(s, 1) for _, s, _ in self.log] + [(e, -1) for _, _, e in self.log])
        now = most = 0
        for _, step in events:
            now += step
            most = max(most, now)
        return most


@pytest.fixture(autouse=True)
def _never_latency_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # A loaded machine can make loopback look slow enough for helper threads; these tests
    # are about the calling thread alone.
    monkeypatch.setattr(_pipeline, "PIPELINE_MIN_RTT", 1e9)


@pytest.fixture
def queue(queue_path: Path) -> Iterator[SqliteQueue]:
    q = SqliteQueue(queue_path, lease_timeout=60.0)
    yield q
    q.close()


def _fill(queue: SqliteQueue, host: str, n: int) -> list[str]:
    dest = queue.destination(host, WRITE_KEY)
    ids = [f"m{i}" for i in range(n)]
    for message_id in ids:
        body = b'{"type":"track","event":"E","userId":"u","messageId":"%s"}' % message_id.encode()
        queue.append(dest, body)
    return ids


@contextlib.contextmanager
def _another_pass_holds_a_slot(url: str, size: int) -> Iterator[None]:
    """Another pass of this process holds one slot of ``url``'s window of ``size`` (its
    request in flight) for as long as the block runs."""
    other = window_for(url, WRITE_KEY, size)
    assert other.try_acquire(size) is not None
    try:
        yield
    finally:
        other.release()


def test_one_thread_keeps_two_batches_in_flight_and_sends_each_once(
    queue: SqliteQueue, collector: Collector
) -> None:
    ids = _fill(queue, collector.url, 400)
    transport = _Requests()
    deliverer = Deliverer(queue, transport, max_in_flight=8)

    stats = deliver_pass(queue, deliverer)

    assert stats.sent == 400
    assert collector.message_ids() == dict.fromkeys(ids, 1)
    assert collector.requests == 20
    assert {thread for thread, _, _ in transport.log} == {threading.get_ident()}
    assert transport.most_outstanding() == 2
    assert queue.stats().leased == 0


def test_a_window_of_one_slot_leaves_nothing_to_send_ahead(
    queue: SqliteQueue, collector: Collector
) -> None:
    ids = _fill(queue, collector.url, 100)
    transport = _Requests()
    deliver_pass(queue, Deliverer(queue, transport, max_in_flight=1))
    assert collector.message_ids() == dict.fromkeys(ids, 1)
    assert transport.most_outstanding() == 1
    assert windows()[collector.url].peak == 1


def test_a_batch_sent_ahead_of_one_that_failed_for_good_gets_no_quick_retries(
    queue: SqliteQueue, collector: Collector
) -> None:
    """The batch before it had its quick retries and failed: the destination now backs off,
    so the batch already on the wire is settled by its own answer, with one report."""
    collector.set_default(500)
    _fill(queue, collector.url, 100)
    reports: list[int] = []
    deliverer = Deliverer(
        queue,
        _Requests(),
        max_in_flight=8,
        max_retries=2,
        sleep=lambda _seconds: None,
        on_error=lambda _exc, messages: reports.append(len(messages)),
    )

    stats = deliver_pass(queue, deliverer)

    assert stats.sent == 0
    assert collector.requests == 4  # the first batch thrice, the one sent ahead once
    assert reports == [20, 20]  # each batch reported once
    assert queue.pending() == 100
    assert queue.stats().leased == 0


def test_a_batch_sent_ahead_is_acked_when_the_retries_before_it_outlast_its_timeout(
    queue: SqliteQueue, collector: Collector
) -> None:
    """Its answer came long before it was read (the thread was retrying the batch before):
    it is the server's answer, not a timeout, so the batch is not sent again."""
    collector.script(500, 200, 500)  # first batch: 500, 500, then 200; the second: 200
    ids = _fill(queue, collector.url, 40)
    deliverer = Deliverer(
        queue,
        _Requests(timeout=0.3),
        max_in_flight=8,
        max_retries=3,
        sleep=lambda _seconds: time.sleep(0.25),  # two pauses outlast the 0.3 s timeout
    )

    stats = deliver_pass(queue, deliverer)

    assert stats.sent == 40
    assert collector.message_ids() == dict.fromkeys(ids, 1)
    assert collector.requests == 4
    assert queue.pending() == 0


def test_an_interrupted_pass_hands_the_batch_sent_ahead_back_at_once(
    queue: SqliteQueue, collector: Collector
) -> None:
    ids = _fill(queue, collector.url, 200)
    deliverer = Deliverer(queue, _Requests(), max_in_flight=8)

    def interrupt(_sent: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        deliver_pass(queue, deliverer, progress=interrupt)

    # Nothing is left under a lease to wait for its expiry (60 s here): the next pass
    # sends the rest now. The batch that was on the wire may arrive twice (an interrupt
    # is a fault), nothing else.
    assert queue.stats().leased == 0
    left = queue.pending()
    assert deliver_pass(queue, deliverer).sent == left
    received = collector.message_ids()
    assert set(received) == set(ids)
    assert sum(received.values()) - len(ids) <= 20
    assert queue.pending() == 0


def test_the_flusher_thread_delivers_nothing_while_a_caller_steps_it_aside(
    queue: SqliteQueue, collector: Collector
) -> None:
    """``flush()`` delivers in the caller's thread; the flusher thread's pass beside it
    would only take turns at the GIL with it."""
    ids = _fill(queue, collector.url, 40)
    flusher = Flusher(Deliverer(queue, HTTPTransport()), flush_interval=0.0)
    with flusher.stepping_aside():
        flusher._cycle()
        assert collector.requests == 0
    flusher._cycle()
    assert collector.message_ids() == dict.fromkeys(ids, 1)


def test_the_flusher_thread_steps_aside_for_one_destination_until_another_has_messages(
    queue: SqliteQueue, collector: Collector
) -> None:
    """Stepped aside for the flushed destination, the thread delivers nothing while the
    queue holds only that destination's messages, and delivers once another's arrive."""
    ids = _fill(queue, collector.url, 40)
    flushed = queue.destination(collector.url, WRITE_KEY)
    flusher = Flusher(Deliverer(queue, HTTPTransport()), flush_interval=0.0)
    with Collector(WRITE_KEY) as other, flusher.stepping_aside(flushed):
        flusher._cycle()
        assert collector.requests == 0
        others = _fill(queue, other.url, 20)
        flusher._cycle()
        assert other.message_ids() == dict.fromkeys(others, 1)
    flusher._cycle()
    assert collector.message_ids() == dict.fromkeys(ids, 1)


def test_a_pass_of_the_flusher_thread_ends_when_a_caller_steps_it_aside(
    queue: SqliteQueue, collector: Collector
) -> None:
    collector.set_delay(0.05)
    ids = _fill(queue, collector.url, 400)
    flusher = Flusher(Deliverer(queue, HTTPTransport(), max_in_flight=2), flush_interval=0.0)
    passing = threading.Thread(target=flusher._cycle)
    passing.start()
    assert collector.wait_for_requests(1)
    with flusher.stepping_aside():
        passing.join(10.0)
        assert not passing.is_alive()
        delivered = len(collector.message_ids())
        assert 0 < delivered <= 100  # the batches it held, not the backlog
        assert queue.stats().leased == 0
    while flusher._cycle() == 0.0:
        pass
    assert collector.message_ids() == dict.fromkeys(ids, 1)


def test_a_batch_is_never_sent_ahead_of_one_still_waiting_for_a_slot(
    queue: SqliteQueue, collector: Collector
) -> None:
    """Another pass of this process holds one of the window's two slots. A batch whose
    send ahead found the window full goes next by ``acquire``: the batch after it must not
    take the slot it waits for (the thread would wait for itself, until the deadline, or
    for ever without one, the batch sent ahead unread meanwhile)."""
    ids = _fill(queue, collector.url, 80)
    deliverer = Deliverer(queue, _Requests(), max_in_flight=2)
    with _another_pass_holds_a_slot(collector.url, 2):
        stats = deliver_pass(queue, deliverer, deadline=time.monotonic() + 3.0)
    assert (stats.sent, stats.kept) == (len(ids), 0)
    assert collector.message_ids() == dict.fromkeys(ids, 1)
    assert queue.stats().leased == 0


def test_a_pass_that_once_found_the_window_full_sends_ahead_again_once_there_is_room(
    queue: SqliteQueue, collector: Collector
) -> None:
    """Another pass holds two of three slots as this pass starts, so its second batch waits
    unsent; once the other pass's requests end, this pass keeps two requests out again
    rather than one at a time for the rest of the backlog."""
    collector.set_delay(0.02)
    ids = _fill(queue, collector.url, 400)
    transport = _Requests()
    other = window_for(collector.url, WRITE_KEY, 3)
    held = [other.try_acquire(3), other.try_acquire(3)]
    assert None not in held

    def release_when_this_pass_started() -> None:
        collector.wait_for_requests(1)
        for _ in held:
            other.release()

    releasing = threading.Thread(target=release_when_this_pass_started)
    releasing.start()
    stats = deliver_pass(queue, Deliverer(queue, transport, max_in_flight=3))
    releasing.join(5.0)

    assert stats.sent == 400
    assert collector.message_ids() == dict.fromkeys(ids, 1)
    assert transport.most_outstanding() == 2
    assert queue.stats().leased == 0


def test_a_batch_not_yet_sent_goes_back_when_the_one_before_it_failed_for_good(
    queue: SqliteQueue, collector: Collector
) -> None:
    """The batch after the one in flight found the window full (another pass holds a
    slot), so it waits unsent; the one in flight then fails for good and its destination
    backs off: the waiting batch goes back to the queue instead of making one more request
    to a destination in backoff."""
    collector.set_default(500)
    _fill(queue, collector.url, 40)
    deliverer = Deliverer(
        queue, _Requests(), max_in_flight=2, max_retries=2, sleep=lambda _seconds: None
    )
    with _another_pass_holds_a_slot(collector.url, 2):
        # (The 500s halved the window to the other pass's one slot: a batch that went on
        # to ``acquire`` would wait for it until this deadline.)
        stats = deliver_pass(queue, deliverer, deadline=time.monotonic() + 5.0)
    assert collector.requests == 3  # the first batch and its two quick retries, no more
    assert (stats.sent, stats.kept) == (0, 20)
    assert queue.pending() == 40
    assert queue.stats().leased == 0


def test_a_batch_leased_ahead_whose_lease_ran_out_while_it_waited_is_not_sent_twice(
    queue_path: Path, collector: Collector
) -> None:
    """The batch after the one in flight found the window full, so it waits leased and
    unsent while the one before fails and is retried (0.7 s, past the 0.6 s lease). Its
    lease runs out, and the ack of the batch before leases the same messages again. The
    stale lease must not be sent: that would be a duplicate without any fault (every
    answer was read in time)."""
    queue = SqliteQueue(queue_path, lease_timeout=0.6)
    try:
        collector.script(500)  # the first batch's first request; its retry is answered 200
        ids = _fill(queue, collector.url, 60)
        deliverer = Deliverer(
            queue,
            _Requests(timeout=0.3),
            max_in_flight=2,
            max_retries=3,
            sleep=lambda _seconds: time.sleep(0.7),
        )
        with _another_pass_holds_a_slot(collector.url, 2):
            stats = deliver_pass(queue, deliverer, deadline=time.monotonic() + 10.0)
        assert collector.message_ids() == dict.fromkeys(ids, 1)
        assert collector.requests == 4  # the first batch twice, then one request each
        assert stats.sent == 60
        assert queue.pending() == 0
    finally:
        queue.close()


def test_the_keeper_extends_a_lease_that_waited_a_third_of_its_timeout_at_once(
    queue_path: Path,
) -> None:
    """A lease handed to the keeper late (it waited, leased ahead) is extended a third of
    the lease after it was taken, not a third after the keeping started: that would be past
    its expiry."""
    queue = SqliteQueue(queue_path, lease_timeout=30.0)
    try:
        _fill(queue, "http://127.0.0.1:9", 1)
        lease = queue.lease(20, 500_000)
        assert lease is not None
        keeper = _pipeline._Keeper()
        young = dataclasses.replace(lease, token="young")
        old = dataclasses.replace(lease, expires_monotonic=time.monotonic() + 15.0)
        keeper._held = {}  # not started: only the schedule is looked at
        with keeper._cond:
            keeper._thread = threading.current_thread()  # so ``add`` starts no thread
            keeper.add(queue, young)
            keeper.add(queue, old)
            due, _wait = keeper._due(time.monotonic())
        assert [held.token for _q, held in due] == [lease.token]
    finally:
        queue.close()


def test_a_lease_younger_than_a_third_of_its_timeout_is_sent_without_asking_the_queue(
    queue_path: Path,
) -> None:
    """``still_held`` asks the queue (a transaction) only for a lease that may have run out,
    and then answers what the queue says: lost once another holder took the messages."""
    queue = SqliteQueue(queue_path, lease_timeout=30.0)
    try:
        _fill(queue, "http://127.0.0.1:9", 1)
        lease = queue.lease(20, 500_000)
        assert lease is not None
        asked: list[str] = []
        extend = queue.extend

        def counted(held: Any, *, whole: bool = False) -> bool:
            assert whole  # all of it must still be this holder's
            asked.append(held.token)
            return extend(held, whole=whole)

        queue.extend = counted  # type: ignore[method-assign]
        assert _pipeline.still_held(queue, lease)
        assert asked == []
        old = dataclasses.replace(lease, expires_monotonic=time.monotonic() + 5.0)
        assert _pipeline.still_held(queue, old)
        assert asked == [lease.token]
        queue.ack(lease)
        assert not _pipeline.still_held(queue, old)
    finally:
        queue.close()


def test_a_transport_that_overrides_post_sees_every_batch(
    queue: SqliteQueue, collector: Collector
) -> None:
    """``post`` is HTTPTransport's method for one batch body: a subclass that overrides it
    (to count, to record, to add a header) must see the batches sent ahead too."""
    ids = _fill(queue, collector.url, 100)
    posted: list[int] = []

    class Recording(HTTPTransport):
        def post(self, *args: Any, **kwargs: Any) -> Outcome:
            outcome = super().post(*args, **kwargs)
            posted.append(outcome.status or 0)
            return outcome

    deliver_pass(queue, Deliverer(queue, Recording(), max_in_flight=8))
    assert collector.message_ids() == dict.fromkeys(ids, 1)
    assert len(posted) == collector.requests == 5


def test_a_stop_that_comes_while_the_pass_moves_on_leaves_no_lease_behind(
    queue: SqliteQueue, collector: Collector
) -> None:
    """``stop`` set (by another thread) just after the pass decided to keep the batch its
    ack leased: the pass ends, and that batch goes back with the one it ends on, not left
    under a lease until it expires (60 s here)."""
    _fill(queue, collector.url, 80)
    deliverer = Deliverer(queue, _Requests(), max_in_flight=2)

    class Stop(threading.Event):
        """Set from the second look after the first batch was counted (another thread
        setting it between the pass's two looks)."""

        looks = -1

        def is_set(self) -> bool:
            if self.looks >= 0:
                self.looks += 1
            return self.looks >= 2 or super().is_set()

    stop = Stop()

    def counted(_sent: int) -> None:
        stop.looks = max(stop.looks, 0)

    # The other pass's slot: the second batch cannot be sent ahead.
    with _another_pass_holds_a_slot(collector.url, 2):
        stats = deliver_pass(queue, deliverer, stop=stop, progress=counted)
    assert stats.sent == 20
    assert queue.stats().leased == 0
    assert queue.pending() == 60


def test_a_flush_steps_the_flusher_thread_aside_for_its_own_destination_only(
    queue_path: Path, collector: Collector, raw_server: Callable[..., RawServer]
) -> None:
    """``flush()`` delivers its client's destination only: the queue's other destinations
    are still the flusher thread's to deliver while it runs, however long it takes."""
    answer = threading.Event()
    asked = threading.Event()

    def held(conn: socket.socket) -> None:
        read_request(conn)
        asked.set()
        answer.wait(10.0)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    slow = raw_server(held)
    client = Client(WRITE_KEY, host=slow.url, queue_path=queue_path, on_exit="none")
    try:
        client.track("u", "E")
        flushing = threading.Thread(target=client.flush)
        flushing.start()
        try:
            assert asked.wait(10.0)
            ids = _fill(client.queue, collector.url, 20)  # another destination's backlog
            assert client._flusher is not None
            client._flusher.notify()
            assert collector.wait_for_messages(20, timeout=5.0)
            assert collector.message_ids() == dict.fromkeys(ids, 1)
        finally:
            answer.set()
            flushing.join(10.0)
    finally:
        client.shutdown()


def test_a_failing_destination_takes_no_quick_retries_from_another_sent_ahead(
    queue: SqliteQueue, collector: Collector
) -> None:
    """The batch sent ahead is of another destination than the one that failed for good
    before it: that destination is not backing off, its batch keeps its quick retries."""
    collector.set_default(500)
    _fill(queue, collector.url, 20)
    with Collector(WRITE_KEY) as other:
        other.script(500)  # then 200
        ids = _fill(queue, other.url, 20)
        deliverer = Deliverer(
            queue, _Requests(), max_in_flight=8, max_retries=2, sleep=lambda _seconds: None
        )
        deliver_pass(queue, deliverer)
        assert other.message_ids() == dict.fromkeys(ids, 1)
        assert other.requests == 2
    assert queue.pending() == 20
    assert queue.stats().leased == 0


def test_an_interrupt_between_the_request_leaving_and_its_record_leaks_nothing(
    queue: SqliteQueue, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C right after ``start`` wrote the request: its window slot, its keeper entry
    and its lease all go back, and its connection is dropped."""
    _fill(queue, collector.url, 100)
    deliverer = Deliverer(queue, _Requests(), max_in_flight=8)

    def interrupted(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(_pass, "Ahead", interrupted)
    with pytest.raises(KeyboardInterrupt):
        deliver_pass(queue, deliverer)

    window = windows()[collector.url]
    assert window.in_flight == 0
    assert not _pipeline._keeper._held
    assert queue.stats().leased == 0
    monkeypatch.undo()
    assert deliver_pass(queue, Deliverer(queue, HTTPTransport(), max_in_flight=8)).sent >= 80
    assert set(collector.message_ids()) == {f"m{i}" for i in range(100)}


def test_an_interrupt_as_deliver_takes_a_batch_sent_ahead_leaks_no_window_slot(
    queue: SqliteQueue, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after ``deliver`` took the batch sent ahead and before its request's slot is
    in the hands of the block that gives it back: the slot, the lease and the connection
    all go back."""
    _fill(queue, collector.url, 100)

    def interrupted(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(_delivery, "keep_leased", interrupted)
    with pytest.raises(KeyboardInterrupt):
        deliver_pass(queue, Deliverer(queue, _Requests(), max_in_flight=8))

    assert windows()[collector.url].in_flight == 0
    assert not _pipeline._keeper._held
    assert queue.stats().leased == 0
