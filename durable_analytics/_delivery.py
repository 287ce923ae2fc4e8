"""Delivery of one leased batch by the status policy, and the one place a Deliverer is built.

``Deliverer`` leases a batch, sends it through a ``Transport`` and settles it in the queue:
ack, release with a backoff, or split and dead-letter. ``make_deliverer(config, queue)``
is the only construction site the library uses, so every delivery path (the flusher
thread, ``flush()``, exit, the flusher process, ``drain`` and ``worker``) runs with the
same settings. Nothing here raises into the caller: failures become backoff, dead letters,
``on_error`` calls and log lines. One request and its quick retries (the Retry-After gate,
tenacity) are ``_quick_retry``'s: ``Deliverer`` settles the answer it returns.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import _delivery_log
from ._metrics import delivery_counters
from ._pipeline import Ticket, Window, keep_leased, still_held, stop_keeping, window_for
from ._quick_retry import DEADLINE_PASSED, GATED, QuickRetries, post
from ._reports import (
    ReportGate,
    kept_error,
    message_id,
    rejected_error,
    report,
    report_until,
)
from ._store import MAX_BACKOFF_SECONDS, Lease, QueueBackend, settling
from ._transport import Outcome, open_transport
from ._transport.base import Started, Transport
from .exceptions import DeliveryError, QueueError

if TYPE_CHECKING:
    from ._config import Config, OnError

__all__ = [
    "CONFIG_CAP",
    "RETRY_CAP",
    "Ahead",
    "Deliverer",
    "DeliveryStats",
    "FlushResult",
    "Follow",
    "make_deliverer",
    "retry_delay",
]

log = logging.getLogger(_delivery_log.LOGGER)

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


@dataclass
class Follow:
    """What ``Deliverer.deliver`` leases next in its ack's transaction, and what it got.

    The pipeline's step from one batch to the next (``QueueBackend.ack_and_lease``): a
    batch delivered whole is acked and the next one leased in one queue transaction.
    ``taken`` says it happened (``lease`` is then the queue's answer, None when nothing was
    ready); when it did not (a failure, a split), the caller leases as usual.
    """

    destination: int | None = None
    up_to_id: int | None = None
    batches: int = 1
    taken: bool = False
    lease: Lease | None = None


@dataclass
class Ahead:
    """A leased batch already sent, its answer still to read (``_pass.send_ahead``).

    It holds a slot of its destination's window and its lease is kept alive; hand it to
    ``Deliverer.deliver`` (which reads the answer and settles the batch) or to
    ``_pass.drop_ahead``.
    """

    lease: Lease
    started: Started
    window: Window
    ticket: Ticket
    #: When the request left (monotonic): its round trip is measured from here.
    sent_at: float
    #: ``Deliverer.deliver`` took it (it settles it, whatever happens, from then on).
    taken: bool = False


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
        report_gate: ReportGate | None = None,
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
        #: Batches the pipeline (``_pass.deliver_pass``) takes under one lease.
        self.lease_batches = max(1, lease_batches)
        self._sleep = sleep
        # on_error is the user's code: never called from two delivery threads at once (a
        # Client's deliverers share one gate).
        self._report_gate = ReportGate() if report_gate is None else report_gate
        self._overhead: tuple[Transport | None, int] = (None, 0)

    def _budget(self) -> int:
        # lease() counts one comma per message; a body of n messages has n - 1 of them.
        # The envelope's size is the transport's constant (HTTPTransport formats a sentAt
        # to measure it): asked once per transport, not twice per batch.
        transport, overhead = self._overhead
        if transport is not self.transport:
            overhead = self.transport.envelope_overhead()
            self._overhead = (self.transport, overhead)
        return self.max_batch_bytes - overhead + 1

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

    def _ack(self, lease: Lease, ids: list[int], follow: Follow | None) -> None:
        """Ack ``ids`` of ``lease``; with ``follow`` (and the whole lease acked), lease the
        next batch in the same step. The server has the batch: its ack may wait a moment
        past a caller's deadline (``settling``), since a lost one sends it again."""
        with settling():
            self._ack_settling(lease, ids, follow)

    def _ack_settling(self, lease: Lease, ids: list[int], follow: Follow | None) -> None:
        if follow is None or len(ids) != len(lease.ids):
            self.queue.ack(lease, None if len(ids) == len(lease.ids) else ids)
            return
        try:
            _, follow.lease = self.queue.ack_and_lease(
                lease,
                self.batch_messages * follow.batches,
                self._budget() * follow.batches,
                destination=follow.destination,
                up_to_id=follow.up_to_id,
            )
        except QueueError as exc:
            # The step is one transaction: its lease half failing (a full disk, a deadline)
            # undid the ack too. The server has the batch, so ack it alone; a lost ack here
            # would send it again, a duplicate without a fault. The caller leases as usual.
            log.debug("acking the batch alone: leasing the next in its step failed: %s", exc)
            self.queue.ack(lease)
            return
        follow.taken = True

    def give_back(self, lease: Lease) -> None:
        """Hand an unsent lease back as it was (no attempt counted); a failure is logged,
        and the lease then expires on its own."""
        self._release_quietly(lease)

    def batches(self, lease: Lease) -> list[list[int]]:
        """``lease``'s messages (by index) cut into requests (``split``)."""
        return self.split(lease.bodies)

    def split(self, bodies: Sequence[bytes]) -> list[list[int]]:
        """``bodies`` (by index) cut into batches: at most ``batch_messages`` each, and at
        most ``max_batch_bytes`` with the envelope (one message at least)."""
        budget = self._budget()
        if 0 < len(bodies) <= self.batch_messages and sum(map(len, bodies)) + len(bodies) <= budget:
            return [list(range(len(bodies)))]  # the usual lease: one request
        parts: list[list[int]] = []
        part: list[int] = []
        used = 0
        for i, body in enumerate(bodies):
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
        follow: Follow | None = None,
        ahead: Ahead | None = None,
        quick: bool = True,
    ) -> DeliveryStats:
        """Send ``lease``'s batch; ack, release, split or dead-letter as the server says.

        Waits for a slot of the destination's window first; if ``deadline`` passes or
        ``stop`` is set meanwhile, the batch goes back to the queue unsent. ``follow``: when
        the batch goes out whole in one request and is acked, the next batch is leased in
        the ack's transaction (see ``Follow``); the caller owns that lease. ``ahead``: the
        batch was already sent (``_pass.send_ahead``, its slot taken then): its answer is read
        here, whatever ``deadline`` and ``stop`` say. ``quick=False`` skips the quick
        retries of a failure (the batch sent before this one has just had them).
        """
        stats = DeliveryStats()
        window = self.window(lease) if ahead is None else ahead.window
        # The slot a batch sent ahead holds, until the block that gives it back owns it.
        slot_unowned = ahead is not None
        try:
            if ahead is not None:
                ahead.taken = True  # an interrupt before this leaves it to the caller's care
            with keep_leased(self.queue, lease):
                if ahead is None:
                    ticket = window.acquire(self.max_in_flight, deadline=deadline, stop=stop)
                    if ticket is None:
                        stats.kept += self.queue.release(lease, None, count_attempt=False)
                        return stats
                else:
                    ticket = ahead.ticket
                try:
                    slot_unowned = False
                    if ahead is None and not still_held(self.queue, lease):
                        # Expired while it waited and leased again (see ``still_held``):
                        # its messages are another lease's now; sent, they would be a
                        # duplicate without a fault. Nothing of it is ours to settle.
                        log.debug("a batch's lease ran out before it was sent; not sent")
                        return stats
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
                            lease.failures if quick else max(1, lease.failures),
                            deadline,
                            (window, ticket),
                            later=parts[n + 1 :],
                            follow=follow if len(parts) == 1 else None,
                            started=None if ahead is None else (ahead.started, ahead.sent_at),
                        ):
                            break  # the rest of the lease went back to the queue
                finally:
                    window.release()
        except BaseException:
            # Whatever happened, messages not acked stay in the queue under this lease until
            # it is released here or expires.
            if ahead is not None:
                ahead.started.cancel()  # no-op once its answer was read
                stop_keeping(lease)  # kept since it was sent: a no-op once the block ended
                if slot_unowned:
                    window.release()
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
        started: tuple[Started, float] | None = None,
    ) -> Outcome:
        policy = QuickRetries(
            self.max_retries,
            self.max_total_backoff_duration,
            self.max_rate_limit_duration,
            self._sleep,
        )
        return post(
            self.queue,
            self.transport,
            lease,
            idx,
            quick=quick,
            deadline=deadline,
            slot=slot,
            policy=policy,
            sent=started,
        )

    def _report(
        self, exc: DeliveryError, lease: Lease, idx: list[int], until: float | None = None
    ) -> None:
        """Call ``on_error`` for the messages ``idx`` of ``lease`` (``_reports.report``);
        none: only record ``exc`` as the destination's error."""
        self._report_gate.note(exc, lease.destination.id, [lease.ids[i] for i in idx])
        if idx:
            report(self.on_error, self._report_gate, exc, [lease.bodies[i] for i in idx], until)

    def report_unsent(
        self,
        exc: DeliveryError,
        dest_id: int,
        rows: Sequence[tuple[int, bytes]],
        until: float | None = None,
    ) -> None:
        """Call ``on_error`` for messages ``(id, body)`` of ``dest_id`` that were not sent
        (``flush()``'s rest, kept behind its destination's backoff), as for a batch that
        failed with ``exc``; not for those another deliverer of this client reported since
        the caller read them (``ReportGate.claim``)."""
        fresh = self._report_gate.claim(row_id for row_id, _ in rows)
        rows = [row for row in rows if row[0] in fresh]
        self._report_gate.note(exc, dest_id, [row_id for row_id, _ in rows])
        if rows:
            report(self.on_error, self._report_gate, exc, [body for _, body in rows], until)

    def _send_part(
        self,
        lease: Lease,
        idx: list[int],
        stats: DeliveryStats,
        failures: int,
        deadline: float | None,
        slot: tuple[Window, Ticket],
        later: list[list[int]] | None = None,
        follow: Follow | None = None,
        started: tuple[Started, float] | None = None,
    ) -> bool:
        """Deliver the messages ``idx`` of ``lease``; False once the rest must wait (backoff).

        ``later`` are the lease's batches still to send after this one: when a failure
        hands them back to the queue unsent, each is reported to ``on_error`` as its own
        batch, as it would have been had it been leased alone. ``follow``: see ``deliver``.
        ``started``: the request was sent ahead (its answer read first, see ``_quick_retry``).
        """
        dest = lease.destination
        ids = [lease.ids[i] for i in idx]
        outcome = self._post(
            lease, idx, quick=failures == 0, deadline=deadline, slot=slot, started=started
        )
        if outcome is DEADLINE_PASSED:
            # No request was made: the caller's deadline ran out, not the server. Hand the
            # rest back as it was: no backoff, no attempt counted, no error reported.
            stats.kept += self.queue.release(lease, None, count_attempt=False)
            return False
        if outcome is GATED:
            # No request was made: a Retry-After of this destination is still running. The
            # batch waits it out in the queue (where every holder sees it), not here.
            until = time.time() + slot[0].gate_wait()
            stats.kept += self.queue.release(lease, until, count_attempt=False)
            return False
        stats.requests += 1
        if outcome.kind != "ok":
            stats.failure = outcome
        if outcome.kind == "ok":
            # The ack also clears the destination's backoff, in the same transaction. Past
            # the caller's deadline it acks alone: the next lease would only be handed back
            # (and the ack may now wait a moment past the deadline, ``settling``).
            late = deadline is not None and time.monotonic() >= deadline
            self._ack(lease, ids, None if late else follow)
            stats.sent += len(ids)
            delivery_counters.sent(len(ids))
            _delivery_log.succeeded((str(self.queue.path), dest.id), dest.host)
            return True
        if outcome.kind == "reject":
            if len(idx) == 1:
                moved = self.queue.dead_letter(
                    lease,
                    ids,
                    status=outcome.status,
                    reason=f"HTTP {outcome.status}",
                    excerpt=outcome.excerpt,
                )
                delivery_counters.dead_lettered(moved)
                stats.dead_lettered += 1
                log.warning(
                    "dead-lettered message %s: %s answered HTTP %s (see `durable-analytics "
                    "dead-letters list`)",
                    message_id(lease.bodies[idx[0]]),
                    dest.host,
                    outcome.status,
                )
                self._report(rejected_error(outcome), lease, idx, report_until(deadline))
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
        # lease still holds (a split stops here). What this reports below is claimed first:
        # once handed back, another flush's report of its unsent rest would take it too.
        # Messages another deliverer of this client reported while a flush runs (its unsent
        # rest, read before this lease took them) are not reported again.
        fresh = self._report_gate.claim(
            lease.ids[i] for part in (idx, *(later or ())) for i in part
        )
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
        exc = kept_error(outcome, delay)
        report_by = report_until(deadline)
        for part in (idx, *(later or ())):
            # Each batch is one call; the first also records ``exc`` when nothing is fresh.
            unreported = [i for i in part if lease.ids[i] in fresh]
            if unreported or part is idx:
                self._report(exc, lease, unreported, report_by)
        return False


def make_deliverer(
    config: Config,
    queue: QueueBackend,
    transport: Transport | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    report_gate: ReportGate | None = None,
) -> Deliverer:
    """A Deliverer for ``queue`` with ``config``'s batch, retry and ``on_error`` settings.

    ``transport`` defaults to ``open_transport(config)`` (HTTP with the config's timeout,
    gzip and proxies); pass one to deliver through another (``Client(transport=...)``, a
    ``DestinationOverride``, a test's ``RecordingTransport``). ``report_gate``: shared by
    the deliverers of one Client, so its ``on_error`` calls never overlap.
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
        report_gate=report_gate,
    )
