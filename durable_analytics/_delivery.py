"""Delivery of one leased batch by the status policy, and the one place a Deliverer is built.

``Deliverer`` leases a batch, sends it through a ``Transport`` and settles it in the queue:
ack, release with a backoff, or split and dead-letter. ``make_deliverer(config, queue)``
is the only construction site the library uses, so every delivery path (the flusher
thread, ``flush()``, exit, the flusher process, ``drain`` and ``worker``) runs with the
same settings. Nothing here raises into the caller: failures become backoff, dead letters,
``on_error`` calls and log lines.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import tenacity

from . import _delivery_log
from ._metrics import delivery_counters
from ._pipeline import MAX_GATE_WAIT, Ticket, Window, keep_leased, window_for
from ._store import MAX_BACKOFF_SECONDS, Lease, QueueBackend
from ._transport import Outcome, open_transport
from ._transport.base import Transport
from .exceptions import (
    ConfigurationRejected,
    DeliveryError,
    MessageRejected,
    QueueError,
    RetryableError,
)

if TYPE_CHECKING:
    from ._config import Config

__all__ = [
    "CONFIG_CAP",
    "RETRY_CAP",
    "Deliverer",
    "DeliveryStats",
    "FlushResult",
    "make_deliverer",
    "retry_delay",
]

log = logging.getLogger(_delivery_log.LOGGER)

OnError = Callable[[Exception, list[dict[str, Any]]], object]

# What _post returns when the caller's deadline passed before any request was made.
_DEADLINE_PASSED = Outcome("retry", None, error="the flush deadline passed")
# How many times one request waits for the Retry-After gate before it goes back to the queue.
_GATE_WAITS = 4
# What _post returns when a Retry-After gate of this process is still closed.
_GATED = Outcome("retry", None, error="the server asked to wait (Retry-After)")

#: Steady-state retry interval against a dead server: one request a minute per destination.
RETRY_CAP = 60.0
#: Backoff cap for configuration errors (401, 403, 404, 3xx).
CONFIG_CAP = MAX_BACKOFF_SECONDS
_CONFIG_FIRST = 30.0


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


#: Batches the pipeline leases at once (each still goes out as its own request; the lease
#: transaction is paid once for them). 1 by measurement: 2 took ~15 % less CPU at 50 ms per
#: request but no measurable wall time on a loaded machine, halved the parallelism of a
#: small backlog, and slowed a 429 storm (a failure hands the unsent batch back too).
LEASE_BATCHES = 1

#: The longest pause between quick retries; a Retry-After up to this long is waited likewise.
QUICK_PAUSE_CAP = 4.0


def wait_first(first: Outcome, budget: float) -> float:
    """The pause before the first quick retry: the server's Retry-After, else 0.25-0.5 s."""
    delay = first.retry_after if first.retry_after else 0.25 * random.uniform(1.0, 2.0)
    return min(budget, delay)


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
    #: The last answer that was not a success (what ``sync_mode`` raises from).
    failure: Outcome | None = None

    def add(self, other: DeliveryStats) -> None:
        """Accumulate ``other`` into this one."""
        if other.failure is not None:
            self.failure = other.failure
        self.sent += other.sent
        self.dead_lettered += other.dead_lettered
        self.kept += other.kept
        self.requests += other.requests
        self.errors.extend(other.errors[-5:])
        del self.errors[:-20]


class Deliverer:
    """Delivers leased batches by the status policy.

    2xx acks; 400, 413 and 422 split the batch until the bad message is alone and move it
    to the dead letters; a retryable failure (429, 5xx, network) is retried quickly, then
    the rest of the lease goes back with a backoff shared by every process on the queue;
    401, 403, 404 and 3xx keep the messages, back off longer and warn. Build one with
    ``make_deliverer``.

    Many threads may use one Deliverer at once (its transport must allow it): each request
    takes a slot of the destination's in-flight window of this process (``_pipeline``), at
    most ``max_in_flight``, and its lease is extended while the request is in flight. A
    queue that keeps a window for every process sharing it (``queue.window``) refuses the
    lease past that window, and is told of every 429/5xx.
    """

    def __init__(
        self,
        queue: QueueBackend,
        transport: Transport,
        *,
        flush_at: int = 20,
        max_batch_bytes: int = 500_000,
        max_retries: int = 3,
        on_error: OnError | None = None,
        sleep: Callable[[float], None] = time.sleep,
        max_total_backoff_duration: float = 43200.0,
        max_in_flight: int = 1,
        batch_messages: int | None = None,
        max_rate_limit_duration: float = 1800.0,
        lease_batches: int = LEASE_BATCHES,
    ) -> None:
        self.queue = queue
        #: A ``Retry-After`` up to this long (and inside the quick-retry budget) is waited
        #: out by the quick retries; a longer one reports the batch at once (segment's rule).
        self.max_rate_limit_duration = max_rate_limit_duration
        #: Quick retries of a failing batch stop after this many seconds too (segment's
        #: setting): the batch is then reported and goes back to the queue with a backoff.
        self.max_total_backoff_duration = max_total_backoff_duration
        self.transport = transport
        self.flush_at = flush_at
        #: Messages per request: ``flush_at`` unless ``max_batch_messages`` says more.
        self.batch_messages = flush_at if batch_messages is None else batch_messages
        self.max_batch_bytes = max_batch_bytes
        self.max_retries = max_retries
        self.on_error = on_error
        #: Requests this Deliverer keeps outstanding per destination, at most.
        self.max_in_flight = max(1, max_in_flight)
        #: Batches the pipeline (``_drain.deliver_pass``) takes under one lease.
        self.lease_batches = max(1, lease_batches)
        self._sleep = sleep
        self._lock = threading.Lock()
        # on_error is the user's code: never called from two delivery threads at once.
        self._report_lock = threading.Lock()
        #: Messages this Deliverer dead-lettered, per destination id (counted just before
        #: the move commits, so whoever sees them gone from the queue sees them counted).
        self.dead_lettered: dict[int, int] = {}

    def _budget(self) -> int:
        # lease() counts one comma per message; a body of n messages has n - 1 of them.
        return self.max_batch_bytes - self.transport.envelope_overhead() + 1

    def deliver_next(
        self,
        *,
        destination: int | None = None,
        up_to_id: int | None = None,
        deadline: float | None = None,
    ) -> DeliveryStats | None:
        """Lease one batch and deliver it; None when nothing is ready."""
        lease = self.lease_next(destination=destination, up_to_id=up_to_id)
        if lease is None:
            return None
        return self.deliver(lease, deadline=deadline)

    def lease_next(
        self, *, destination: int | None = None, up_to_id: int | None = None, batches: int = 1
    ) -> Lease | None:
        """Lease the next ``batches`` batches (each up to ``batch_messages`` and
        ``max_batch_bytes``) under one lease, or None.

        ``deliver`` sends a lease of more than one batch as one request per batch, one
        after the other: every request keeps the batch limits, and the queue's lease
        transaction, the costliest step of a request here, is paid once for them all.
        """
        return self.queue.lease(
            self.batch_messages * batches,
            self._budget() * batches,
            destination=destination,
            up_to_id=up_to_id,
        )

    def batches(self, lease: Lease) -> list[list[int]]:
        """``lease``'s messages (by index) cut into requests: at most ``batch_messages``
        each, and at most ``max_batch_bytes`` with the envelope (one message at least)."""
        budget = self._budget()
        parts: list[list[int]] = []
        part: list[int] = []
        used = 0
        for i, body in enumerate(lease.bodies):
            cost = len(body) + 1  # a comma each, one too many: _budget counts it back
            if part and (len(part) >= self.batch_messages or used + cost > budget):
                parts.append(part)
                part, used = [], 0
            part.append(i)
            used += cost
        if part:
            parts.append(part)
        return parts

    def window(self, lease: Lease) -> Window:
        """This process's in-flight window for ``lease``'s destination."""
        dest = lease.destination
        return window_for(dest.host, dest.write_key, self.max_in_flight)

    def deliver(
        self,
        lease: Lease,
        *,
        deadline: float | None = None,
        stop: threading.Event | None = None,
    ) -> DeliveryStats:
        """Send ``lease``'s batch; ack, release, split or dead-letter as the server says.

        Waits for a slot of the destination's window first; if ``deadline`` passes or
        ``stop`` is set meanwhile, the batch goes back to the queue unsent.
        """
        stats = DeliveryStats()
        window = self.window(lease)
        try:
            with keep_leased(self.queue, lease):
                ticket = window.acquire(self.max_in_flight, deadline=deadline, stop=stop)
                if ticket is None:
                    stats.kept += self.queue.release(lease, None, count_attempt=False)
                    return stats
                try:
                    parts = self.batches(lease)
                    for n, part in enumerate(parts):
                        if n and stop is not None and stop.is_set():
                            # Asked to stop: the batch in flight was finished, the rest of
                            # the lease goes back unsent.
                            stats.kept += self.queue.release(lease, None, count_attempt=False)
                            break
                        if not self._send_part(
                            lease,
                            part,
                            stats,
                            lease.failures,
                            deadline,
                            (window, ticket),
                            later=parts[n + 1 :],
                        ):
                            break  # the rest of the lease went back to the queue
                finally:
                    window.release()
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

    def _post(
        self,
        lease: Lease,
        idx: list[int],
        quick: bool,
        deadline: float | None,
        slot: tuple[Window, Ticket],
    ) -> Outcome:
        bodies = [lease.bodies[i] for i in idx]
        dest = lease.destination
        last = [_DEADLINE_PASSED]
        # Earlier tries of these messages (other leases), then one more per quick retry.
        tries = [lease.attempts]
        first_try = lease.attempts
        window, ticket = slot

        def attempt() -> Outcome:
            gate = window.gate_wait()
            waits = 0
            while gate > 0:
                # Another request was told to wait (Retry-After): nothing leaves before then.
                # A gate that keeps moving (or a clock a test froze) sends the batch back to
                # the queue to wait there instead.
                if (
                    gate > MAX_GATE_WAIT
                    or waits >= _GATE_WAITS
                    or (deadline is not None and time.monotonic() + gate >= deadline)
                ):
                    return _GATED
                self._sleep(gate)
                waits += 1
                # Looked at again: a 429 read while this thread slept may have moved the
                # gate further (sending at the old time would land inside its Retry-After).
                gate = window.gate_wait()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return _DEADLINE_PASSED  # no request made: the caller's time is up
            sent_at = time.monotonic()
            outcome = self.transport.send(dest, bodies, timeout=remaining, retry_count=tries[0])
            if outcome.retry_after and outcome.kind == "retry":
                # Close the gate before anything else: another thread must not start a
                # request in the moment between this answer being read and the gate closing.
                window.hold_until(time.monotonic() + outcome.retry_after)
            _delivery_log.batch(
                dest.host,
                len(bodies),
                sum(map(len, bodies)),
                outcome.status,
                time.monotonic() - sent_at,
                outcome.error,
            )
            # A resend: a quick retry, or the first try of a lease that failed before.
            delivery_counters.request(outcome.status, retry=tries[0] > first_try or not quick)
            tries[0] += 1
            window.observe(time.monotonic() - sent_at)
            last[0] = outcome
            if outcome.kind == "ok":
                window.on_success()
            elif outcome.kind == "retry" and (
                outcome.status is None or outcome.status == 429 or outcome.status >= 500
            ):
                window.on_congestion(ticket)
                # And where the queue keeps a window for every process (PostgreSQL), there.
                self.queue.window.congested(lease)
            return outcome

        first = attempt()
        # Quick retries stay well inside the lease so a slow holder is not overtaken.
        started = time.monotonic()
        budget = min(self.queue.lease_timeout * 0.5, self.max_total_backoff_duration)
        if deadline is not None:
            budget = min(budget, max(0.0, deadline - started))
        until = started + budget

        def again(o: Outcome) -> bool:
            # A retryable answer is retried quickly; one that names a Retry-After only when
            # the wait is a quick one (no longer than our own longest pause) that fits both
            # max_rate_limit_duration and what is left of the budget. A longer wait goes
            # back to the queue as the destination's backoff, where every process sees it.
            if o is _DEADLINE_PASSED or o is _GATED or o.kind != "retry":
                return False
            if o.retry_after is None:
                return True
            return (
                o.retry_after <= min(self.max_rate_limit_duration, QUICK_PAUSE_CAP)
                and time.monotonic() + o.retry_after < until
            )

        if not (quick and self.max_retries and again(first)):
            return first  # the common case builds no retry machinery at all
        # 0.25, 0.5, 1 … 4 s plus up to 0.25 s of jitter (wait_exponential_jitter's
        # `initial` is deprecated in tenacity 9 and its replacement missing from 8.x).
        backoff = tenacity.wait_exponential(
            multiplier=0.25, max=QUICK_PAUSE_CAP
        ) + tenacity.wait_random(0, 0.25)

        def wait(state: tenacity.RetryCallState) -> float:
            # The server's Retry-After when it named one (never sooner), else the backoff;
            # never past the budget (a flush deadline, an exit): stop there instead.
            outcome = state.outcome.result() if state.outcome is not None else None
            told = outcome.retry_after if isinstance(outcome, Outcome) else None
            delay = told if told else backoff(state)
            return max(0.0, min(delay, until - time.monotonic()))

        pause = wait_first(first, budget)
        log.debug("quick retry of a batch of %d in %.2fs after: %s", len(idx), pause, first.error)
        self._sleep(pause)
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_retries)
            | tenacity.stop_after_delay(max(0.0, budget - (time.monotonic() - started))),
            wait=wait,
            retry=tenacity.retry_if_result(again),
            sleep=self._sleep,
            retry_error_callback=lambda state: (
                state.outcome.result()
                if state.outcome is not None
                else Outcome("retry", None, error="no attempt")
            ),
            before_sleep=lambda state: log.debug(
                "quick retry of a batch of %d in %.2fs after: %s",
                len(idx),
                state.next_action.sleep if state.next_action else 0.0,
                state.outcome.result().error if state.outcome else "",
            ),
            reraise=True,
        )
        final = retrying(attempt)
        if final is _GATED:
            return _GATED
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
            with self._report_lock:
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
        slot: tuple[Window, Ticket],
        later: list[list[int]] | None = None,
    ) -> bool:
        """Deliver the messages ``idx`` of ``lease``; False once the rest must wait (backoff).

        ``later`` are the lease's batches still to send after this one: when a failure
        hands them back to the queue unsent, each is reported to ``on_error`` as its own
        batch, as it would have been had it been leased alone.
        """
        dest = lease.destination
        ids = [lease.ids[i] for i in idx]
        outcome = self._post(lease, idx, quick=failures == 0, deadline=deadline, slot=slot)
        if outcome is _DEADLINE_PASSED:
            # No request was made: the caller's deadline ran out, not the server. Hand the
            # rest back as it was: no backoff, no attempt counted, no error reported.
            stats.kept += self.queue.release(lease, None, count_attempt=False)
            return False
        if outcome is _GATED:
            # No request was made: a Retry-After of this destination is still running. The
            # batch waits it out in the queue (where every holder sees it), not here.
            until = time.time() + slot[0].gate_wait()
            stats.kept += self.queue.release(lease, until, count_attempt=False)
            return False
        stats.requests += 1
        if outcome.kind != "ok":
            stats.failure = outcome
        if outcome.kind == "ok":
            # The ack also clears the destination's backoff, in the same transaction.
            self.queue.ack(lease, None if len(ids) == len(lease.ids) else ids)
            stats.sent += len(ids)
            delivery_counters.sent(len(ids))
            _delivery_log.succeeded((str(self.queue.path), dest.id), dest.host)
            return True
        if outcome.kind == "reject":
            if len(idx) == 1:
                self._count_dead(dest.id, 1)
                moved = 0
                try:
                    moved = self.queue.dead_letter(
                        lease,
                        ids,
                        status=outcome.status,
                        reason=f"HTTP {outcome.status}",
                        excerpt=outcome.excerpt,
                    )
                finally:
                    self._count_dead(dest.id, moved - 1)
                delivery_counters.dead_lettered(moved)
                stats.dead_lettered += 1
                log.warning(
                    "dead-lettered message %s: %s answered HTTP %s (see `durable-analytics "
                    "dead-letters list`)",
                    _message_id(lease.bodies[idx[0]]),
                    dest.host,
                    outcome.status,
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
                if not self._send_part(lease, part, stats, failures, deadline, slot, later):
                    return False
            return True
        # Retryable or configuration error: keep everything not yet delivered, back off.
        # One queue transaction: count the failure (other holders' included), store the
        # backoff so every process on the queue honours it, and hand back everything this
        # lease still holds (a split stops here).
        until = self.queue.retry_later(
            lease,
            lambda failures: retry_delay(outcome.kind, failures, outcome.retry_after),
            outcome.error,
        )
        delay = max(0.0, until - time.time())
        kept = len(lease.ids) - stats.sent - stats.dead_lettered
        stats.kept += kept
        stats.errors.append(outcome.error)
        log.debug("backing off %s for %.1fs after: %s", dest.host, delay, outcome.error)
        _delivery_log.failed(
            (str(self.queue.path), dest.id),
            dest.host,
            kind=outcome.kind,
            status=outcome.status,
            error=outcome.error,
            delay=delay,
            kept=kept,
        )
        if outcome.kind == "config":
            exc: DeliveryError = ConfigurationRejected(
                f"{outcome.error}; the messages are kept: check the write key and host",
                status=outcome.status,
                excerpt=outcome.excerpt,
            )
        else:
            exc = RetryableError(
                f"{outcome.error}; the messages are kept and retried in {delay:.0f}s",
                status=outcome.status,
                excerpt=outcome.excerpt,
            )
        self._report(exc, lease, idx)
        for part in later or ():
            self._report(exc, lease, part)
        return False

    def _count_dead(self, dest_id: int, delta: int) -> None:
        with self._lock:
            self.dead_lettered[dest_id] = self.dead_lettered.get(dest_id, 0) + delta


def _message_id(body: bytes) -> str:
    """The messageId of a stored body, quoted for a log line (never the body itself).

    It is user data: JSON-quoted (line breaks and control characters escaped, so it cannot
    forge a log line) and cut to 100 characters.
    """
    try:
        value = json.loads(body).get("messageId")
    except (ValueError, AttributeError):
        return "?"
    return "?" if value is None else json.dumps(str(value)[:100])


def make_deliverer(
    config: Config,
    queue: QueueBackend,
    transport: Transport | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Deliverer:
    """A Deliverer for ``queue`` with ``config``'s batch, retry and ``on_error`` settings.

    ``transport`` defaults to ``open_transport(config)`` (HTTP with the config's timeout,
    gzip and proxies); pass one to deliver through another (``Client(transport=...)``, a
    ``DestinationOverride``, a test's ``RecordingTransport``).
    """
    return Deliverer(
        queue,
        open_transport(config) if transport is None else transport,
        flush_at=config.flush_at,
        max_batch_bytes=config.max_batch_bytes,
        max_retries=config.max_retries,
        on_error=config.on_error,
        sleep=sleep,
        max_total_backoff_duration=config.max_total_backoff_duration,
        max_rate_limit_duration=config.max_rate_limit_duration,
        max_in_flight=config.max_in_flight,
        batch_messages=config.batch_messages,
    )
