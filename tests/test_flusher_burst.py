"""The flusher thread yields the GIL to a caller that keeps appending (``Flusher.burst_age``).

A caller appending without pause always leaves full batches, so a delivery pass of the
flusher thread used to go on for as long as the burst, and every call waited for the GIL it
held. Now a pass ends after its CPU slice while the oldest ready message is young, and the
rest waits on disk for the next pass. Counted: nothing is lost or sent twice. No timing is
asserted: the slice is 0 (end after every batch) and the caller's appends during a pass are
simulated by counting one after each batch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import WRITE_KEY

from durable_analytics import Client, _pipeline
from durable_analytics._delivery import Deliverer
from durable_analytics._flusher import (
    BURST_AGE,
    BURST_MIN_QUEUE_BYTES,
    Flusher,
    burst_age_for,
)
from durable_analytics._transport import HTTPTransport
from durable_analytics.testing import Collector


class FakeClock:
    """Wall-clock time that only moves when told to."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close(timeout=0)


@pytest.fixture
def stored(
    collector: Collector, queue_path: Path, clients: list[Client]
) -> tuple[Client, list[str]]:
    """200 messages (ten batches) stored by a Client without a flusher, and their ids."""
    client = Client(
        WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="none", on_exit="none"
    )
    clients.append(client)
    ids = []
    for i in range(200):
        ok, msg = client.track("user-1", "Event", {"i": i})
        assert ok
        ids.append(msg["messageId"])
    return client, ids


def caller_appending(flusher: Flusher) -> Deliverer:
    """The flusher's Deliverer, with one append of the caller counted after each batch."""
    deliverer = flusher.deliverer
    deliver = deliverer.deliver

    def deliver_while_appending(*args: Any, **kwargs: Any) -> Any:
        try:
            return deliver(*args, **kwargs)
        finally:
            flusher.appends += 1

    deliverer.deliver = deliver_while_appending  # type: ignore[method-assign]
    return deliverer


def new_flusher(client: Client, **settings: Any) -> Flusher:
    deliverer = Deliverer(client.queue, HTTPTransport(timeout=5.0), sleep=lambda _s: None)
    return Flusher(deliverer, cpu_slice=0.0, **settings)


def test_a_pass_ends_after_its_slice_when_the_caller_appended_and_the_rest_waits_ready(
    stored: tuple[Client, list[str]], collector: Collector
) -> None:
    client, ids = stored
    flusher = new_flusher(client)
    deliverer = caller_appending(flusher)
    per_pass = deliverer.batch_messages * deliverer.lease_batches

    first = flusher._deliver_next(may_yield=True)
    assert first is not None
    # The caller appended during the first batch: the second (the batch in hand when the
    # slice ran out) is the pass's last, and none is leased to follow it.
    assert first.sent == 2 * per_pass < len(ids)
    assert client.queue.pending() == len(ids) - 2 * per_pass
    assert client.queue.stats().leased == 0

    rest = flusher._deliver_next(may_yield=False)  # the oldest is old now: no yielding
    assert rest is not None
    assert rest.sent == len(ids) - 2 * per_pass
    received = collector.message_ids()
    assert set(received) == set(ids)
    assert max(received.values()) == 1  # none sent twice
    assert client.queue.pending() == 0


def test_a_pass_does_not_yield_to_a_caller_who_did_not_append(
    stored: tuple[Client, list[str]], collector: Collector
) -> None:
    client, ids = stored
    flusher = new_flusher(client)  # nobody appends during the pass
    stats = flusher._deliver_next(may_yield=True)
    assert stats is not None
    assert stats.sent == len(ids)
    assert collector.message_ids() == dict.fromkeys(ids, 1)


def test_a_pass_does_not_yield_with_a_share_of_1(
    stored: tuple[Client, list[str]], collector: Collector
) -> None:
    client, ids = stored
    flusher = new_flusher(client, share=1.0)
    caller_appending(flusher)
    stats = flusher._deliver_next(may_yield=True)
    assert stats is not None
    assert stats.sent == len(ids)


@pytest.mark.parametrize(("age", "yields"), [(0.5, True), (1.5, False)])
def test_the_flusher_yields_only_while_the_oldest_ready_message_is_younger_than_burst_age(
    stored: tuple[Client, list[str]], collector: Collector, age: float, yields: bool
) -> None:
    client, ids = stored
    oldest = client.queue.ready_summary(1)[1]
    assert oldest is not None
    flusher = new_flusher(client, burst_age=1.0, clock=FakeClock(oldest + age))
    deliverer = caller_appending(flusher)
    assert flusher._cycle() == 0.0  # it delivered
    sent = len(collector.message_ids())
    assert sent == (2 * deliverer.batch_messages * deliverer.lease_batches if yields else len(ids))


def test_a_flusher_with_burst_age_0_never_yields(
    stored: tuple[Client, list[str]], collector: Collector
) -> None:
    client, ids = stored
    flusher = new_flusher(client)  # burst_age=0, as in the worker and the child process
    caller_appending(flusher)
    assert flusher._cycle() == 0.0
    assert len(collector.message_ids()) == len(ids)


def test_burst_age_for_keeps_flush_interval_and_never_lets_a_burst_meet_a_cap() -> None:
    big = 1 << 30
    assert burst_age_for(5.0, big, None) == BURST_AGE
    assert burst_age_for(0.5, big, None) == 0.25  # half the interval: it still holds
    assert burst_age_for(5.0, big, 10_000) == 0.0  # a count cap: keep up instead
    assert burst_age_for(5.0, BURST_MIN_QUEUE_BYTES - 1, None) == 0.0
    assert burst_age_for(5.0, BURST_MIN_QUEUE_BYTES, None) == BURST_AGE


@pytest.mark.parametrize(
    ("settings", "expected"),
    [({}, BURST_AGE), ({"max_queue_size": 10_000}, 0.0), ({"flush_interval": 1.0}, 0.5)],
)
def test_a_client_s_flusher_thread_gets_its_burst_age_from_the_settings(
    collector: Collector,
    queue_path: Path,
    clients: list[Client],
    settings: dict[str, Any],
    expected: float,
) -> None:
    client = Client(
        WRITE_KEY, host=collector.url, queue_path=queue_path, on_exit="none", **settings
    )
    clients.append(client)
    client.track("user-1", "Event")  # starts the flusher thread
    assert client._flusher is not None
    assert client._flusher.burst_age == expected


def test_a_burst_tracked_with_the_flusher_thread_arrives_whole_once_flushed(
    collector: Collector, queue_path: Path, clients: list[Client]
) -> None:
    client = Client(WRITE_KEY, host=collector.url, queue_path=queue_path, on_exit="none")
    clients.append(client)
    ids = [client.track("user-1", "Event", {"i": i})[1]["messageId"] for i in range(3000)]
    result = client.flush()
    assert result.pending == 0
    received = collector.message_ids()
    assert set(received) == set(ids)
    assert max(received.values()) == 1


def delivering_threads(flusher: Flusher, appending_batches: int) -> list[str]:
    """Record the thread of every batch the flusher's Deliverer sends; the caller counts as
    appending during its first ``appending_batches`` batches (one append after each)."""
    deliverer = flusher.deliverer
    deliver = deliverer.deliver
    names: list[str] = []

    def deliver_recorded(*args: Any, **kwargs: Any) -> Any:
        names.append(threading.current_thread().name)
        try:
            return deliver(*args, **kwargs)
        finally:
            if len(names) <= appending_batches:
                flusher.appends += 1

    deliverer.deliver = deliver_recorded  # type: ignore[method-assign]
    return names


@contextlib.contextmanager
def stored_for_a_slow_collector(
    queue_path: Path, clients: list[Client], monkeypatch: pytest.MonkeyPatch, count: int
) -> Iterator[tuple[Client, list[str], str]]:
    """``count`` messages stored for a Collector that holds each answer 10 ms (long enough
    a round trip for the pipeline to start helpers; a window of their own for the test,
    helpers as many as it has), their ids and the Collector's URL."""
    monkeypatch.setattr(_pipeline, "_registry", _pipeline._Windows())
    monkeypatch.setattr(_pipeline, "REQUEST_COST", 0.0001)  # depth = max_in_flight
    with Collector(WRITE_KEY, delay=0.01) as slow:
        client = Client(
            WRITE_KEY, host=slow.url, queue_path=queue_path, flusher="none", on_exit="none"
        )
        clients.append(client)
        ids = [client.track("user-1", "Event", {"i": i})[1]["messageId"] for i in range(count)]
        yield client, ids, slow.url


@pytest.fixture
def slow_stored(
    queue_path: Path, clients: list[Client], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Client, list[str]]]:
    """400 messages (20 batches) for a Collector that holds each answer 10 ms."""
    with stored_for_a_slow_collector(queue_path, clients, monkeypatch, 400) as (client, ids, _):
        yield client, ids


def test_a_pass_during_a_burst_starts_no_helpers_while_the_caller_keeps_appending(
    slow_stored: tuple[Client, list[str]],
) -> None:
    """The share rule counts the flusher thread's CPU only: helpers started while the
    caller appends would take its GIL beyond that share (10,000 tracks at 50 ms took 0.82-0.86
    s beside them, 0.43-0.47 s without). The pass stays on its own thread."""
    client, ids = slow_stored
    flusher = new_flusher(client, burst_age=1.0)
    flusher.deliverer.max_in_flight = 8
    flusher.cpu_slice = 60.0  # the pass does not end on its slice here
    names = delivering_threads(flusher, appending_batches=1_000)
    stats = flusher._deliver_next(may_yield=True)
    assert stats is not None
    assert stats.sent == len(ids)
    assert set(names) == {threading.current_thread().name}
    assert client.queue.pending() == 0


def test_a_pass_during_a_burst_starts_helpers_once_the_caller_pauses(
    slow_stored: tuple[Client, list[str]],
) -> None:
    client, ids = slow_stored
    flusher = new_flusher(client, burst_age=1.0)
    flusher.deliverer.max_in_flight = 8
    flusher.cpu_slice = 60.0
    names = delivering_threads(flusher, appending_batches=4)
    stats = flusher._deliver_next(may_yield=True)
    assert stats is not None
    assert stats.sent == len(ids)
    caller = threading.current_thread().name
    assert set(names[:4]) == {caller}
    assert len(set(names)) > 1  # helpers joined once the appends stopped


@pytest.fixture
def slow_backlog(
    queue_path: Path, clients: list[Client], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Client, list[str], str]]:
    """1,500 messages (75 batches) for a Collector that holds each answer 10 ms, and its URL."""
    with stored_for_a_slow_collector(queue_path, clients, monkeypatch, 1500) as stored:
        yield stored


def measured_window(url: str, max_in_flight: int) -> None:
    """Round trips of 10 ms already seen to ``url`` (the flusher of a process that has sent
    before): its passes may start helpers from their first batch."""
    window = _pipeline.window_for(url, WRITE_KEY, max_in_flight)
    window.observe(0.01)
    window.observe(0.01)
    assert window.latency_bound


def test_a_pass_that_starts_during_a_burst_counts_the_appends_made_before_it(
    slow_backlog: tuple[Client, list[str], str],
) -> None:
    """The caller appended since the flusher's last look and goes on appending: the pass's
    first ask, a fraction of a millisecond after the pass began, saw no append in that
    instant and started every helper beside a caller calling once a millisecond."""
    client, ids, url = slow_backlog
    flusher = new_flusher(client, burst_age=1.0)
    flusher.deliverer.max_in_flight = 8
    flusher.cpu_slice = 60.0
    measured_window(url, 8)
    flusher.appends = 50  # the calls that made this backlog
    names = delivering_threads(flusher, appending_batches=4)
    stats = flusher._deliver_next(may_yield=True)
    assert stats is not None
    assert stats.sent == len(ids)
    caller = threading.current_thread().name
    # Asked before each batch: the appends before the pass and after each of the first 4
    # batches keep the first 5 on this thread; helpers join once the caller paused.
    assert set(names[:5]) == {caller}
    assert len(set(names)) > 1
    assert client.queue.pending() == 0


def test_a_pass_during_a_burst_ends_its_helpers_when_the_caller_appends_again(
    slow_backlog: tuple[Client, list[str], str],
) -> None:
    """Helpers started while the caller paused went on beside it once it appended again,
    for as long as the pass lasted (its slice counts the flusher thread's CPU only, a
    fraction of what they used): they now end after their batch, and the pass goes on alone."""
    client, ids, _ = slow_backlog
    flusher = new_flusher(client, burst_age=1.0)
    flusher.deliverer.max_in_flight = 8
    flusher.cpu_slice = 60.0  # the pass does not end on its slice here
    deliverer = flusher.deliverer
    deliver = deliverer.deliver
    caller = threading.current_thread().name
    lock = threading.Lock()
    finished = [0]
    entered: list[tuple[str, bool]] = []  # (thread, the caller appends again)

    def deliver_recorded(*args: Any, **kwargs: Any) -> Any:
        with lock:
            entered.append((threading.current_thread().name, finished[0] >= 10))
        try:
            return deliver(*args, **kwargs)
        finally:
            with lock:
                finished[0] += 1
                # Appending during the first 2 batches, paused until 10 were sent, then
                # appending again for the rest of the pass.
                if finished[0] <= 2 or finished[0] > 10:
                    flusher.appends += 1

    deliverer.deliver = deliver_recorded  # type: ignore[method-assign]
    stats = flusher._deliver_next(may_yield=True)
    assert stats is not None
    assert stats.sent == len(ids)
    assert client.queue.pending() == 0
    assert any(name != caller for name, _ in entered)  # helpers ran while it paused
    late = [name for name, again in entered if again and name != caller]
    # At most the batch each helper had leased when the caller's thread next asked (about
    # a batch later), not the rest of the backlog (about 60 batches before).
    assert len(late) <= 2 * 7
