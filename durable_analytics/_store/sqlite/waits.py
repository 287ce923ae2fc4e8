"""How this process's threads wait for a queue file: deadlines, lock order, busy pauses.

Three rules keep a caller's ``track()`` off the tail of everyone else's work:

- **Bounded** (``Waits.bounded``): while a flush, an exit or a drain with a deadline runs,
  no wait of the queue, in any thread, lasts past that deadline.
- **Appends first** (``Waits.writing``): the process's write lock is taken by the caller's
  appends and by the transactions of delivering threads (leases, acks, releases: up to
  ``max_in_flight`` of them at once). A lock hands itself to any waiter, so an append could
  queue behind many of them. Delivering transactions therefore take their turn one at a
  time, and never while an append is already waiting: an append waits for at most the
  transaction holding the lock and one more that reached the lock in the same instant
  (``WriteOrder.most_passed`` counts it). Delivering threads queue on their turn, in this
  process, instead of in SQLite's busy loop.
  Once a delivering transaction ends while an append waits, its thread gives up the GIL
  at once (``sleep(0)``) so that the append runs before that thread's next Python.
- **Fine-grained busy waits** (``busy_pause``): when another process holds SQLite's write
  lock, SQLite gives no notice when it is released, so the waiter retries. An append
  retries at most every ``PRODUCER_MAX_PAUSE`` for its first ``PRODUCER_FINE_FOR`` seconds
  (a lease or an ack of another process takes a millisecond or two), a delivering
  connection backs off further: the append does not sleep milliseconds past the release.

Everything here is safe in a signal handler that calls ``track()`` on a thread that was
inside a queue operation: an append touches only the reentrant write lock and a list
(whose appends and removals are atomic), never a plain lock the interrupted code may hold.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from durable_analytics._store.settle import settle_grace
from durable_analytics.exceptions import QueueBusy

from .nesting import enter, leave

__all__ = [
    "PRODUCER_FINE_FOR",
    "PRODUCER_MAX_PAUSE",
    "Waits",
    "WriteOrder",
    "busy_pause",
    "owned",
]

#: The least a wait for a lock may last under a deadline (see ``Waits.limit``).
GRACE = 0.05
#: The longest pause of a busy wait between retries of a delivering connection.
MAX_PAUSE = 0.005
#: The longest pause of an append's busy wait, for its first ``PRODUCER_FINE_FOR`` seconds.
PRODUCER_MAX_PAUSE = 0.0002
#: How long an append keeps retrying that often (beyond, it backs off like the others: the
#: holder is not a short transaction but a stuck or long one).
PRODUCER_FINE_FOR = 0.05
#: How often a delivering thread looks again while appends are waiting for the lock.
_YIELD_POLL = 0.0001


def owned(lock: threading.RLock) -> bool:
    """Whether this thread holds ``lock`` (a signal handler may run while it does)."""
    return bool(lock._is_owned())  # type: ignore[attr-defined]


def busy_pause(delay: float, waited: float, *, producer: bool) -> tuple[float, float]:
    """The next pause of a busy wait, and the delay after it (exponential backoff).

    ``delay`` is the current backoff, ``waited`` how long the wait has lasted so far. An
    append (``producer``) pauses at most ``PRODUCER_MAX_PAUSE`` during its first
    ``PRODUCER_FINE_FOR`` seconds.
    """
    cap = PRODUCER_MAX_PAUSE if producer and waited < PRODUCER_FINE_FOR else MAX_PAUSE
    pause = min(delay, cap)
    return pause, min(delay * 2, MAX_PAUSE)


class WriteOrder:
    """Who takes the process's write lock next: waiting appends before delivering threads.

    Appends register while they wait (``producer_waiting``); a delivering transaction
    first takes ``turn`` (one at a time), then lets every append already waiting go first,
    then takes the write lock. ``most_passed`` is the most delivering transactions that
    took the write lock while one append was waiting for it (diagnostics and tests).
    """

    def __init__(self) -> None:
        #: One token per append waiting for the write lock now (list ops are atomic).
        self.waiting: list[object] = []
        #: One delivering transaction at a time waits for (or holds) the write lock.
        self.turn = threading.RLock()
        #: Delivering transactions that took the write lock so far.
        self.entered = 0
        #: The most of them that took it while one append was waiting.
        self.most_passed = 0

    @contextlib.contextmanager
    def producer_waiting(self) -> Iterator[None]:
        """Mark an append as waiting for the write lock inside the block."""
        token = object()
        entered = self.entered
        try:
            # Inside the try: an exception raised here by a signal handler must not leave
            # a token behind, which would hold every delivering transaction back.
            self.waiting.append(token)
            yield
        finally:
            with contextlib.suppress(ValueError):
                self.waiting.remove(token)
            self.most_passed = max(self.most_passed, self.entered - entered)


class Waits:
    """The waits of one queue object's threads (see the module docstring)."""

    def __init__(self, path: Path, busy_timeout: float, parent: Waits | None = None) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        #: The waits of the queue this file belongs to (a spool's queue): a deadline set
        #: there bounds the waits here too, so a flush that moves a spool stays in time.
        self.parent = parent
        # Deadlines (monotonic) of the flush/exit/drain calls running now: while any is
        # active, no wait of this queue, in any thread, lasts past the earliest.
        self._deadlines: dict[int, float] = {}
        # Reentrant: a signal handler's call may read the deadlines while its thread does.
        self._deadlines_lock = threading.RLock()
        self.order = WriteOrder()

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's calls and waiting threads are not here."""
        self._deadlines = {}
        # Reentrant: a signal handler's call may read the deadlines while its thread does.
        self._deadlines_lock = threading.RLock()
        self.order = WriteOrder()

    @contextlib.contextmanager
    def bounded(self, seconds: float | None) -> Iterator[None]:
        """Inside the block, every wait of this queue (any thread) ends ``seconds`` from now.

        A wait for a lock another connection holds (SQLite's, or this process's own between
        threads) then raises ``QueueBusy`` instead of lasting ``busy_timeout``: a flush, an
        exit or a drain with a deadline is not held past it by a stuck lock holder (a process
        stopped inside a write transaction). ``None`` sets no bound.
        """
        if seconds is None:
            yield
            return
        key = id(object())
        with self._deadlines_lock:
            self._deadlines[key] = time.monotonic() + max(0.0, seconds)
        try:
            yield
        finally:
            with self._deadlines_lock:
                self._deadlines.pop(key, None)

    def limit(self, started: float) -> float:
        """When a wait begun at ``started`` must end: busy_timeout, or an earlier deadline.

        A wait may always last ``GRACE``: another thread's transaction takes a moment, and
        a flush or close with no time left must not make every call of every thread fail
        on the lock's ordinary hand-over; only a holder that is stuck is given up on.
        """
        limit = started + self.busy_timeout
        if self._deadlines:
            with self._deadlines_lock:
                if self._deadlines:
                    end = min(self._deadlines.values()) + settle_grace()
                    deadline = max(end, started + GRACE)
                    limit = min(limit, deadline)
        if self.parent is not None:
            limit = min(limit, self.parent.limit(started))
        return limit

    def within(self, seconds: float) -> float:
        """``seconds``, or less when a deadline set with ``bounded`` (here or in the parent)
        ends sooner (never under ``GRACE``): for a wait that ``busy_timeout`` does not bound
        (another process's recovery of the file)."""
        now = time.monotonic()
        end = now + seconds
        waits: Waits | None = self
        while waits is not None:
            if waits._deadlines:
                with waits._deadlines_lock:
                    if waits._deadlines:
                        end = min(end, max(min(waits._deadlines.values()), now + GRACE))
            waits = waits.parent
        return end - now

    def remaining(self) -> float:
        """How long a wait begun now may last (for SQLite's own busy handler)."""
        now = time.monotonic()
        return max(0.0, self.limit(now) - now)

    def _busy(self) -> QueueBusy:
        return QueueBusy(
            f"the queue {self.path} stayed busy: another thread of this process "
            "is waiting for a lock held by another connection"
        )

    def _acquire(self, lock: threading.RLock, started: float) -> None:
        """Wait for ``lock``, which this thread does not hold, or raise ``QueueBusy``.

        A signal handler may run the moment the lock is taken (before this returns) and
        raise: the lock is then released, since the caller never saw it taken.
        """
        held_before = owned(lock)  # never, by the callers; then it is not ours to release
        mark = enter()
        try:
            try:
                if mark.before is not None:
                    # A handler's wait inside its thread's own (``nesting.py``): one call.
                    timeout = max(0.0, self.limit(started) - time.monotonic())
                    if not lock.acquire(timeout=timeout):
                        raise self._busy()
                    return
                # Re-read the limit now and then: a deadline may be set meanwhile.
                while not lock.acquire(
                    timeout=min(0.1, max(0.0, self.limit(started) - time.monotonic()))
                ):
                    if time.monotonic() >= self.limit(started):
                        raise self._busy()
            finally:
                leave(mark)
        except BaseException:
            if not held_before and owned(lock):
                lock.release()
            raise

    @contextlib.contextmanager
    def locked(self, lock: threading.RLock) -> Iterator[None]:
        """Hold this process's ``lock``, waiting at most as long as any wait may last."""
        if not lock.acquire(blocking=False):
            self._acquire(lock, time.monotonic())
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def writing(self, write_lock: threading.RLock, *, producer: bool) -> Iterator[None]:
        """Hold the process's ``write_lock``, appends (``producer``) before deliveries.

        A delivering transaction waits for its ``turn``, then for the appends that are
        waiting already, then for the lock; it keeps its turn until the lock is released,
        so at most one delivering transaction is ever ahead of an append in the lock's
        queue. Nested holds (a signal handler on a thread that holds the lock) just enter.
        """
        if owned(write_lock):
            with self.locked(write_lock):
                yield
            return
        order = self.order
        if producer:
            if not write_lock.acquire(blocking=False):
                with order.producer_waiting():
                    self._acquire(write_lock, time.monotonic())
            try:
                yield
            finally:
                write_lock.release()
            return
        with self.locked(order.turn):
            started = time.monotonic()
            while order.waiting:
                if time.monotonic() >= self.limit(started):
                    raise self._busy()
                time.sleep(_YIELD_POLL)
            if not write_lock.acquire(blocking=False):
                self._acquire(write_lock, started)
            order.entered += 1
            try:
                yield
            finally:
                write_lock.release()
                if order.waiting:
                    # Hand the GIL over too: released, the lock wakes the append's thread,
                    # but this thread would go on with its Python (the answer to parse,
                    # the next request to build) until it blocked, and the append waited
                    # for that as well (flusher thread, tight loop: p99 0.45 -> 0.35 ms).
                    time.sleep(0)
