"""Server faults (issue 5, row 3): every fault ends with lost = 0, counted by an oracle.

The server is the real Collector, sometimes behind ``FaultProxy``, a one-request-per-
connection HTTP proxy that resets connections (before forwarding, after the server got the
batch, halfway through the answer) or refuses bodies over a size with 413.

Long outages run in simulated time: ``Sim`` drives the real ``Flusher`` loop (its
``_cycle``: the flush_interval rule, ``ready_summary``, leases, backoff in the queue) from the
test thread under freezegun, advancing the frozen clock by exactly the wait the loop asks
for; the Deliverer's quick-retry sleeps advance it too. HTTP is real (real sockets, real
timeouts of a fraction of a second), so hours of outage take a few seconds.

Each test ends with the oracle's report: calls that returned must be delivered (or be in the
dead letters after a 4xx), counted as lost / duplicated / unexpected, plus
``PRAGMA integrity_check``. Run with ``-s`` for the figures.

What the unit tests already prove is not repeated here: the status classes and the Retry-After
parser (tests/test_transport.py), each row of the status policy on one batch, Retry-After
honoured by another process, one poisoned message in a 20-message batch, the 1-request-a-
minute schedule of one destination (tests/test_flusher.py), exit bounded against a hanging
server (tests/test_client.py, tests/reliability/test_delivery_processes.py).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import sqlite3
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import freezegun.api
import pytest
from conftest import WRITE_KEY
from freezegun import freeze_time

from durable_analytics import Client
from durable_analytics._delivery import Deliverer
from durable_analytics._flusher import Flusher
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._transport import HTTPTransport, Outcome
from durable_analytics.testing import Collector, Reply

from .oracle import CallLog, Report, check

# --------------------------------------------------------------------------- the oracle


@dataclass(frozen=True)
class Verdict:
    """The shared oracle's report, with the dead letters counted as kept (not lost)."""

    oracle: Report
    dead_lettered: int
    lost: int

    @property
    def delivered(self) -> int:
        return self.oracle.acknowledged

    @property
    def duplicated(self) -> int:
        """Extra copies received beyond the first."""
        return self.oracle.extra_copies

    @property
    def unexpected(self) -> int:
        return self.oracle.unexpected

    @property
    def integrity(self) -> str | None:
        return self.oracle.integrity


class Ledger:
    """Every call goes through the oracle's call log (tests/reliability/oracle.py)."""

    def __init__(self, directory: Path, prefix: str = "fault") -> None:
        self.path = directory / f"{prefix}.calls"
        self.log = CallLog(self.path)
        self.prefix = prefix
        self.calls = 0

    def track(self, client: Client, n: int, **properties: Any) -> list[str]:
        ids = []
        for _ in range(n):
            mid = f"{self.prefix}-{self.calls:06d}"
            self.calls += 1
            assert self.log.call(
                mid,
                client.track,
                f"user-{self.calls % 13}",
                "Fault",
                {"n": self.calls, **properties},
            )
            ids.append(mid)
        return ids

    def report(self, collectors: list[Collector], queue: Queue) -> Verdict:
        received: Counter[str] = Counter()
        for collector in collectors:
            received.update(collector.message_ids())
        report = check([self.path], received, queue_path=queue.path)
        dead = {d.message_id for d in queue.dead_letters()}
        return Verdict(report, len(dead), len(set(report.lost_ids) - dead))


def assert_clean(verdict: Verdict, name: str, *, max_duplicated: int = 0) -> None:
    verdict.oracle.show(
        f"server faults: {name}",
        dead_lettered=verdict.dead_lettered,
        lost_and_not_dead_lettered=verdict.lost,
    )
    assert verdict.lost == 0, verdict
    assert verdict.unexpected == 0, verdict
    assert verdict.duplicated <= max_duplicated, verdict
    assert verdict.integrity == "ok", verdict


# --------------------------------------------------------------------------- simulated time


@dataclass(frozen=True)
class Post:
    at: float
    host: str
    status: int | None
    kind: str
    error: str


class Sim:
    """The real Flusher loop, driven step by step under a frozen clock."""

    def __init__(
        self,
        frozen: Any,
        queue: Queue,
        *,
        timeout: float = 2.0,
        max_retries: int = 3,
        flush_at: int = 20,
        poll_interval: float = 2.0,
    ) -> None:
        self.frozen = frozen
        self.posts: list[Post] = []
        posts = self.posts

        class Recording(HTTPTransport):
            def post(self, host: str, write_key: str, body: bytes, **kwargs: Any) -> Outcome:
                outcome = super().post(host, write_key, body, **kwargs)
                posts.append(Post(time.time(), host, outcome.status, outcome.kind, outcome.error))
                return outcome

        self.deliverer = Deliverer(
            queue,
            Recording(timeout=timeout),
            flush_at=flush_at,
            max_retries=max_retries,
            sleep=self.sleep,
        )
        self.flusher = Flusher(self.deliverer, flush_interval=5.0, poll_interval=poll_interval)
        self.queue = queue

    def sleep(self, seconds: float) -> None:
        self.frozen.tick(seconds)

    def step(self) -> float:
        wait = self.flusher._cycle()
        self.frozen.tick(max(wait, 0.001))
        return wait

    def run(
        self,
        seconds: float,
        *,
        until: Callable[[], bool] | None = None,
        each: Callable[[float], None] | None = None,
    ) -> float:
        """Loop for ``seconds`` of simulated time (or until ``until()``); return the time spent."""
        start = time.time()
        while time.time() - start < seconds:
            if each is not None:
                each(time.time() - start)
            self.step()
            if until is not None and until():
                break
        return time.time() - start

    def to(self, host: str) -> list[Post]:
        return [p for p in self.posts if p.host == host]


def max_in_window(times: list[float], window: float) -> int:
    """The most requests in any ``window`` seconds."""
    best = 0
    start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def wall_clock() -> float:
    """Real monotonic time under freezegun (which rebinds every module's own reference)."""
    return float(freezegun.api.real_monotonic())


@pytest.fixture
def frozen() -> Iterator[Any]:
    with freeze_time("2024-05-01 12:00:00") as f:
        yield f


def producer(queue_path: Path, host: str, key: str = WRITE_KEY, **settings: Any) -> Client:
    return Client(
        key,
        host=host,
        queue_path=queue_path,
        flusher="none",
        on_exit="none",
        **settings,
    )


def backoff_over(queue_path: Path) -> None:
    """Make a retry backoff due now (destination and messages), instead of waiting it out."""
    conn = sqlite3.connect(queue_path, timeout=30)
    try:
        with conn:
            conn.execute("UPDATE destinations SET not_before = 0")
            conn.execute("UPDATE messages SET not_before = NULL")
    finally:
        conn.close()


# --------------------------------------------------------------------------- the fault proxy


def _rst(conn: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed server or a middlebox would."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _read_http(conn: socket.socket) -> tuple[bytes, bytes] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head, body


class FaultProxy:
    """An HTTP proxy to ``upstream`` that answers each request as ``plan(n, body)`` says.

    Plans: ``"forward"``; ``"reset-before"`` (reset, the server never sees it);
    ``"reset-after"`` (the server got it and answered, the client gets a reset);
    ``"truncate"`` (the client gets a third of the answer, then a reset); ``"413"`` (the
    proxy refuses the body itself). One request per connection.
    """

    def __init__(self, upstream_port: int, plan: Callable[[int, bytes], str]) -> None:
        self.upstream_port = upstream_port
        self.plan = plan
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.actions: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            request = _read_http(conn)
            if request is None:
                conn.close()
                return
            head, body = request
            with self._lock:
                n = len(self.actions)
                action = self.plan(n, body)
                self.actions.append(action)
            if action == "reset-before":
                _rst(conn)
                return
            if action == "413":
                text = b'{"success":false,"message":"request entity too large"}'
                conn.sendall(
                    b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(text), text)
                )
                conn.close()
                return
            head = re.sub(rb"(?i)\r\nconnection:[^\r]*", b"", head) + b"\r\nConnection: close"
            with socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5) as up:
                up.sendall(head + b"\r\n\r\n" + body)
                answer = b""
                while chunk := up.recv(65536):
                    answer += chunk
            if action == "reset-after":
                _rst(conn)
            elif action == "truncate":
                conn.sendall(answer[: max(1, len(answer) // 3)])
                _rst(conn)
            else:
                conn.sendall(answer)
                conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join()


@pytest.fixture
def proxies() -> Iterator[list[FaultProxy]]:
    made: list[FaultProxy] = []
    yield made
    for proxy in made:
        proxy.stop()


# --------------------------------------------------------------------------- long 5xx outage


def test_a_three_hour_outage_loses_nothing_and_costs_one_request_a_minute(
    frozen: Any, queue_path: Path
) -> None:
    """Destination A fails for 3 hours (503s, then the server is down, then 500/502/504);
    destination B on the same queue stays healthy. One producer tracks to both every 30 s."""
    outage = 3 * 3600.0
    with Collector(WRITE_KEY) as dead, Collector(WRITE_KEY) as healthy:
        dead.set_default(503)
        to_dead = producer(queue_path, dead.url)
        to_healthy = producer(queue_path, healthy.url)
        sim = Sim(frozen, to_dead.queue, timeout=1.0)
        ledger = Ledger(queue_path.parent)
        tracked_at: dict[str, float] = {}
        state = {"phase": "503"}
        next_call = [0.0]

        def produce(elapsed: float) -> None:
            if elapsed >= next_call[0]:
                next_call[0] += 30.0
                for client in (to_dead, to_healthy):
                    [mid] = ledger.track(client, 1, at=elapsed)
                    tracked_at[mid] = time.time()
            if elapsed >= 3600 and state["phase"] == "503":
                state["phase"] = "down"
                dead.stop()  # connection refused for an hour; restarted on the same port
            elif elapsed >= 7200 and state["phase"] == "down":
                state["phase"] = "5xx"
                dead.start()
            if state["phase"] == "5xx":
                dead.set_default((500, 502, 504)[int(elapsed // 60) % 3])

        started = wall_clock()
        sim.run(outage, each=produce)
        wall = wall_clock() - started
        during = sim.to(dead.url)
        assert dead.message_ids() == Counter()  # nothing accepted during the outage

        dead.set_default(200)
        back_at = time.time()
        recovered_in = sim.run(3600, until=lambda: len(dead.message_ids()) == ledger.calls // 2)
        report = ledger.report([dead, healthy], to_dead.queue)

    steady = [p.at for p in during if p.at - during[0].at >= 300]
    gaps = [b - a for a, b in itertools.pairwise(steady)]
    latency = max(
        batch.received_at - tracked_at[m["messageId"]]
        for batch in healthy.batches
        for m in batch.messages
    )
    first_ok = next(p.at for p in sim.to(dead.url) if p.kind == "ok") - back_at
    print(
        f"\nOUTAGE 3h: {len(during)} requests to the dead destination "
        f"({len(steady)} in steady state, min gap {min(gaps):.1f}s, at most "
        f"{max_in_window(steady, 60.0)} per minute; kinds {Counter(p.kind for p in during)}); "
        f"healthy destination max wait {latency:.1f}s; back up: first delivery after "
        f"{first_ok:.1f}s, backlog of {ledger.calls // 2} delivered after {recovered_in:.1f}s; "
        f"the 3 simulated hours took {wall:.1f}s"
    )
    assert min(gaps) >= 60.0
    assert max_in_window(steady, 60.0) == 1
    assert len(during) <= 4 + 8 + int(outage / 60)
    assert any("cannot connect" in p.error for p in during)  # the restart hour was refused
    assert latency <= 5.0 + 2.0 + 1.0  # flush_interval (+ a poll) while the other is down
    assert first_ok <= 60 * 1.25 + 2.5
    assert_clean(report, "3h outage, 2 destinations")


# --------------------------------------------------------------------------- connection resets


def test_connection_resets_lose_nothing_and_duplicate_only_answers_lost_in_flight(
    frozen: Any, queue_path: Path, collector: Collector, proxies: list[FaultProxy]
) -> None:
    cycle = ["reset-before", "forward", "reset-after", "truncate", "forward", "forward"]
    proxy = FaultProxy(collector.port, lambda n, body: cycle[n % len(cycle)])
    proxies.append(proxy)
    client = producer(queue_path, proxy.url)
    ledger = Ledger(queue_path.parent)
    sim = Sim(frozen, client.queue, timeout=2.0)
    for _ in range(20):
        ledger.track(client, 15)
        sim.run(120, until=lambda: client.queue.pending() == 0)
    sim.run(3600, until=lambda: client.queue.pending() == 0)
    report = ledger.report([collector], client.queue)

    actions = Counter(proxy.actions)
    # Only answers lost after the server had the batch may bring a batch twice.
    in_flight = actions["reset-after"] + actions["truncate"]
    print(f"\nRESETS: {dict(actions)} over {len(proxy.actions)} requests")
    assert actions["reset-before"] >= 5
    assert in_flight >= 5
    assert_clean(report, "connection resets", max_duplicated=20 * in_flight)
    assert report.duplicated > 0  # the model is right: those batches did arrive twice


def test_a_collector_restart_mid_stream_loses_nothing(queue_path: Path) -> None:
    """The real flusher thread, real time: the server goes away and comes back on its port."""
    with Collector(WRITE_KEY) as collector:
        client = Client(
            WRITE_KEY,
            host=collector.url,
            queue_path=queue_path,
            flush_at=5,
            flush_interval=0.05,
            max_retries=0,
            on_exit="none",
            timeout=1.0,
        )
        ledger = Ledger(queue_path.parent)
        ledger.track(client, 20)
        assert collector.wait_for_messages(20, timeout=10)
        # ... and acknowledged: several batches are in flight at once, and a stop before the
        # last answer left would make that batch a retry.
        deadline = time.monotonic() + 10
        while client.queue.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        collector.stop()
        ledger.track(client, 20)  # stored while the server is down
        # The flusher fails and backs off (1-1.25 s, kept in the queue): make the backoff
        # due now rather than waiting it out, as the next flusher round would after it.
        deadline = time.monotonic() + 10
        while not client.stats().last_error and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.stats().pending == 20
        collector.start()
        backoff_over(queue_path)
        assert client._flusher is not None
        client._flusher.notify()
        assert collector.wait_for_messages(40, timeout=10)
        deadline = time.monotonic() + 10  # the last ack follows the last answer
        while client.queue.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        report = ledger.report([collector], client.queue)
        client.close(timeout=2)
    assert_clean(report, "collector restart", max_duplicated=5)


# --------------------------------------------------------------------------- hang, latency


def test_a_server_that_accepts_and_never_answers_loses_nothing(
    frozen: Any, queue_path: Path, collector: Collector
) -> None:
    collector.script(*[Reply(hang=True)] * 4)  # then 200s
    client = producer(queue_path, collector.url)
    ledger = Ledger(queue_path.parent)
    ledger.track(client, 40)
    sim = Sim(frozen, client.queue, timeout=0.3)
    started = wall_clock()  # time.monotonic is frozen here
    spent = sim.run(3600, until=lambda: client.queue.pending() == 0)
    wall = wall_clock() - started
    timeouts = [p for p in sim.posts if "timed out" in p.error]
    print(
        f"\nHANG: {len(timeouts)} requests timed out after 0.3s, delivered "
        f"{spent:.1f}s (simulated) after the first try; wall {wall:.2f}s"
    )
    assert len(timeouts) == 4
    assert collector.requests >= 4 + 2
    assert_clean(ledger.report([collector], client.queue), "hanging server")


@pytest.mark.parametrize(
    ("latency", "timeout"),
    [
        pytest.param(0.9, 1.0, id="0.9s-of-1s"),
        pytest.param(9.0, None, id="9s-of-the-default-10s", marks=pytest.mark.soak),
    ],
)
def test_a_slow_server_within_the_timeout_is_delivered_first_time(
    queue_path: Path, collector: Collector, latency: float, timeout: float | None
) -> None:
    """The flusher thread and flush() both wait out a slow answer within ``timeout``."""
    collector.set_default(Reply(delay=latency))
    settings: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    client = Client(
        WRITE_KEY,
        host=collector.url,
        queue_path=queue_path,
        flush_at=10,
        on_exit="none",
        **settings,
    )
    assert client.config.timeout == (timeout or 10.0)
    ledger = Ledger(queue_path.parent)
    ledger.track(client, 10)  # a full batch: the flusher thread sends it at once
    assert collector.wait_for_messages(10, timeout=latency * 3 + 2)
    ledger.track(client, 3)
    started = time.monotonic()
    result = client.flush()  # no deadline: the request gets the whole timeout
    took = time.monotonic() - started
    report = ledger.report([collector], client.queue)
    client.close(timeout=latency + 1)
    print(f"\nLATENCY {latency}s with timeout {client.config.timeout}s: flush took {took:.2f}s")
    # Counts are of what was pending at the call, whoever delivered it (the thread may
    # still have been acking the first batch).
    assert (result.pending, result.dead_lettered) == (0, 0)
    assert 3 <= result.sent <= 13
    # First time: every request was answered 200 and no message went out twice (no retry
    # after a timeout). The flusher thread may split the second lot with flush().
    assert all(b.status == 200 for b in collector.batches)
    assert max(collector.message_ids(accepted_only=False).values()) == 1
    assert_clean(report, f"latency {latency}s")


def test_latency_over_the_timeout_is_retried_and_may_duplicate_one_batch(
    frozen: Any, queue_path: Path, collector: Collector
) -> None:
    """At-least-once: the server accepted the batch after the client gave up on it."""
    collector.script(Reply(delay=0.4))  # then fast 200s
    client = producer(queue_path, collector.url)
    ledger = Ledger(queue_path.parent)
    ledger.track(client, 20)
    sim = Sim(frozen, client.queue, timeout=0.2)
    sim.run(600, until=lambda: client.queue.pending() == 0)
    assert collector.wait_for_requests(2, timeout=5)
    deadline = time.monotonic() + 5  # the late answer is recorded once it is sent
    while collector.batches[0].status == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_clean(ledger.report([collector], client.queue), "latency > timeout", max_duplicated=20)


# --------------------------------------------------------------------------- Retry-After


def test_retry_after_in_both_forms_is_honoured_and_capped(
    frozen: Any, queue_path: Path, collector: Collector
) -> None:
    start = time.time()
    # An HTTP date 400 s after the start: ~280 s after the second answer (under the cap).
    date = formatdate(start + 400, usegmt=True)
    collector.script(
        Reply(429, headers={"Retry-After": "120"}),
        Reply(503, headers={"Retry-After": date}),
        Reply(503, headers={"Retry-After": "86400"}),  # capped at 300 s
        Reply(503, headers={"Retry-After": "soon, maybe"}),  # garbage: the normal backoff
    )
    client = producer(queue_path, collector.url)
    ledger = Ledger(queue_path.parent)
    ledger.track(client, 20)
    sim = Sim(frozen, client.queue, timeout=1.0)
    sim.run(3600, until=lambda: client.queue.pending() == 0)
    at = [p.at - start for p in sim.posts]
    gaps = [b - a for a, b in itertools.pairwise(at)]
    print(f"\nRETRY-AFTER: request times {[round(t, 1) for t in at]} (s after the start)")
    assert len(at) == 5  # no quick retries when the server says when
    assert 120 <= gaps[0] <= 120 + 2.5
    assert 400 - 1 <= at[2] <= 400 + 2.5
    assert 300 <= gaps[2] <= 300 + 2.5
    assert 8.0 <= gaps[3] <= 10.0 + 2.5  # 4th failure: 2**3 s x [1, 1.25]: garbage ignored
    assert_clean(ledger.report([collector], client.queue), "retry-after")


# --------------------------------------------------------------------------- 4xx


def test_poisoned_messages_are_dead_lettered_and_everything_else_arrives_once(
    frozen: Any, queue_path: Path, collector: Collector
) -> None:
    client = producer(queue_path, collector.url)
    ledger = Ledger(queue_path.parent)
    ids = ledger.track(client, 200)
    poisoned = {ids[3]: 400, ids[11]: 400, ids[77]: 422, ids[150]: 413}  # two in one batch
    for mid, status in poisoned.items():
        collector.reject_message_ids(mid, status=status)
    sim = Sim(frozen, client.queue)
    sim.run(600, until=lambda: client.queue.pending() == 0)
    report = ledger.report([collector], client.queue)
    dead = {d.message_id: d.status for d in client.queue.dead_letters()}
    extra = len(sim.posts) - 200 // 20
    print(f"\nPOISON: {len(poisoned)} poisoned of 200: {extra} extra requests")
    assert dead == poisoned
    assert report.delivered == 200 - len(poisoned)
    # Each poisoned message costs at most 2 requests per halving of its batch (20 → 1).
    assert extra <= len(poisoned) * 2 * 5
    assert client.queue.backoff(client._dest) == (0.0, 0)
    assert_clean(report, "poisoned messages")


def test_a_413_from_a_smaller_body_limit_splits_batches_until_they_fit(
    frozen: Any, queue_path: Path, collector: Collector, proxies: list[FaultProxy]
) -> None:
    """A proxy in front refuses bodies over 20 kB: batches are halved until they pass; the
    only message over the limit on its own is dead-lettered with 413."""
    limit = 20_000
    proxy = FaultProxy(collector.port, lambda n, body: "413" if len(body) > limit else "forward")
    proxies.append(proxy)
    client = producer(queue_path, proxy.url)
    ledger = Ledger(queue_path.parent)
    ids = ledger.track(client, 60, pad="p" * 4_000)  # 20 of them: ~80 kB
    [huge] = ledger.track(client, 1, pad="h" * 25_000)
    sim = Sim(frozen, client.queue)
    sim.run(600, until=lambda: client.queue.pending() == 0)
    report = ledger.report([collector], client.queue)
    sizes = [len(b.raw_body) for b in collector.batches]
    print(
        f"\n413: {Counter(proxy.actions)}; delivered batches of {min(sizes)}-{max(sizes)} "
        f"bytes; dead letters {[d.status for d in client.queue.dead_letters()]}"
    )
    assert [d.message_id for d in client.queue.dead_letters()] == [huge]
    assert max(sizes) <= limit
    assert report.delivered == len(ids)
    assert_clean(report, "413 body limit")


def test_401_keeps_everything_backs_off_to_10_minutes_then_delivers(
    frozen: Any, queue_path: Path, collector: Collector
) -> None:
    """The write key is refused for two hours (a rotated key), then accepted again."""
    collector.set_default(401)
    client = producer(queue_path, collector.url)
    ledger = Ledger(queue_path.parent)
    ledger.track(client, 30)
    sim = Sim(frozen, client.queue)
    sim.run(2 * 3600)
    during = [p.at for p in sim.posts]
    assert client.queue.pending() == 30
    assert client.queue.dead_letters() == []
    collector.set_default(200)
    back = time.time()
    sim.run(3600, until=lambda: client.queue.pending() == 0)
    delivered_after = max(b.received_at for b in collector.batches) - back
    gaps = [b - a for a, b in itertools.pairwise(during)]
    print(
        f"\n401 for 2h: {len(during)} requests, gaps {[round(g) for g in gaps]} s; "
        f"delivered {delivered_after:.0f}s after the key was accepted again"
    )
    assert gaps[0] >= 30.0
    assert all(b >= a * 0.9 for a, b in itertools.pairwise(gaps))  # doubling, never faster
    assert min(gaps[-3:]) >= 600.0 - 1  # capped at 10 minutes
    assert len(during) <= 1 + 5 + (2 * 3600) // 600
    assert delivered_after <= 600 + 2.5
    assert_clean(ledger.report([collector], client.queue), "401 for 2h")


def test_a_dead_destination_keeps_its_backoff_across_a_new_flusher(
    frozen: Any, queue_path: Path, collector: Collector
) -> None:
    """The backoff lives in the queue: a flusher started later (a new process, a restart)
    does not hammer a server another one found dead."""
    collector.set_default(503)
    client = producer(queue_path, collector.url)
    ledger = Ledger(queue_path.parent)
    ledger.track(client, 5)
    first = Sim(frozen, client.queue)
    first.run(1800)
    assert client.queue.backoff(client._dest)[1] >= 5
    second = Sim(frozen, Queue(queue_path))  # a fresh flusher, as after a restart
    second.run(600)
    both = sorted(p.at for p in first.posts + second.posts)
    tail = [t for t in both if t - both[0] >= 300]
    assert min(b - a for a, b in itertools.pairwise(tail)) >= 60.0
    assert all(p.kind == "retry" for p in second.posts)
    assert len(second.posts) <= 600 // 60 + 1
    collector.set_default(200)
    second.run(600, until=lambda: client.queue.pending() == 0)
    assert_clean(ledger.report([collector], client.queue), "backoff across flushers")
