"""Real processes sharing the PostgreSQL queue's in-flight window, against one Collector.

Each process may keep 8 requests in flight (``max_in_flight=8``); the queue's stored window
for the destination is 4 (``?fleet_max_in_flight=4``). The Collector counts the requests it
is answering at once, so what the fleet does is measured at the server, not inferred.
Messages are counted too: whatever was queued arrives (lost 0), and a message arrives
twice only because a holder was killed with its batch in flight.
"""

from __future__ import annotations

import signal
import time

import pytest
from conftest import WRITE_KEY, start_python

from durable_analytics._config import Config
from durable_analytics._drain import drain_queue
from durable_analytics._store.postgres._queue import PostgresQueue
from durable_analytics.testing import Collector, Reply

from .pg_helpers import body

WINDOW = 4
BATCH = 10

DRAIN = """
import sys
from durable_analytics._config import Config
from durable_analytics._drain import drain_queue
from durable_analytics._store.postgres._queue import PostgresQueue
url, schema, batch = sys.argv[1:4]
q = PostgresQueue(url, schema=schema)
config = Config.for_delivery(max_in_flight=8, flush_at=int(batch))
result = drain_queue(q, config, concurrency=8, timeout=120)
print(result.sent, result.left, flush=True)
"""

# Delivers one batch, without quick retries: the Collector's scripted 429 is its answer.
ONE_BATCH = """
import sys
from durable_analytics._config import Config
from durable_analytics._delivery import make_deliverer
from durable_analytics._store.postgres._queue import PostgresQueue
url, schema, batch = sys.argv[1:4]
q = PostgresQueue(url, schema=schema)
stats = make_deliverer(Config.for_delivery(max_retries=0, flush_at=int(batch)), q).deliver_next()
print(stats.failure.status if stats and stats.failure else "ok", flush=True)
"""

# Eight threads deliver batch after batch (this process's own window is 8); a lease the
# stored window refuses is counted, and every 50th refusal printed.
EIGHT_THREADS = """
import sys, threading, time
from durable_analytics._config import Config
from durable_analytics._delivery import make_deliverer
from durable_analytics._store.postgres._queue import PostgresQueue

url, schema, batch = sys.argv[1:4]
q = PostgresQueue(url, schema=schema, lease_timeout=120)
config = Config.for_delivery(max_in_flight=8, flush_at=int(batch), timeout=60, lease_timeout=120)
deliverer = make_deliverer(config, q)
lock = threading.Lock()
refused = [0]
def run():
    while True:
        if deliverer.deliver_next() is None:
            with lock:
                refused[0] += 1
                if refused[0] % 50 == 0:
                    print("refused", refused[0], flush=True)
            time.sleep(0.01)
for _ in range(8):
    threading.Thread(target=run, daemon=True).start()
sys.stdin.read()
"""


def fill(queue: PostgresQueue, host: str, n: int) -> tuple[int, set[str]]:
    dest = queue.destination(host, WRITE_KEY)
    for i in range(n):
        assert queue.append(dest, body(i))
    return dest, {f"m-{i}" for i in range(n)}


def wait_until(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def run_two_drains(
    pg_dsn: str, pg_schema: str, *, kill_one: bool
) -> tuple[dict[str, int], int, int]:
    """Two drains (max_in_flight 8 each) of 1,000 messages to a Collector answering each
    request after 50 ms, one SIGKILLed after 20 requests if asked; then a drain here.
    Returns the counts, the Collector's peak before the kill (or overall) and overall."""
    url = f"{pg_dsn}&fleet_max_in_flight={WINDOW}"
    queue = PostgresQueue(url, schema=pg_schema)
    with Collector(WRITE_KEY, delay=0.05) as collector:
        dest, queued = fill(queue, collector.url, 1000)
        drains = [start_python(DRAIN, url, pg_schema, str(BATCH)) for _ in range(2)]
        try:
            if kill_one:
                wait_until(lambda: collector.requests >= 20, "20 requests")
                before = collector.peak_concurrency
                drains[0].send_signal(signal.SIGKILL)
                drains[0].wait()
            for drain in drains[kill_one:]:
                _, err = drain.communicate(timeout=120)
                assert drain.returncode == 0, err
        finally:
            for drain in drains:
                if drain.poll() is None:
                    drain.kill()
                    drain.wait()
        # What a killed drain held is delivered by now; this drain proves nothing is left.
        assert drain_queue(queue, Config.for_delivery(flush_at=BATCH), timeout=60).left == 0
        peak = collector.peak_concurrency
        received = collector.message_ids()
    counts = {
        "lost": len(queued - set(received)),
        "duplicates": sum(n - 1 for n in received.values()),
        "live": queue.window.live(dest),
    }
    queue.close()
    return counts, before if kill_one else peak, peak


@pytest.mark.timeout(180)
def test_two_processes_at_8_each_never_have_more_requests_in_flight_than_the_stored_window(
    pg_dsn: str, pg_schema: str
) -> None:
    """Two drains (max_in_flight 8 each, 16 together): the Collector never answers more
    than 4 requests at once, the stored window (and more than 1: they did pipeline). Every
    message arrives once: lost 0, duplicates 0; no slot is left taken."""
    counts, peak, _ = run_two_drains(pg_dsn, pg_schema, kill_one=False)
    assert 1 < peak <= WINDOW, (peak, counts)
    assert counts == {"lost": 0, "duplicates": 0, "live": 0}, (peak, counts)


@pytest.mark.timeout(180)
def test_a_sigkilled_drains_slots_come_back_and_the_survivor_delivers_everything(
    pg_dsn: str, pg_schema: str
) -> None:
    """One of the two drains is SIGKILLed with batches in flight: up to then at most 4
    requests were in flight; its slots come back (none left taken at the end) and the
    survivor delivers the rest: lost 0, duplicates at most its batches in flight. Requests
    the killed process had already sent are still at the server when its slots come back,
    so for that moment the server may see its up to 4 beside the survivor's 4."""
    counts, before, peak = run_two_drains(pg_dsn, pg_schema, kill_one=True)
    assert before <= WINDOW, (before, peak, counts)
    assert peak <= 2 * WINDOW, (before, peak, counts)
    assert counts["lost"] == 0, counts
    assert counts["duplicates"] <= WINDOW * BATCH, counts
    assert counts["live"] == 0, counts


@pytest.mark.timeout(120)
def test_a_429_answered_to_one_process_halves_the_window_of_another(
    pg_dsn: str, pg_schema: str
) -> None:
    """Process A's batch is answered 429: the stored window goes from 4 to 2. Process B,
    eight threads that never saw a 429 (its own window is 8), then has exactly 2 requests
    in flight at the Collector (which holds them unanswered) while its other leases are
    refused again and again. Afterwards every message is delivered once: lost 0."""
    url = f"{pg_dsn}&fleet_max_in_flight={WINDOW}"
    queue = PostgresQueue(url, schema=pg_schema)
    collector = Collector(WRITE_KEY).start()
    try:
        dest, queued = fill(queue, collector.url, 200)
        assert queue.window.limit(dest) == WINDOW
        collector.script(429)
        first = start_python(ONE_BATCH, url, pg_schema, str(BATCH))
        out, err = first.communicate(timeout=60)
        assert out.split() == ["429"], err
        assert queue.window.limit(dest) == WINDOW // 2
        # The stored backoff of that 429 (the shared pause) is not what is tested here.
        queue.clear_backoff(dest, messages=True)

        collector.set_default(Reply(hang=True))
        other = start_python(EIGHT_THREADS, url, pg_schema, str(BATCH), stdin=-1)
        try:
            assert other.stdout is not None
            wait_until(lambda: collector.in_flight == WINDOW // 2, "2 requests in flight")
            refusals = 0
            while refusals < 200:  # B keeps asking for more slots and is refused
                line = other.stdout.readline()
                assert line, other.stderr.read() if other.stderr else ""
                refusals = int(line.split()[1])
            in_flight, peak = collector.in_flight, collector.peak_concurrency
            live = queue.window.live(dest)
        finally:
            other.kill()
            other.wait()
        assert (in_flight, peak, live) == (WINDOW // 2, WINDOW // 2, WINDOW // 2)

        collector.stop()  # the held requests end unanswered
        collector.set_default(200)
        collector.start()
        result = drain_queue(queue, Config.for_delivery(flush_at=BATCH), timeout=60)
        assert result.left == 0
        received = collector.message_ids()
    finally:
        collector.stop()
        queue.close()
    assert set(received) == queued
    assert sum(n - 1 for n in received.values()) == 0
