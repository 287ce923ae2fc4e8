"""The one "deliver until done or until the deadline" loop, and the drains built on it.

``deliver_until`` serves every path that must deliver now rather than in the background:
``Client.flush()`` and exit, ``sync_mode``, the end of the flusher process, the detached
exit drain, and the CLI's ``drain``. ``drain_queue`` is that loop with the rules of
``durable-analytics drain``; ``drain_lock`` keeps detached exit drains to one per queue.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ._delivery import Deliverer, DeliveryStats, make_deliverer
from ._override import OverrideQueue
from ._pass import Progress, deliver_pass, passed
from ._store import QueueBackend
from ._transport import DestinationOverride, open_transport
from ._transport.base import Outcome, Transport

if TYPE_CHECKING:
    from ._config import Config

__all__ = ["DrainResult", "deliver_until", "drain", "drain_lock", "drain_queue"]

log = logging.getLogger("durable_analytics.delivery")

# How often the loop looks again while another holder has the rest under a lease.
_HOLDER_POLL = 0.05
# Passes in a row that may find messages ready yet lease none before the loop gives up.
#: Without a deadline, ``deliver_until(wait_for_backoff=True)`` waits out a backoff that
#: ends within this many seconds, as long as it has met no failure of its own.
SHORT_BACKOFF_WAIT = 5.0
_MAX_STALLS = 20


@dataclass(frozen=True)
class DrainResult:
    """What a drain achieved: sent, dead-lettered, left pending (of its range), elapsed."""

    sent: int
    dead_lettered: int
    left: int
    elapsed: float
    errors: tuple[str, ...]
    #: The last failed answer, if any (``sync_mode`` raises ``APIError`` from it).
    failure: Outcome | None = None


def drain(
    queue: QueueBackend,
    make_deliverer: Callable[[], Deliverer],
    *,
    concurrency: int | None = None,
    timeout: float | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    up_to_id: int | None = None,
) -> DrainResult:
    """One pass: lease and deliver, ``concurrency`` batches in flight, until nothing is ready.

    Stops when nothing is ready any more (the rest is leased by others, in backoff, or the
    server keeps failing), when ``timeout`` passes, or when ``stop`` is set. ``up_to_id``
    limits it to the messages stored up to that id; ``left`` then counts only those. Most
    callers want ``deliver_until`` or ``drain_queue``, which also wait for other holders.
    ``concurrency`` defaults to the Deliverer's ``max_in_flight``.
    """
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    one = make_deliverer()
    try:
        with queue.bounded(timeout):  # no queue wait outlasts the deadline
            total = deliver_pass(
                queue,
                one,
                workers=concurrency,
                deadline=deadline,
                progress=progress,
                stop=stop,
                up_to_id=up_to_id,
            )
    finally:
        one.transport.close()
    return _result(queue, total, started, up_to_id, None)


def deliver_until(
    queue: QueueBackend,
    deliverer: Deliverer | Callable[[], Deliverer],
    *,
    concurrency: int | None = None,
    destination: int | None = None,
    up_to_id: int | None = None,
    deadline: float | None = None,
    wait_for_backoff: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    take_turns: bool = True,
) -> DrainResult:
    """Deliver the pending messages (of ``destination``, up to ``up_to_id``) until done.

    Runs passes of the pipeline (``deliver_pass``: up to ``concurrency`` batches in flight,
    default the Deliverer's ``max_in_flight``), each leasing and delivering until nothing is
    ready. Between passes, messages another live holder leased are waited for (that holder
    may give them back). Messages waiting out a retry backoff are waited for only with
    ``wait_for_backoff``: with a ``deadline``, a backoff that ends before it; without one, a
    backoff that ends within ``SHORT_BACKOFF_WAIT`` seconds, until the loop meets a failure
    of its own. Otherwise the loop ends and leaves them queued, so it never waits on a
    backoff without bound. It also ends at
    ``deadline`` (a ``time.monotonic()`` value) or when ``stop`` is set.

    ``deliverer`` is one Deliverer (its transport stays open) or a factory called once
    (its transport is closed when done). ``progress(n)`` is called after each batch with
    the messages it sent. ``up_to_id`` is what makes a drain end under constant production:
    pass the queue's ``max_id()`` at the start to deliver only what was queued by then.
    ``take_turns``: on a SQLite queue, deliver only while this process holds a delivery
    slot (``slots.py``), as flushes, ``close()``, exit and ``drain`` do; ``sync_mode``'s
    one message does not wait for one.
    """
    if not isinstance(deliverer, Deliverer):
        one = deliverer()
        try:
            return deliver_until(
                queue,
                one,
                concurrency=concurrency,
                destination=destination,
                up_to_id=up_to_id,
                deadline=deadline,
                wait_for_backoff=wait_for_backoff,
                progress=progress,
                stop=stop,
                take_turns=take_turns,
            )
        finally:
            one.transport.close()
    # No queue wait (a lock another process holds, maybe frozen) outlasts the deadline.
    with queue.bounded(None if deadline is None else deadline - time.monotonic()):
        return _deliver_until(
            queue,
            deliverer,
            concurrency=concurrency,
            destination=destination,
            up_to_id=up_to_id,
            deadline=deadline,
            wait_for_backoff=wait_for_backoff,
            progress=progress,
            stop=stop,
            slots=getattr(queue, "delivery_slots", None) if take_turns else None,
        )


def _deliver_until(
    queue: QueueBackend,
    deliverer: Deliverer,
    *,
    concurrency: int | None,
    destination: int | None,
    up_to_id: int | None,
    deadline: float | None,
    wait_for_backoff: bool,
    progress: Progress | None,
    stop: threading.Event | None,
    slots: _Slots | None,
) -> DrainResult:
    started = time.monotonic()
    total = DeliveryStats()
    stalls = 0  # passes in a row that found ready messages but leased none
    # Many processes on one SQLite file deliver a few at a time (``slots.py``); the others'
    # loops wait while the holders deliver what they wait for, and end once it is done.
    waiting = _SlotWait(slots, deadline)
    while True:
        if slots is not None and slots.needed():
            with slots.held() as mine:
                if not mine:
                    left = queue.pending(up_to_id=up_to_id, destination=destination)
                    if left == 0:
                        break  # the holders delivered it
                    if waiting.patient(queue, destination, slots.working(destination)):
                        if (stop is not None and stop.is_set()) or passed(deadline):
                            break
                        _pause(min(slots.poll, _remaining(deadline)), stop)
                        continue
                stats = _one_pass(
                    queue, deliverer, concurrency, deadline, progress, stop, up_to_id, destination
                )
            waiting = _SlotWait(slots, deadline)
        else:
            stats = _one_pass(
                queue, deliverer, concurrency, deadline, progress, stop, up_to_id, destination
            )
        total.add(stats)
        if queue.pending(up_to_id=up_to_id, destination=destination) == 0:
            break
        if (stop is not None and stop.is_set()) or passed(deadline):
            break
        queue.reclaim_expired()
        # Of our destination only: another's ready messages are not ours to wait for (a
        # flush would otherwise poll them until its deadline, or forever without one).
        next_at = queue.next_ready_at(up_to_id=up_to_id, destination=destination)
        now = time.time()
        if next_at is None:
            wait = _HOLDER_POLL  # the rest is leased by another live holder: wait for it
        elif next_at > now:
            if not wait_for_backoff:
                break  # what is left waits out a retry backoff
            if deadline is None:
                # No deadline: a short backoff (a Retry-After, a failure another process met)
                # is waited for, once, until this call meets a failure of its own; then the
                # rest stays queued, so the wait stays bounded whatever the server does.
                if total.errors or next_at - now > SHORT_BACKOFF_WAIT:
                    break
            elif next_at - now >= deadline - time.monotonic():
                break  # the backoff ends past our deadline
            wait = max(0.01, min(1.0, next_at - now))
        elif stats.sent or stats.dead_lettered or wait_for_backoff or stalls < _MAX_STALLS:
            # Ready again (a holder gave some back, a lease expired): go on after a breath.
            # A few passes without progress are allowed: a lease that expired just after
            # this pass looked (a dead holder's, on a backend that cannot tell it died) is
            # ready, and a busy holder with many batches in flight hands batches back and
            # takes new ones between our looks.
            stalls = 0 if (stats.sent or stats.dead_lettered) else stalls + 1
            wait = 0.01
        else:
            break  # ready but not leasable by this loop, and no progress: nothing to wait for
        _pause(min(wait, _remaining(deadline)), stop)
    return _result(queue, total, started, up_to_id, destination)


def _one_pass(
    queue: QueueBackend,
    deliverer: Deliverer,
    concurrency: int | None,
    deadline: float | None,
    progress: Progress | None,
    stop: threading.Event | None,
    up_to_id: int | None,
    destination: int | None,
) -> DeliveryStats:
    return deliver_pass(
        queue,
        deliverer,
        workers=concurrency,
        deadline=deadline,
        progress=progress,
        stop=stop,
        up_to_id=up_to_id,
        destination=destination,
    )


def _remaining(deadline: float | None) -> float:
    return math.inf if deadline is None else max(0.0, deadline - time.monotonic())


def _pause(seconds: float, stop: threading.Event | None) -> None:
    if stop is not None:
        stop.wait(seconds)
    else:
        time.sleep(seconds)


#: An id above every message's: ``pending(up_to_id=...)`` counts the file's messages only
#: (not journals or spools), from the index.
_EVERY_ID = 1 << 62
#: How long a loop without a slot waits while nobody has a lease out on its destination.
_IDLE_GRACE = 0.2
#: The longest a loop waits for a slot in one go (less with a deadline: half of it).
_MOST_WAIT = 5.0


class _Slots(Protocol):
    """A queue's delivery slots (a SQLite queue's ``delivery_slots``, ``slots.py``)."""

    #: How often a loop without a slot tries again (seconds).
    poll: float
    #: How long a loop waits for a slot without progress before it goes on without one.
    patience: float

    def needed(self) -> bool: ...

    def working(self, destination: int | None) -> bool: ...

    def held(self) -> contextlib.AbstractContextManager[bool]: ...


class _SlotWait:
    """A flush loop's wait for a delivery slot: patient while another process delivers
    the destination and its messages in the file go down (the holders deliver them, and
    end); not once nobody had a lease out on it for ``_IDLE_GRACE`` (the holders deliver
    other destinations), nor after ``patience`` seconds without progress (a holder stopped
    or hung), nor past ``_MOST_WAIT`` seconds or half the time its deadline left it in all
    (the holders may work through a backlog of theirs for long, never reaching this
    loop's messages). The loop then delivers without a slot."""

    def __init__(self, slots: _Slots | None, deadline: float | None) -> None:
        self._patience = 0.0 if slots is None else slots.patience
        self._left: int | None = None
        self._since = time.monotonic()
        self._idle_since: float | None = None
        most = _MOST_WAIT if deadline is None else min(_MOST_WAIT, (deadline - self._since) / 2)
        self._until = self._since + most

    def patient(self, queue: QueueBackend, destination: int | None, working: bool) -> bool:
        """Whether to wait on; ``working``: a lease is out on the destination now."""
        now = time.monotonic()
        if now >= self._until:
            return False
        if working:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= _IDLE_GRACE:
            return False  # nobody delivers it: a holder's gap between passes is shorter
        # Every id: the holders deliver up to their own loops' ids.
        left = queue.pending(up_to_id=_EVERY_ID, destination=destination)
        if self._left is None or left < self._left:
            self._left, self._since = left, now
        return now - self._since < self._patience


def drain_queue(
    queue: QueueBackend,
    config: Config,
    *,
    host: str | None = None,
    write_key: str | None = None,
    timeout: float | None = None,
    concurrency: int | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    transport: Callable[[], Transport] | None = None,
    ignore_backoff: bool = False,
) -> DrainResult:
    """Deliver everything queued when called, as ``durable-analytics drain`` does.

    Only the messages stored up to the call are taken (so a drain ends under constant
    production), each to its stored destination unless ``host`` / ``write_key`` replace it:
    such an override is a new endpoint, so stored backoffs are cleared first and its own
    failures stay out of the queue's stored state (``OverrideQueue``).
    One Deliverer built by ``make_deliverer(config, queue)`` (batch size, retries, request
    ``timeout``, gzip, proxies, ``max_in_flight`` from ``config``) keeps up to
    ``concurrency`` (default ``config.max_in_flight``) batches in flight. Messages another
    live process holds under a lease are waited for; messages waiting out a retry backoff
    are left queued, unless ``ignore_backoff`` (the stored backoffs are cleared first, as
    an operator who just fixed the server or the write key wants). Ends after ``timeout``
    seconds or when ``stop`` is set. ``progress(n)`` is called with the number sent after
    each batch (for a progress bar). ``result.left`` counts what is still pending of the
    messages it was asked to deliver. ``transport`` makes the transport (default:
    ``open_transport(config)``).

    A process that has no write key of its own (the CLI) builds ``config`` with
    ``Config.for_delivery(timeout=..., max_retries=...)``.
    """

    override = host is not None or write_key is not None
    target: QueueBackend = queue
    if override:
        # A new endpoint or credential: what the stored one earned does not hold it back,
        # and what it meets is kept off the stored destination (``_override``).
        target = OverrideQueue(queue, host=host, write_key=write_key)

    def make() -> Deliverer:
        one = open_transport(config) if transport is None else transport()
        if override:
            one = DestinationOverride(one, host=host, write_key=write_key)
        return make_deliverer(config, target, one)

    deadline = None if timeout is None else time.monotonic() + timeout
    # Clearing the backoffs is a write: behind a lock holder that is stuck (a process
    # stopped inside a write transaction) it too waits at most until the deadline.
    with queue.bounded(timeout):
        top = queue.max_id()
        if ignore_backoff or override:
            queue.clear_backoff(None, messages=True)
    return deliver_until(
        target,
        make,
        concurrency=concurrency,
        up_to_id=top,
        deadline=deadline,
        progress=progress,
        stop=stop,
    )


def lock_path(config: Config) -> Path:
    """What ``drain_lock`` locks for ``config``'s queue: the queue file, or for a PostgreSQL
    queue a file in the temporary directory named after it (so one host runs one exit
    drain of it at a time; other hosts' drains share the queue safely anyway)."""
    if config.queue_url is None:
        return config.queue_path
    import hashlib
    import tempfile

    digest = hashlib.sha256(config.queue_name.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"durable-analytics-{digest}"


@contextlib.contextmanager
def drain_lock(path: Path) -> Iterator[bool]:
    """An exclusive, non-blocking flock on ``<queue>.drain.lock``; yields False if taken.

    Held by detached exit drains (and ``drain --once-lock``) so that many processes exiting
    at once start one drain of their queue, not one each. Raises ``OSError`` when the lock
    file cannot be opened.
    """
    import fcntl

    lock_path = path.with_name(path.name + ".drain.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _result(
    queue: QueueBackend,
    total: DeliveryStats,
    started: float,
    up_to_id: int | None,
    destination: int | None,
) -> DrainResult:
    return DrainResult(
        sent=total.sent,
        dead_lettered=total.dead_lettered,
        left=queue.pending(up_to_id=up_to_id, destination=destination),
        elapsed=time.monotonic() - started,
        errors=tuple(dict.fromkeys(total.errors)),
        failure=total.failure,
    )
