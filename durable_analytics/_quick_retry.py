"""One batch's request and its quick retries: the Retry-After gate, then tenacity, within a budget.

``post`` sends the messages of a lease that ``Deliverer`` picked. Before the request it waits
for this process's Retry-After gate of the destination (``_pipeline.Window``), a short while
at most; after a retryable answer it retries at once a few times (``QuickRetries``: segment's
``max_retries``, ``max_total_backoff_duration`` and ``max_rate_limit_duration``), well inside
the lease and the caller's deadline. What it returns is the answer ``Deliverer`` settles the
batch by, or ``DEADLINE_PASSED`` / ``GATED`` when no request was made. The backoff a failing
destination then waits in the queue is ``_delivery``'s (``retry_delay``), not this.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

from . import _delivery_log
from ._metrics import delivery_counters
from ._pipeline import MAX_GATE_WAIT, Ticket, Window
from ._store import Lease, QueueBackend
from ._transport import Outcome
from ._transport.base import Started, Transport

__all__ = ["DEADLINE_PASSED", "GATED", "QUICK_PAUSE_CAP", "QuickRetries", "post", "wait_first"]

log = logging.getLogger(_delivery_log.LOGGER)

#: What ``post`` returns when the caller's deadline passed before any request was made.
DEADLINE_PASSED = Outcome("retry", None, error="the flush deadline passed")
# How many times one request waits for the Retry-After gate before it goes back to the queue.
_GATE_WAITS = 4
#: What ``post`` returns when a Retry-After gate of this process is still closed.
GATED = Outcome("retry", None, error="the server asked to wait (Retry-After)")

#: The longest pause between quick retries; a Retry-After up to this long is waited likewise.
QUICK_PAUSE_CAP = 4.0


def wait_first(first: Outcome, budget: float) -> float:
    """The pause before the first quick retry: the server's Retry-After, else 0.25-0.5 s."""
    delay = first.retry_after if first.retry_after else 0.25 * random.uniform(1.0, 2.0)
    return min(budget, delay)


@dataclass(frozen=True)
class QuickRetries:
    """A Deliverer's quick-retry settings, and how it sleeps (a test's fake clock, or not)."""

    #: Quick retries after the first request (0: none).
    max_retries: int
    #: Quick retries stop after this many seconds too (segment's setting).
    max_total_backoff_duration: float
    #: A ``Retry-After`` up to this long (and inside the budget) is waited out here.
    max_rate_limit_duration: float
    sleep: Callable[[float], None]


def post(
    queue: QueueBackend,
    transport: Transport,
    lease: Lease,
    idx: list[int],
    *,
    quick: bool,
    deadline: float | None,
    slot: tuple[Window, Ticket],
    policy: QuickRetries,
    sent: tuple[Started, float] | None = None,
) -> Outcome:
    """Send the messages ``idx`` of ``lease`` in one request, quickly retried when ``quick``.

    ``slot`` is the destination's window of this process and the ticket this request holds
    in it. ``sent``: the request was already sent (``SendsAhead.start``, at the monotonic
    time given): its answer is the first. Returns the server's last answer, or
    ``DEADLINE_PASSED`` / ``GATED`` when no request was made.
    """
    bodies = [lease.bodies[i] for i in idx]
    dest = lease.destination
    last = [DEADLINE_PASSED]
    # Earlier tries of these messages (other leases), then one more per quick retry.
    tries = [lease.attempts]
    first_try = lease.attempts
    window, ticket = slot

    pending = [] if sent is None else [sent]

    def attempt() -> Outcome:
        if pending:
            # Sent ahead, before the answer to the batch sent before it was read; the gate
            # was looked at then.
            request, sent_at = pending.pop()
            return answered(request.finish(), sent_at)
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
                return GATED
            policy.sleep(gate)
            waits += 1
            # Looked at again: a 429 read while this thread slept may have moved the
            # gate further (sending at the old time would land inside its Retry-After).
            gate = window.gate_wait()
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return DEADLINE_PASSED  # no request made: the caller's time is up
        sent_at = time.monotonic()
        return answered(
            transport.send(dest, bodies, timeout=remaining, retry_count=tries[0]), sent_at
        )

    def answered(outcome: Outcome, sent_at: float) -> Outcome:
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
        delivery_counters.request(outcome.status, retry=tries[0] > first_try or lease.failures > 0)
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
            queue.window.congested(lease)
        return outcome

    first = attempt()
    # Quick retries stay well inside the lease so a slow holder is not overtaken.
    started = time.monotonic()
    budget = min(queue.lease_timeout * 0.5, policy.max_total_backoff_duration)
    if deadline is not None:
        budget = min(budget, max(0.0, deadline - started))
    until = started + budget

    def again(o: Outcome) -> bool:
        # A retryable answer is retried quickly; one that names a Retry-After only when
        # the wait is a quick one (no longer than our own longest pause) that fits both
        # max_rate_limit_duration and what is left of the budget. A longer wait goes
        # back to the queue as the destination's backoff, where every process sees it.
        if o is DEADLINE_PASSED or o is GATED or o.kind != "retry":
            return False
        if o.retry_after is None:
            return True
        return (
            o.retry_after <= min(policy.max_rate_limit_duration, QUICK_PAUSE_CAP)
            and time.monotonic() + o.retry_after < until
        )

    if not (quick and policy.max_retries and again(first)):
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
    policy.sleep(pause)
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.max_retries)
        | tenacity.stop_after_delay(max(0.0, budget - (time.monotonic() - started))),
        wait=wait,
        retry=tenacity.retry_if_result(again),
        sleep=policy.sleep,
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
    if final is GATED:
        return GATED
    # The last answer the server gave, not a deadline that ran out between retries.
    return last[0]
