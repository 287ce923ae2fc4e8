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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import tenacity

from . import _delivery_log
from ._metrics import delivery_counters
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
    ``make_deliverer``; a Deliverer is used by one thread at a time.
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
    ) -> None:
        self.queue = queue
        #: Quick retries of a failing batch stop after this many seconds too (segment's
        #: setting): the batch is then reported and goes back to the queue with a backoff.
        self.max_total_backoff_duration = max_total_backoff_duration
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
        return self.max_batch_bytes - self.transport.envelope_overhead() + 1

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
        bodies = [lease.bodies[i] for i in idx]
        dest = lease.destination
        last = [_DEADLINE_PASSED]
        # Earlier tries of these messages (other leases), then one more per quick retry.
        tries = [lease.attempts]
        first_try = lease.attempts

        def attempt() -> Outcome:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return _DEADLINE_PASSED  # no request made: the caller's time is up
            started = time.monotonic()
            last[0] = outcome = self.transport.send(
                dest, bodies, timeout=remaining, retry_count=tries[0]
            )
            _delivery_log.batch(
                dest.host,
                len(bodies),
                sum(map(len, bodies)),
                outcome.status,
                time.monotonic() - started,
                outcome.error,
            )
            # A resend: a quick retry, or the first try of a lease that failed before.
            delivery_counters.request(last[0].status, retry=tries[0] > first_try or not quick)
            tries[0] += 1
            return last[0]

        first = attempt()
        if first is _DEADLINE_PASSED or not (
            quick and self.max_retries and first.kind == "retry" and first.retry_after is None
        ):
            return first  # the common case builds no retry machinery at all
        # Quick retries stay well inside the lease so a slow holder is not overtaken.
        started = time.monotonic()
        budget = min(self.queue.lease_timeout * 0.5, self.max_total_backoff_duration)
        if deadline is not None:
            budget = min(budget, max(0.0, deadline - started))
        pause = min(budget, 0.25 * random.uniform(1.0, 2.0))
        log.debug("quick retry of a batch of %d in %.2fs after: %s", len(idx), pause, first.error)
        self._sleep(pause)
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
                "quick retry of a batch of %d in %.2fs after: %s",
                len(idx),
                state.next_action.sleep if state.next_action else 0.0,
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
                if not self._send_part(lease, part, stats, failures, deadline):
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
        return False


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
    )
