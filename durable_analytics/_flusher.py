"""The background delivery thread: ``Flusher`` runs a ``Deliverer`` when batches are due.

It wakes when its own process appends and polls cheaply for messages other processes
appended. Nothing here raises into the caller: failures become backoff, dead letters,
``on_error`` calls and log lines (see ``_delivery``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from ._delivery import Deliverer, DeliveryStats
from ._pass import deliver_pass

__all__ = ["BURST_AGE", "POLL_INTERVAL", "SLICE", "Flusher", "burst_age_for"]

log = logging.getLogger("durable_analytics.delivery")

#: How often a flusher looks for messages that other processes appended.
POLL_INTERVAL = 0.5
#: The CPU time (seconds) one delivery pass of the flusher thread takes at most while the
#: caller keeps appending (see ``Flusher.burst_age``), before it waits to keep its ``share``.
SLICE = 0.01
#: The longest a burst waits on disk while the caller keeps appending (``burst_age_for``).
BURST_AGE = 1.0
#: Below this ``max_queue_bytes`` the flusher never lets a burst wait: one second of appends
#: at full speed is about 10 MB (30,000 calls a second of 350 bytes).
BURST_MIN_QUEUE_BYTES = 64 * 1024 * 1024
# A Flusher that needs no wake-up from appends (it is delivering, or backing off).
_NEVER = 1 << 62


def burst_age_for(flush_interval: float, max_queue_bytes: int, max_queue_size: int | None) -> float:
    """The ``burst_age`` of a Client's flusher thread: how old the oldest ready message may
    be while the thread yields to a caller that keeps appending.

    ``BURST_AGE``, or half of ``flush_interval`` if that is shorter (so that the interval
    still holds); 0 (never yield) under a count cap or a byte cap below
    ``BURST_MIN_QUEUE_BYTES``, where a burst left on disk could make the cap drop messages
    that a flusher keeping up would have sent.
    """
    if max_queue_size is not None or max_queue_bytes < BURST_MIN_QUEUE_BYTES:
        return 0.0
    return min(BURST_AGE, flush_interval / 2)


class Flusher:
    """The background delivery thread of one process (``flusher="thread"``).

    Sends as soon as ``flush_at`` messages are ready, and no later than ``flush_interval``
    after the oldest ready message was stored, while the server is healthy. A backlog goes
    out through the pipeline (``deliver_pass``): up to ``max_in_flight`` full batches in
    flight at once, each under its own lease. ``clock`` (wall
    time in seconds, ``time.time`` by default) is what the ``flush_interval`` rule reads; a
    test can pass its own.

    While the caller keeps appending, the thread takes at most ``share`` of the CPU (it
    shares the caller's GIL) and the queue absorbs the burst; the backlog goes out at full
    speed once the caller pauses. A caller appending without pause always leaves full
    batches, so a pass also ends after ``cpu_slice`` seconds of this thread's CPU, as long as the
    oldest ready message is younger than ``burst_age`` (0: never): an older one means the
    backlog is growing, and the pass then runs until it is sent, whatever the caller does.
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
        burst_age: float = 0.0,
        cpu_slice: float = SLICE,
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
        #: A pass yields to the caller only while the oldest ready message is younger.
        self.burst_age = burst_age
        self.cpu_slice = cpu_slice
        self._clock = clock
        # Appends seen at the last look, and how many more make a full batch: the caller
        # wakes the thread once that many arrive, not only on the next poll.
        self._seen_appends = 0
        self._need = _NEVER
        # Appends seen at the last ``solo`` ask of a pass, or at the end of the last pass.
        self._asked = 0
        # The destinations (None: all) that callers of this process deliver in their own
        # thread now, one entry per caller (``stepping_aside``).
        self._aside: list[int | None] = []
        self._aside_lock = threading.Lock()
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

    @contextlib.contextmanager
    def stepping_aside(self, destination: int | None = None) -> Iterator[None]:
        """While the block runs, the thread delivers nothing: its pass ends after its
        batches in flight and it starts none until the block ends.

        For ``flush()``, which delivers in the caller's thread: two passes of one process
        at once only take turns at the GIL (measured on loopback, a flush took half as much
        CPU again beside the thread's pass), and the caller's pass sends all it waits for.
        ``destination``: the caller delivers that destination only; while the queue holds
        messages of others, the thread delivers as usual (it would otherwise leave them
        waiting for as long as the caller's delivery takes).
        """
        with self._aside_lock:
            self._aside.append(destination)
        try:
            yield
        finally:
            with self._aside_lock:
                self._aside.remove(destination)
            self.notify()

    def _stands_aside(self) -> bool:
        """Whether a caller delivers (``stepping_aside``) all that the queue holds."""
        with self._aside_lock:
            aside = set(self._aside)
        if not aside:
            return False
        ours = {dest for dest in aside if dest is not None}
        if len(ours) < len(aside):
            return True  # a caller delivers every destination
        # A look per destination: counting them (``pending``) took 0.3-0.4 s per cycle on a
        # queue of 1,000,000 messages, for as long as the caller's flush ran.
        return not self.queue.holds_others(ours)

    def wait_delivered(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the batch in flight (if any) to be finished."""
        return self._idle_event.wait(timeout)

    def _deliver_next(self, may_yield: bool = False) -> DeliveryStats | None:
        """Deliver what is ready, pipelined, while the batches are full; None if none was.

        ``may_yield``: the pass ends early once ``yields`` says so (see the class docstring).
        """
        self._idle_event.clear()
        appends = self.appends
        started = time.thread_time()

        aside: list[bool] = []  # asked once a caller steps aside during this pass

        def pause() -> bool:
            if self._aside and not aside:
                aside.append(self._stands_aside())
            return (bool(aside) and aside[0]) or (may_yield and self.yields(appends, started))

        def solo() -> bool:
            # The caller appended since the last ask (about a batch ago): it is still in
            # its burst. Helpers would take its GIL on top of this thread's share (the
            # share counts this thread's CPU only); they start once it pauses. The first
            # ask of a pass counts from the last ask or pass before, not from this pass's
            # start a fraction of a millisecond ago: that instant between two calls of a
            # caller calling once a millisecond looked like a pause.
            now_seen = self.appends
            busy = now_seen != self._asked
            self._asked = now_seen
            return busy

        try:
            stats = deliver_pass(
                self.queue,
                self.deliverer,
                stop=self._stop,
                full_only=True,
                pause=pause,
                solo=solo if may_yield else None,
            )
        finally:
            self._asked = self.appends
            self._idle_event.set()
        if not (stats.requests or stats.kept or stats.sent or stats.dead_lettered):
            return None
        return stats

    def yields(self, appends: int, started: float) -> bool:
        """Whether a pass that began at ``appends`` appends and ``started`` (this thread's
        CPU time) ends now: the caller appended meanwhile, and the pass used its slice."""
        return (
            self.share < 1.0
            and self.appends != appends
            and time.thread_time() - started >= self.cpu_slice
        )

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
        if self._aside and self._stands_aside():
            return self.poll_interval  # a caller delivers (``stepping_aside``): woken after
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
        stats = self._deliver_next(may_yield=now - oldest < self.burst_age)
        if stats is None:
            return 0.05
        self.delivered.add(stats)
        return 0.0
