"""What lets many batches be in flight at once: the congestion window and the lease keeper.

``Window`` is one destination's in-flight window in this process (AIMD: halve on 429/5xx,
+1 per success, capped by ``max_in_flight``) together with its Retry-After gate. Every
delivery path of the process (the flusher thread, ``flush()``, exit, ``drain``, ``worker``)
takes its slot from the same ``window_for(host, write_key)``, so together they never have
more requests outstanding to one destination than the window allows.

``keep_leased`` extends the lease of a batch for as long as its request is in flight, from
one daemon thread per process, so a request slower than ``lease_timeout`` never lets
another holder take (and send again) the same batch.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ._store import Lease, QueueBackend
from .exceptions import QueueError

__all__ = [
    "EXIT_REFUSES_THREADS",
    "Ticket",
    "Window",
    "keep_leased",
    "keep_leased_from_now",
    "prestart_helpers",
    "run_beside",
    "still_held",
    "stop_keeping",
    "window_for",
    "windows",
]

log = logging.getLogger("durable_analytics.delivery")

# Below this round trip a request costs about as much CPU here as it waits on the network,
# so more requests in flight would only contend for the GIL and the queue: measured on
# loopback, where one request in flight delivers fastest.
PIPELINE_MIN_RTT = 0.002
# A Retry-After gate longer than this is not waited out while holding a lease: the batch
# goes back to the queue, whose stored backoff keeps every holder away until then.
MAX_GATE_WAIT = 0.5
# CPython 3.12.0-3.12.2 refuse to start a thread anywhere in interpreter exit (3.12.3
# allows it until the non-daemon threads are gone, as 3.13 does): there the exit handler can
# only pipeline on helper threads started before, so a pass that meets a backlog starts them.
EXIT_REFUSES_THREADS = (3, 12, 0) <= sys.version_info[:3] < (3, 12, 3)
# What one request costs this process besides its round trip (lease, body, POST, ack; ~0.7
# ms of CPU measured on loopback, more on a loaded machine): more requests in flight than a
# round trip holds of these only queue up behind each other for the GIL and the write lock.
REQUEST_COST = 0.0015
# How many recent round trips ``Window.latency_bound`` takes the minimum of.
RTT_SAMPLES = 8
# Round trips (after the first) seen before the window judges the destination at all: one,
# so a 50 ms destination starts pipelining after its second request. A slow one on a fast
# destination (a GIL wait) is corrected by the next fast one: the helpers stop.
RTT_MIN_SAMPLES = 1


@dataclass(frozen=True)
class Ticket:
    """One request slot of a window, taken by ``Window.acquire``."""

    #: The window's decrease epoch when the slot was taken: a congestion signal from a
    #: request sent before the last decrease does not shrink the window again.
    epoch: int


class Window:
    """One destination's in-flight window: at most ``limit`` requests outstanding.

    ``limit`` starts at ``max_in_flight``, halves (once per round trip) when the server
    answers 429 or 5xx, and grows back by one per success, never above ``max_in_flight``.
    ``hold_until`` closes the gate for a Retry-After: no request of this process leaves
    for the destination before then. ``history`` keeps ``(monotonic time, limit)`` at
    every change, for tracing.
    """

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max(1, max_in_flight)
        self.limit = float(self.max_in_flight)
        self.in_flight = 0
        #: The most requests this window ever had outstanding at once.
        self.peak = 0
        #: Helper threads that passes of this process started for this destination and
        #: that still run (``reserve_helpers``).
        self.helpers = 0
        self.epoch = 0
        self.gate = 0.0  # monotonic time before which nothing is sent
        #: Smoothed round trip of a request to the destination (None before the first).
        self.rtt: float | None = None
        # The last few round trips: their minimum is the destination's own latency. A
        # single round trip also counts the time its thread waited for the GIL (5 ms
        # switch interval) behind the caller's thread, which on loopback made a fast
        # server look slow enough to pipeline, and pipelining then made it slower.
        self._recent: collections.deque[float] = collections.deque(maxlen=RTT_SAMPLES)
        #: Round trips observed so far.
        self.observed = 0
        self.history: collections.deque[tuple[float, int]] = collections.deque(maxlen=100_000)
        self.history.append((time.monotonic(), int(self.limit)))
        self._cond = threading.Condition()

    def __repr__(self) -> str:
        return (
            f"Window(limit={int(self.limit)}, in_flight={self.in_flight}, max={self.max_in_flight})"
        )

    def raise_cap(self, max_in_flight: int) -> None:
        """Let the window grow to ``max_in_flight`` (the largest any user asked for)."""
        with self._cond:
            self.max_in_flight = max(self.max_in_flight, max_in_flight)

    def _set(self, limit: float) -> None:
        old = int(self.limit)
        self.limit = limit
        if int(limit) != old:
            self.history.append((time.monotonic(), int(limit)))
        self._cond.notify_all()

    def acquire(
        self,
        cap: int | None = None,
        *,
        deadline: float | None = None,
        stop: threading.Event | None = None,
    ) -> Ticket | None:
        """Take a slot, waiting while the window is full; None if ``deadline`` passes first.

        ``cap`` is the caller's own ``max_in_flight``: it never has more outstanding than
        that, nor than the shared ``limit``.
        """
        with self._cond:
            while self._full(cap):
                if stop is not None and stop.is_set():
                    return None
                wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait <= 0:
                    return None
                self._cond.wait(wait)
            return self._take()

    def try_acquire(self, cap: int | None = None) -> Ticket | None:
        """Take a slot if one is free now (as ``acquire`` would), else None at once."""
        with self._cond:
            return None if self._full(cap) else self._take()

    def _full(self, cap: int | None) -> bool:
        return self.in_flight >= max(1, min(int(self.limit), cap or self.max_in_flight))

    def _take(self) -> Ticket:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        return Ticket(self.epoch)

    def release(self) -> None:
        """Give a slot back."""
        with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    def reserve_helpers(self, want: int) -> int:
        """Count up to ``want`` more helper threads for this destination; how many may start.

        Every pass of the process (the flusher thread's, ``flush()``'s, a drain's) starts
        its helpers through here, so together they run at most ``max_in_flight - 1``
        beside their own threads. Each pass started its own before: two passes at once
        ran twice the window's threads, half of them holding a leased batch while they
        waited for a slot, every release woke them all, and the leases they held made
        every other lease read twice as many records.
        """
        with self._cond:
            granted = max(0, min(want, self.max_in_flight - 1 - self.helpers))
            self.helpers += granted
            return granted

    def helpers_done(self, count: int = 1) -> None:
        """``count`` helper threads counted by ``reserve_helpers`` have ended."""
        with self._cond:
            self.helpers = max(0, self.helpers - count)

    def observe(self, seconds: float) -> None:
        """Record one request's round trip (a moving average of the last few)."""
        with self._cond:
            self.rtt = seconds if self.rtt is None else self.rtt * 0.8 + seconds * 0.2
            self.observed += 1
            if self.observed > 1:
                # The first request pays once for the pool, the connection and the proxy
                # lookup: not the destination's latency.
                self._recent.append(seconds)

    @property
    def min_rtt(self) -> float | None:
        """The shortest of the last few round trips, the first request left out (else None)."""
        with self._cond:
            return min(self._recent) if self._recent else None

    @property
    def latency_bound(self) -> bool:
        """True when requests wait on the network long enough for pipelining to pay.

        Judged by the shortest recent round trip, never by one slow one: waiting for the
        GIL or the CPU only ever adds to a round trip, the network's share is the floor.
        """
        with self._cond:
            if len(self._recent) < RTT_MIN_SAMPLES:
                return False
            return min(self._recent) >= PIPELINE_MIN_RTT

    def depth(self) -> int:
        """How many requests in flight keep this process busy: a round trip's worth of
        ``REQUEST_COST`` (Little's law), at least 2 (1 before a round trip was seen)."""
        with self._cond:
            if not self._recent:
                return 1
            return max(2, math.ceil(min(self._recent) / REQUEST_COST))

    def on_success(self) -> None:
        """Additive increase: one more slot, up to ``max_in_flight``."""
        with self._cond:
            if self.limit < self.max_in_flight:
                self._set(min(float(self.max_in_flight), self.limit + 1))

    def on_congestion(self, ticket: Ticket) -> None:
        """Multiplicative decrease: halve, once for all the requests of one round trip."""
        with self._cond:
            if ticket.epoch != self.epoch:
                return  # sent before the last decrease: that decrease already counted it
            self.epoch += 1
            self._set(max(1.0, self.limit / 2))

    def hold_until(self, until_monotonic: float) -> None:
        """Send nothing to this destination before ``until_monotonic`` (a Retry-After)."""
        with self._cond:
            self.gate = max(self.gate, until_monotonic)

    def gate_wait(self) -> float:
        """Seconds until the Retry-After gate opens (0 when open)."""
        with self._cond:
            return max(0.0, self.gate - time.monotonic())


class _Windows:
    """The windows of this process, by destination."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lock = threading.Lock()
        self.by_key: dict[tuple[str, str], Window] = {}


_registry = _Windows()


def window_for(host: str, write_key: str, max_in_flight: int) -> Window:
    """This process's window for the destination ``(host, write_key)``, created on first use.

    The window may grow to the largest ``max_in_flight`` any caller asked for; each caller
    passes its own to ``acquire`` and never exceeds it.
    """
    key = (host, write_key)
    with _registry.lock:
        window = _registry.by_key.get(key)
        if window is None:
            window = _registry.by_key[key] = Window(max_in_flight)
            return window
    window.raise_cap(max_in_flight)
    return window


def windows() -> dict[str, Window]:
    """Every window of this process by host (for tracing and tests)."""
    with _registry.lock:
        return {host: w for (host, _), w in _registry.by_key.items()}


class _Keeper:
    """Extends the leases of batches in flight, from one daemon thread per process."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._cond = threading.Condition()
        # token -> (queue, lease, last extended at, monotonic)
        self._held: dict[str, tuple[QueueBackend, Lease, float]] = {}
        self._thread: threading.Thread | None = None
        self._wake_at = 0.0  # when the keeper thread looks next (monotonic)

    def add(self, queue: QueueBackend, lease: Lease) -> None:
        with self._cond:
            now = time.monotonic()
            held = self._held.get(lease.token)
            # Extended a third of the lease after it was last set: when the lease was taken
            # for one not kept yet (``lease_taken_at``; it may have waited, leased ahead of
            # a batch still being sent), not when the keeping starts.
            at = held[2] if held is not None else min(now, lease_taken_at(queue, lease))
            self._held[lease.token] = (queue, lease, at)
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(
                    target=self._run, name="durable-analytics-lease-keeper", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:
                    # Python 3.12 refuses new threads at interpreter exit. The lease then
                    # lives its lease_timeout, which is never shorter than a request.
                    return
                self._thread = thread
            elif at + max(0.01, queue.lease_timeout / 3) < self._wake_at:
                # Woken only when this lease is due before the keeper looks again: a wake-up
                # per request would cost the delivering threads a GIL switch each.
                self._cond.notify_all()

    def remove(self, lease: Lease) -> None:
        with self._cond:
            self._held.pop(lease.token, None)

    def _due(self, now: float) -> tuple[list[tuple[QueueBackend, Lease]], float]:
        due = []
        wait = 1.0
        for queue, lease, at in self._held.values():
            # A third of the lease: two extensions may fail (a busy database) before it ends.
            every = max(0.01, queue.lease_timeout / 3)
            if now - at >= every:
                due.append((queue, lease))
            else:
                wait = min(wait, at + every - now)
        return due, wait

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due, wait = self._due(now)
                if not due:
                    self._wake_at = now + wait
                    self._cond.wait(wait)
                    continue
            for queue, lease in due:
                try:
                    kept = queue.extend(lease)
                except QueueError:
                    log.warning("could not extend a lease in flight; retrying", exc_info=True)
                    continue
                with self._cond:
                    if lease.token in self._held:
                        self._held[lease.token] = (queue, lease, time.monotonic())
                        if not kept:
                            # Settled meanwhile, or lost (this process was stopped longer
                            # than the lease): nothing more to extend.
                            del self._held[lease.token]


_keeper = _Keeper()


@contextlib.contextmanager
def keep_leased(queue: QueueBackend, lease: Lease) -> Iterator[None]:
    """Extend ``lease`` every third of ``lease_timeout`` until the block ends."""
    _keeper.add(queue, lease)
    try:
        yield
    finally:
        _keeper.remove(lease)


def lease_taken_at(queue: QueueBackend, lease: Lease) -> float:
    """When ``lease`` was taken (monotonic): its first expiry less ``lease_timeout``."""
    return lease.expires_monotonic - queue.lease_timeout


def still_held(queue: QueueBackend, lease: Lease) -> bool:
    """Whether ``lease`` is still this holder's, right before its batch is sent.

    A lease taken a while ago and not kept meanwhile (leased ahead of a batch whose quick
    retries ran long, or waiting for a slot of a full window) may have expired and had its
    messages leased again, by another holder or by this pass's next lease: sending it then
    is a duplicate without a fault. Past a third of ``lease_timeout`` (when the keeper
    would have extended it) the queue is asked, with ``extend(whole=True)`` (fenced by the
    token): it renews the lease if all of it is still this holder's; if not, what is left
    of it is handed back and False answered. A younger lease is sent as it is: the keeper
    extends it before it can expire.
    """
    age = time.monotonic() - lease_taken_at(queue, lease)
    if age < queue.lease_timeout / 3:
        return True
    if queue.extend(lease, whole=True):
        return True
    # Partly another holder's (PostgreSQL leases messages one by one): what is still ours
    # goes back now rather than at its expiry (fenced: nothing else is touched).
    queue.release(lease, None, count_attempt=False)
    return False


def keep_leased_from_now(queue: QueueBackend, lease: Lease) -> None:
    """Extend ``lease`` as ``keep_leased`` does until ``stop_keeping`` (or the end of a
    ``keep_leased`` block for it): a batch sent ahead, settled later by another call."""
    _keeper.add(queue, lease)


def stop_keeping(lease: Lease) -> None:
    """Stop extending ``lease`` (``keep_leased_from_now``)."""
    _keeper.remove(lease)


class _Helpers:
    """Daemon threads that run delivery loops beside the caller, kept for reuse.

    Kept rather than started per ``flush()``: Python 3.12.0-3.12.2 refuse to start a thread
    at interpreter exit, so there the exit handler can only pipeline on threads that already
    exist (``prestart``).
    A thread idle for ``_IDLE_EXIT`` seconds ends.
    """

    _IDLE_EXIT = 300.0

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._cond = threading.Condition()
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._idle = 0

    def run(self, job: Callable[[], None]) -> bool:
        """Run ``job`` on a helper thread; False if no thread is free and none can start."""
        with self._cond:
            if self._idle > len(self._jobs):
                self._jobs.append(job)
                self._cond.notify()
                return True
        thread = threading.Thread(
            target=self._loop, args=(job,), name="durable-analytics-delivery", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:
            return False  # at interpreter exit (Python 3.12)
        return True

    def prestart(self, count: int) -> int:
        """Start idle threads until ``count`` are idle; returns how many were started.

        Run while threads can still start, so that an exit handler on a Python that
        forbids it (``EXIT_REFUSES_THREADS``) can still pipeline.
        A thread counts as idle from before it starts, so a job handed to ``run`` meanwhile
        goes to it rather than to a new thread the exit may not be allowed to start.
        """
        started = 0
        while True:
            with self._cond:
                if self._idle - len(self._jobs) >= count:
                    return started
                self._idle += 1
            thread = threading.Thread(
                target=self._loop, args=(None,), name="durable-analytics-delivery", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:
                with self._cond:
                    self._idle -= 1
                return started  # already finalizing
            started += 1

    def _loop(self, job: Callable[[], None] | None) -> None:
        counted = job is None  # a prestarted thread was counted idle by ``prestart``
        while True:
            if job is not None:
                job()
            with self._cond:
                if not counted:
                    self._idle += 1
                counted = False
                try:
                    if not self._cond.wait_for(lambda: self._jobs, timeout=self._IDLE_EXIT):
                        return
                    job = self._jobs.popleft()
                finally:
                    self._idle -= 1


_helpers = _Helpers()


def run_beside(job: Callable[[], None]) -> bool:
    """Run ``job`` (which must not raise) on a kept helper thread; False if none can run it."""
    return _helpers.run(job)


def prestart_helpers(count: int) -> int:
    """Make sure ``count`` helper threads wait idle for ``run_beside``; returns how many started."""
    return _helpers.prestart(count)


def _after_fork_in_child() -> None:
    # The parent's threads, windows and leases are not this process's.
    _registry.reset()
    _keeper.reset()
    _helpers.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
