"""The delivery loop: lease → send → ack, release with backoff, or split and dead-letter.

``Deliverer`` delivers one leased batch by the status policy. ``Flusher`` runs it on a
daemon thread that wakes when its own process appends and polls cheaply for messages other
processes appended. ``drain`` delivers everything deliverable now, with N parallel workers.
Nothing here raises into the caller: failures become backoff, dead letters, ``on_error`` calls
and log lines.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tenacity

from ._queue import MAX_BACKOFF_SECONDS, Lease, Queue
from ._transport import Outcome, Transport, batch_body, envelope_overhead
from .exceptions import (
    ConfigurationRejected,
    DeliveryError,
    MessageRejected,
    QueueError,
    RetryableError,
)

__all__ = [
    "Deliverer",
    "DeliveryStats",
    "DrainResult",
    "FlushResult",
    "Flusher",
    "drain",
    "retry_delay",
]

log = logging.getLogger("durable_analytics")

OnError = Callable[[Exception, list[dict[str, Any]]], object]

# What _post returns when the caller's deadline passed before any request was made.
_DEADLINE_PASSED = Outcome("retry", None, error="the flush deadline passed")

#: Steady-state retry interval against a dead server: one request a minute per destination.
RETRY_CAP = 60.0
#: Backoff cap for configuration errors (401, 403, 404, 3xx).
CONFIG_CAP = MAX_BACKOFF_SECONDS
_CONFIG_FIRST = 30.0
#: How often a flusher looks for messages that other processes appended.
POLL_INTERVAL = 0.5
_WARN_EVERY = 60.0
# When each (queue file, destination) last got its configuration warning, in this process:
# shared by every Deliverer (the flusher, flush(), drain workers) so it stays rate-limited.
_last_warning: dict[tuple[str, int], float] = {}
# A Flusher that needs no wake-up from appends (it is delivering, or backing off).
_NEVER = 1 << 62


def retry_delay(kind: str, failures: int, retry_after: float | None = None) -> float:
    """How long a destination waits after its ``failures``-th consecutive failure.

    Retryable errors: 1, 2, 4 … seconds up to 60 (each with up to 25 % extra jitter, never
    less), so a dead server gets at most one request a minute. Configuration errors: 30 s
    doubling up to 10 minutes. A Retry-After from the server wins when it is longer; a
    shorter one never cuts the backoff (a server answering ``Retry-After: 0`` to every
    request must not be hammered).
    """
    failures = max(failures, 1)
    if kind == "config":
        base = min(CONFIG_CAP, _CONFIG_FIRST * 2 ** min(failures - 1, 20))
        delay = min(CONFIG_CAP, base * random.uniform(1.0, 1.1))
    else:
        base = min(RETRY_CAP, 2.0 ** min(failures - 1, 20))
        delay = base * random.uniform(1.0, 1.25)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return float(delay)


@dataclass(frozen=True)
class FlushResult:
    """What ``flush()`` achieved: messages sent, still pending, and dead-lettered."""

    sent: int
    pending: int
    dead_lettered: int


@dataclass
class DeliveryStats:
    """Counts of one delivery (or a run of them)."""

    sent: int = 0
    dead_lettered: int = 0
    kept: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: DeliveryStats) -> None:
        """Accumulate ``other`` into this one."""
        self.sent += other.sent
        self.dead_lettered += other.dead_lettered
        self.kept += other.kept
        self.requests += other.requests
        self.errors.extend(other.errors[-5:])
        del self.errors[:-20]


class Deliverer:
    """Delivers leased batches by the status policy of DESIGN §1."""

    def __init__(
        self,
        queue: Queue,
        transport: Transport,
        *,
        flush_at: int = 20,
        max_batch_bytes: int = 500_000,
        max_retries: int = 3,
        on_error: OnError | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.queue = queue
        self.transport = transport
        self.flush_at = flush_at
        self.max_batch_bytes = max_batch_bytes
        self.max_retries = max_retries
        self.on_error = on_error
        self._sleep = sleep
        #: Messages this Deliverer dead-lettered, per destination id (counted just before
        #: the move commits, so whoever sees them gone from the queue sees them counted).
        self.dead_lettered: dict[int, int] = {}

    def _budget(self) -> int:
        # lease() counts one comma per message; a body of n messages has n - 1 of them.
        return self.max_batch_bytes - envelope_overhead() + 1

    def deliver_next(
        self,
        *,
        destination: int | None = None,
        up_to_id: int | None = None,
        deadline: float | None = None,
    ) -> DeliveryStats | None:
        """Lease one batch and deliver it; None when nothing is ready."""
        lease = self.queue.lease(
            self.flush_at, self._budget(), destination=destination, up_to_id=up_to_id
        )
        if lease is None:
            return None
        return self.deliver(lease, deadline=deadline)

    def deliver(self, lease: Lease, *, deadline: float | None = None) -> DeliveryStats:
        """Send ``lease``'s batch; ack, release, split or dead-letter as the server says."""
        stats = DeliveryStats()
        try:
            self._send_part(lease, list(range(len(lease.ids))), stats, lease.failures, deadline)
        except BaseException:
            # Whatever happened, messages not acked stay in the queue under this lease until
            # it is released here or expires.
            self._release_quietly(lease)
            raise
        return stats

    def _release_quietly(self, lease: Lease) -> None:
        try:
            self.queue.release(lease, None, count_attempt=False)
        except QueueError:
            log.warning("could not release a lease; it will expire on its own", exc_info=True)

    def _post(self, lease: Lease, idx: list[int], quick: bool, deadline: float | None) -> Outcome:
        body = batch_body([lease.bodies[i] for i in idx])
        dest = lease.destination
        last = [_DEADLINE_PASSED]

        def attempt() -> Outcome:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return _DEADLINE_PASSED  # no request made: the caller's time is up
            last[0] = self.transport.post(dest.host, dest.write_key, body, timeout=remaining)
            return last[0]

        first = attempt()
        if first is _DEADLINE_PASSED or not (
            quick and self.max_retries and first.kind == "retry" and first.retry_after is None
        ):
            return first  # the common case builds no retry machinery at all
        # Quick retries stay well inside the lease so a slow holder is not overtaken.
        started = time.monotonic()
        budget = self.queue.lease_timeout * 0.5
        if deadline is not None:
            budget = min(budget, max(0.0, deadline - started))
        log.debug("retrying a batch of %d after: %s", len(idx), first.error)
        self._sleep(min(budget, 0.25 * random.uniform(1.0, 2.0)))
        until = started + budget
        # 0.25, 0.5, 1 … 4 s plus up to 0.25 s of jitter (wait_exponential_jitter's
        # `initial` is deprecated in tenacity 9 and its replacement missing from 8.x).
        backoff = tenacity.wait_exponential(multiplier=0.25, max=4.0) + tenacity.wait_random(
            0, 0.25
        )

        def wait(state: tenacity.RetryCallState) -> float:
            # Never sleep past the budget (a flush deadline, an exit): stop there instead.
            return max(0.0, min(backoff(state), until - time.monotonic()))

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_retries)
            | tenacity.stop_after_delay(max(0.0, budget - (time.monotonic() - started))),
            wait=wait,
            retry=tenacity.retry_if_result(
                lambda o: o is not _DEADLINE_PASSED and o.kind == "retry" and o.retry_after is None
            ),
            sleep=self._sleep,
            retry_error_callback=lambda state: (
                state.outcome.result()
                if state.outcome is not None
                else Outcome("retry", None, error="no attempt")
            ),
            before_sleep=lambda state: log.debug(
                "retrying a batch of %d after: %s",
                len(idx),
                state.outcome.result().error if state.outcome else "",
            ),
            reraise=True,
        )
        retrying(attempt)
        # The last answer the server gave, not a deadline that ran out between retries.
        return last[0]

    def _messages(self, lease: Lease, idx: list[int]) -> list[dict[str, Any]]:
        out = []
        for i in idx:
            try:
                out.append(json.loads(lease.bodies[i]))
            except ValueError:
                continue
        return out

    def _report(self, exc: DeliveryError, lease: Lease, idx: list[int]) -> None:
        if self.on_error is None:
            return
        try:
            self.on_error(exc, self._messages(lease, idx))
        except Exception:
            log.exception("on_error raised; ignoring it")

    def _send_part(
        self,
        lease: Lease,
        idx: list[int],
        stats: DeliveryStats,
        failures: int,
        deadline: float | None,
    ) -> bool:
        """Deliver the messages ``idx`` of ``lease``; False once the rest must wait (backoff)."""
        dest = lease.destination
        ids = [lease.ids[i] for i in idx]
        outcome = self._post(lease, idx, quick=failures == 0, deadline=deadline)
        if outcome is _DEADLINE_PASSED:
            # No request was made: the caller's deadline ran out, not the server. Hand the
            # rest back as it was: no backoff, no attempt counted, no error reported.
            stats.kept += self.queue.release(lease, None, count_attempt=False)
            return False
        stats.requests += 1
        if outcome.kind == "ok":
            self.queue.ack(lease, None if len(ids) == len(lease.ids) else ids)
            stats.sent += len(ids)
            if failures:
                self.queue.clear_backoff(dest.id)
            log.debug("delivered %d messages to %s", len(ids), dest.host)
            return True
        if outcome.kind == "reject":
            if len(idx) == 1:
                self.dead_lettered[dest.id] = self.dead_lettered.get(dest.id, 0) + 1
                try:
                    moved = self.queue.dead_letter(
                        lease,
                        ids,
                        status=outcome.status,
                        reason=f"HTTP {outcome.status}",
                        excerpt=outcome.excerpt,
                    )
                finally:
                    self.dead_lettered[dest.id] -= 1
                self.dead_lettered[dest.id] += moved
                stats.dead_lettered += 1
                log.warning(
                    "dead-lettered a message rejected with HTTP %s by %s",
                    outcome.status,
                    dest.host,
                )
                self._report(
                    MessageRejected(
                        f"the server rejected a message with HTTP {outcome.status}; it was "
                        "moved to the dead letters",
                        status=outcome.status,
                        excerpt=outcome.excerpt,
                    ),
                    lease,
                    idx,
                )
                return True
            # Split in halves until the bad message is alone; the good ones are delivered.
            half = len(idx) // 2
            for part in (idx[:half], idx[half:]):
                if not self._send_part(lease, part, stats, failures, deadline):
                    return False
            return True
        # Retryable or configuration error: keep everything not yet delivered, back off.
        _, failures_now = self.queue.backoff(dest.id)
        delay = retry_delay(outcome.kind, failures_now + 1, outcome.retry_after)
        until = time.time() + delay
        self.queue.set_backoff(dest.id, until, outcome.error)
        # Everything this lease still holds goes back (a split stops here), with the backoff
        # stored in the queue so every process on it honours it.
        stats.kept += self.queue.release(lease, until)
        stats.errors.append(outcome.error)
        if outcome.kind == "config":
            self._warn_config(dest.id, dest.host, outcome, delay)
            exc: DeliveryError = ConfigurationRejected(
                f"{outcome.error}; the messages are kept: check the write key and host",
                status=outcome.status,
                excerpt=outcome.excerpt,
            )
        else:
            log.info(
                "delivery to %s failed (%s); retrying in %.0fs", dest.host, outcome.error, delay
            )
            exc = RetryableError(
                f"{outcome.error}; the messages are kept and retried in {delay:.0f}s",
                status=outcome.status,
                excerpt=outcome.excerpt,
            )
        self._report(exc, lease, idx)
        return False

    def _warn_config(self, dest_id: int, host: str, outcome: Outcome, delay: float) -> None:
        now = time.monotonic()
        key = (str(self.queue.path), dest_id)
        last = _last_warning.get(key)
        if last is not None and now - last < _WARN_EVERY:
            return
        _last_warning[key] = now
        if outcome.status in (401, 403):
            hint = "the write key is wrong or lacks access: check write_key"
        elif outcome.status == 404:
            hint = "the URL is wrong: check host (it must not include /v1/batch)"
        elif outcome.status is not None and 300 <= outcome.status < 400:
            hint = "the host redirects, which is not followed: set host to the final URL"
        else:
            hint = "the server refused the request: check host"
        log.warning(
            "%s answered HTTP %s: %s. Messages are kept; next try in %.0fs.",
            host,
            outcome.status,
            hint,
            delay,
        )


class Flusher:
    """The background delivery thread of one process (``flusher="thread"``).

    Sends as soon as ``flush_at`` messages are ready, and no later than ``flush_interval``
    after the oldest ready message was stored, while the server is healthy. ``clock`` (wall
    time in seconds, ``time.time`` by default) is what the ``flush_interval`` rule reads; a
    test can pass its own.
    """

    def __init__(
        self,
        deliverer: Deliverer,
        *,
        flush_interval: float = 5.0,
        poll_interval: float = POLL_INTERVAL,
        share: float = 0.25,
        name: str = "durable-analytics-flusher",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.deliverer = deliverer
        self.queue = deliverer.queue
        self.flush_interval = flush_interval
        self.poll_interval = poll_interval
        self.idle = True
        #: Incremented by ``on_append`` on every append in this process.
        self.appends = 0
        #: Loop iterations so far (for diagnostics and tests).
        self.cycles = 0
        #: The most CPU this thread takes while the caller is appending (0 < share <= 1).
        self.share = share
        self._clock = clock
        # Appends seen at the last look, and how many more make a full batch: the caller
        # wakes the thread once that many arrive, not only on the next poll.
        self._seen_appends = 0
        self._need = _NEVER
        self._backlog = False
        self._idle_event = threading.Event()
        self._idle_event.set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.delivered = DeliveryStats()

    def start(self) -> None:
        """Start the thread (once)."""
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread.is_alive()

    @property
    def delivering(self) -> bool:
        """True while the thread has a batch in flight."""
        return not self._idle_event.is_set()

    def wait_delivered(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the batch in flight (if any) to be finished."""
        return self._idle_event.wait(timeout)

    def _deliver_next(self) -> DeliveryStats | None:
        self._idle_event.clear()
        try:
            return self.deliverer.deliver_next()
        finally:
            self._idle_event.set()

    def notify(self) -> None:
        """Wake the thread: new messages were appended in this process."""
        if not self._wake.is_set():
            self._wake.set()

    def on_append(self) -> None:
        """Called after each append in this process: wake the thread when a batch is due.

        It is woken when the queue was empty, or when the appends since its last look make
        a full batch; otherwise it looks again on its own when the oldest message is due.
        """
        self.appends += 1
        if self.idle or self.appends - self._seen_appends >= self._need:
            self.idle = False
            self.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to stop after its batch in flight, and wait up to ``timeout``."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.cycles += 1
            appends = self.appends
            cpu = time.thread_time()
            try:
                wait = self._cycle()
            except Exception:
                # Never die silently: log and go on after a pause.
                log.exception("the durable-analytics flusher hit an unexpected error; continuing")
                wait = 1.0
            if wait == 0 and self.appends != appends and self.share < 1.0:
                # The caller kept appending while we delivered: this thread shares the
                # caller's GIL, so cap its share of the CPU and let the disk queue absorb
                # the burst; the backlog is sent at full speed once the caller pauses.
                used = time.thread_time() - cpu
                wait = min(0.05, used * (1.0 - self.share) / self.share)
            if wait > 0 and not self._stop.is_set():
                self._wake.wait(wait)
                self._wake.clear()

    def _now(self) -> float:
        return time.time() if self._clock is None else self._clock()

    def _cycle(self) -> float:
        """Deliver what is due; return how long to wait before looking again."""
        self._need = _NEVER
        if self._backlog:
            # The last batch was full: more are waiting, no need to look before leasing.
            stats = self._deliver_next()
            self._backlog = stats is not None and self._full(stats)
            if stats is not None:
                self.delivered.add(stats)
                return 0.0
        now = self._now()
        appends = self.appends
        count, oldest = self.queue.ready_summary(self.deliverer.flush_at, now)
        if count == 0:
            # Messages under a lease whose holder died come back here (not only in lease()).
            self.queue.reclaim_expired()
            next_at = self.queue.next_ready_at()
            if next_at is not None:
                # What is pending waits out a backoff: appends need not wake the thread.
                self.idle = False
                return max(0.01, min(self.poll_interval * 4, next_at - now))
            self.idle = True
            return self.poll_interval
        self.idle = False
        if oldest is None or oldest > now:
            # Stored "in the future": the wall clock went back since. Send it now rather
            # than make it wait out the jump.
            oldest = now - self.flush_interval
        due_at = oldest + self.flush_interval
        if count < self.deliverer.flush_at and due_at > now:
            self._seen_appends = appends
            self._need = self.deliverer.flush_at - count
            return max(0.005, min(due_at - now, self.poll_interval))
        stats = self._deliver_next()
        if stats is None:
            return 0.05
        self.delivered.add(stats)
        self._backlog = self._full(stats)
        return 0.0

    def _full(self, stats: DeliveryStats) -> bool:
        return stats.kept == 0 and stats.sent + stats.dead_lettered >= self.deliverer.flush_at


@dataclass(frozen=True)
class DrainResult:
    """What ``drain`` achieved."""

    sent: int
    dead_lettered: int
    left: int
    elapsed: float
    errors: tuple[str, ...]


def drain(
    queue: Queue,
    make_deliverer: Callable[[], Deliverer],
    *,
    concurrency: int = 4,
    timeout: float | None = None,
    progress: Callable[[int], object] | None = None,
    stop: threading.Event | None = None,
    up_to_id: int | None = None,
) -> DrainResult:
    """Deliver everything deliverable now, with ``concurrency`` parallel workers.

    Stops when nothing is ready any more (the rest is leased by others, in backoff, or the
    server keeps failing), when ``timeout`` passes, or when ``stop`` is set. ``up_to_id``
    limits it to the messages stored up to that id, so a drain under constant production
    still ends; ``left`` then counts only those.
    """
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    total = DeliveryStats()
    lock = threading.Lock()
    halt = stop or threading.Event()

    def worker() -> None:
        deliverer = make_deliverer()
        try:
            while not halt.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    return
                stats = deliverer.deliver_next(deadline=deadline, up_to_id=up_to_id)
                if stats is None:
                    return
                with lock:
                    total.add(stats)
                if progress is not None and stats.sent:
                    progress(stats.sent)
                # A failing destination is now in backoff, so the next lease skips it and
                # the loop ends once only such messages are left.
        finally:
            deliverer.transport.close()

    threads = [
        threading.Thread(target=worker, name=f"durable-analytics-drain-{i}", daemon=True)
        for i in range(max(1, concurrency))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    left = queue.pending(up_to_id=up_to_id)
    return DrainResult(
        sent=total.sent,
        dead_lettered=total.dead_lettered,
        left=left,
        elapsed=time.monotonic() - started,
        errors=tuple(dict.fromkeys(total.errors)),
    )
