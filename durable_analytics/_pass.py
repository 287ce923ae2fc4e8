"""The delivery pass: lease and deliver, many batches in flight, until nothing is ready.

``deliver_pass`` is the pipeline every delivery path runs (the flusher thread, ``flush()``
and exit through ``_drain.deliver_until``, the flusher process, ``worker``, ``drain``): its
own thread sends the next batch before it reads the answer to the one before (two requests
in flight, ``send_ahead``), and against a slow destination it starts helper
threads, within the destination's window (``_pipeline``). docs/ARCHITECTURE.md, section 6.1.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable

from ._delivery import Ahead, Deliverer, DeliveryStats, Follow
from ._pipeline import (
    EXIT_REFUSES_THREADS,
    Window,
    keep_leased_from_now,
    prestart_helpers,
    run_beside,
    still_held,
    stop_keeping,
)
from ._store import Lease, QueueBackend
from ._transport.base import Started
from .exceptions import QueueError

__all__ = ["Progress", "deliver_pass", "drop_ahead", "passed", "send_ahead"]

#: Called with the number of messages each delivered batch sent.
Progress = Callable[[int], object]

#: A batch is sent ahead only with at least this long left before the caller's deadline.
_AHEAD_MIN_TIME = 0.05

# How often a pass looks again for room to start more helpers (see ``deliver_pass``): that
# look asks a PostgreSQL queue for its stored window, a round trip not worth every batch.
_TOP_UP_EVERY = 0.05


def passed(deadline: float | None) -> bool:
    """Whether the monotonic ``deadline`` (None: none) has passed."""
    return deadline is not None and time.monotonic() >= deadline


def deliver_pass(
    queue: QueueBackend,
    deliverer: Deliverer,
    *,
    workers: int | None = None,
    deadline: float | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    up_to_id: int | None = None,
    destination: int | None = None,
    full_only: bool = False,
    pause: Callable[[], bool] | None = None,
    solo: Callable[[], bool] | None = None,
) -> DeliveryStats:
    """Lease and deliver, many batches in flight, until nothing is ready; the pipeline.

    Starts in the calling thread; once a full batch shows there is a backlog and the
    destination's round trip is long enough for it to pay (``Window.latency_bound``), up
    to ``workers`` (default: the Deliverer's ``max_in_flight``) threads lease and deliver
    side by side, each request under its own lease and within the destination's
    in-flight window (``_pipeline``), on the Deliverer's pool of keep-alive connections.
    ``full_only`` (the background flusher) stops a thread after a batch that was not full,
    so a trickle of appends is not sent one message at a time. ``pause``, asked before each
    batch of the calling thread, makes that batch the pass's last when it says so (the
    background flusher yielding the CPU to a caller that keeps appending; what is left stays
    ready). ``solo``, asked before each batch of the calling thread, keeps the pass to that
    thread while it says True (the background flusher while its caller keeps appending): no
    helper starts, and helpers started while it said False end after their batch in flight.
    The pass ends with the calling thread's loop: its helpers then end after their batch
    in flight (still sending one their ack had just leased, unless the pass was paused,
    stopped, interrupted or past its deadline). Ends at ``deadline`` or when ``stop`` is
    set, after the batches in flight are settled.
    """
    return _Pass(
        queue,
        deliverer,
        workers=workers,
        deadline=deadline,
        progress=progress,
        stop=stop,
        up_to_id=up_to_id,
        destination=destination,
        full_only=full_only,
        pause=pause,
        solo=solo,
    ).go()


class _Pass:
    """One ``deliver_pass``: its calling thread's loop, its helpers and what they share."""

    def __init__(
        self,
        queue: QueueBackend,
        deliverer: Deliverer,
        *,
        workers: int | None,
        deadline: float | None,
        progress: Progress | None,
        stop: threading.Event | None,
        up_to_id: int | None,
        destination: int | None,
        full_only: bool,
        pause: Callable[[], bool] | None,
        solo: Callable[[], bool] | None,
    ) -> None:
        self.queue = queue
        self.deliverer = deliverer
        self.deadline = deadline
        self.progress = progress
        self.stop = stop
        self.destination = destination
        self.up_to_id = up_to_id
        self.full_only = full_only
        self.pause = pause
        self.solo = solo
        # More threads than the window has slots would only hold leases while they wait.
        self.count = max(1, min(deliverer.max_in_flight, workers or deliverer.max_in_flight))
        self.total = DeliveryStats()
        self.lock = threading.Lock()
        self.running = 0  # this pass's helper threads still running
        self.looked = -math.inf  # monotonic time of the last look for room for more helpers
        self.finished = threading.Condition(self.lock)
        self.failures: list[BaseException] = []
        self.asked = (destination, up_to_id, deliverer.lease_batches)
        self.paused = False
        self.alone = False  # ``solo`` said True at the calling thread's last batch: helpers end
        self.ended = False  # the calling thread's loop ended (nothing more for it): helpers end

    def go(self) -> DeliveryStats:
        """Run the pass in the calling thread and wait for its helpers (``deliver_pass``)."""
        try:
            self.run(True)
        except BaseException:
            # The caller is leaving (Ctrl-C, a signal handler's exit, an error of its own): the
            # helpers end after the batch they have in flight instead of sending the whole
            # backlog first, and what they did not send stays in the queue.
            self.paused = True
            raise
        finally:
            # The pass ends with its own thread's loop: the helpers end after their batch in
            # flight. Left to go on, they never ended while a caller kept appending (every
            # batch full), and the background flusher waited for them: no new look at its
            # backlog, no helpers started again, delivery stuck at the few that ran. One
            # already holds for its next batch, it still sends (``winding_down``).
            self.ended = True
            with self.finished:
                self.finished.wait_for(lambda: self.running == 0)
        if self.failures:
            raise self.failures[0]
        return self.total

    def winding_down(self) -> bool:
        """The pass's own thread ended its loop normally (not paused, stopped, past its
        deadline nor interrupted): a helper still sends the batch it holds."""
        return (
            self.ended
            and not self.paused
            and not (self.stop is not None and self.stop.is_set())
            and (not passed(self.deadline))
        )

    def done(self) -> bool:
        """Whether the pass is over for new batches: paused, ended, stopped or past its
        deadline."""
        return (
            self.paused
            or self.ended
            or (self.stop is not None and self.stop.is_set())
            or passed(self.deadline)
        )

    def spawn(self, lease: Lease, busy: bool) -> None:
        """Start helpers up to what the window has room for (asked before each batch of
        the calling thread: helpers that another pass ran and ended leave room)."""
        if (
            self.count == 1
            or self.running >= self.count - 1
            or len(lease) < self.deliverer.batch_messages
        ):
            return
        window = self.deliverer.window(lease)
        if window.helpers >= window.max_in_flight - 1:
            return  # other passes' helpers fill the window (read without its lock: a hint)
        if not window.latency_bound:
            if EXIT_REFUSES_THREADS:
                # A backlog now may be an exit later, which could start no thread.
                prestart_helpers(self.count - 1)
            return  # a fast server, or none measured yet: one at a time is quickest
        now = time.monotonic()
        if now - self.looked < _TOP_UP_EVERY:
            return
        if busy:
            return  # the caller keeps appending (``solo``): helpers would take its GIL
        self.looked = now
        # As many threads as the round trip needs, not always ``count``: a loaded machine
        # makes loopback look slow enough to pipeline, and 32 threads then fought over the
        # GIL and the write lock for a 2 ms round trip (the window still caps them all).
        # Nor more than the queue's stored window has slots, nor than the window leaves
        # beside the helpers other passes of this process run.
        want = _helpers_for(self.queue, lease, min(self.count, window.depth())) - self.running
        granted = window.reserve_helpers(want)
        # Of those, the helpers that run or will run: each counts itself out when it ends,
        # the window gets the others back here. Also when ``run_beside`` raises: Ctrl-C
        # (or a signal handler's ``sys.exit``) reaches this thread while ``Thread.start``
        # waits for the new thread, which then runs anyway; counts left behind there kept
        # every later pass of the process from starting helpers (the window looked full).
        handed = 0
        try:
            while handed < granted:
                claim = [False]  # taken by the helper when it starts, or by this thread
                with self.lock:
                    self.running += 1
                started = False
                try:
                    started = run_beside(functools.partial(self.guarded, window, claim))
                finally:
                    with self.lock:
                        if started or claim[0]:
                            handed += 1
                        else:
                            claim[0] = True  # not started, or taken back before it ran
                            self.running -= 1
                if not started:
                    return  # no thread can start (interpreter exit): go on with those we have
        finally:
            if handed < granted:
                window.helpers_done(granted - handed)

    def run(self, first: bool) -> None:
        """One thread's loop: lease, send, settle, until nothing is ready or ``done``
        (``first``: the calling thread's, which starts helpers and sends ahead)."""
        full = self.deliverer.batch_messages * self.deliverer.lease_batches
        lease = None if self.done() or (not first and self.alone) else self.lease_next()
        final = False  # this batch is the thread's last: none is leased to follow it
        # The calling thread keeps a second request in flight while no helper runs: it
        # sends the batch after ``lease`` before it reads ``lease``'s answer, so the server
        # works on one batch while this thread settles the other (on loopback, where
        # helper threads only fought over the GIL, that halved a flush). ``sent`` is
        # ``lease`` on the wire; ``then`` the batch after it, on the wire as ``then_sent``.
        sent: Ahead | None = None
        then: Lease | None = None
        then_sent: Ahead | None = None
        quick = True  # False: the batch sent before ``lease`` failed; no quick retries
        # Whatever interrupts this loop (Ctrl-C, a signal handler's exit, an error), no
        # lease it holds is left to expire: ``mine`` says ``lease`` is still this loop's
        # (not yet handed to ``deliver``), and ``follow.lease`` is until it becomes
        # ``lease`` or ``then``.
        mine = lease is not None
        follow: Follow | None = None
        ahead: Ahead | None = None  # ``sent`` on its way into ``deliver``
        try:
            while lease is not None:
                if first:
                    # Asked before every batch of this thread, whether or not helpers
                    # could start: helpers started while the caller paused stop once it
                    # appends again (their CPU is not in the flusher's share, which
                    # counts this thread's only), not when this thread's slice runs out.
                    busy = self.solo is not None and self.solo()
                    self.alone = busy
                    self.spawn(lease, busy)
                # The background flusher yielding to its caller: this batch is the pass's
                # last (none is leased to follow it), and the helpers stop after theirs.
                last = first and self.pause is not None and self.pause()
                if last:
                    self.paused = True
                # A full batch (or any, but for the background flusher) is followed by the
                # next, leased in the transaction of its ack: one queue commit per batch.
                follow = (
                    None
                    if last or final or (self.full_only and len(lease) < full)
                    else Follow(*self.asked)
                )
                if (
                    first
                    and follow is not None
                    and then_sent is None
                    and self.sends_ahead(lease, full)
                ):
                    # As the pipeline starts, and again while a batch waits unsent (the
                    # window was full when it was leased: another pass's requests, or a
                    # window halved by a 429) once there is room again.
                    if sent is None:
                        sent = send_ahead(self.deliverer, lease, deadline=self.deadline)
                    if sent is not None:
                        if then is None:
                            then = self.lease_next()  # as the pipeline starts; then by ``follow``
                        if then is not None:
                            then_sent = send_ahead(self.deliverer, then, deadline=self.deadline)
                # One statement (no interrupt lands between its stores): ``deliver`` settles
                # the lease and what was sent of it once it has taken them (``Ahead.taken``).
                ahead, sent, mine = sent, None, False
                stats = self.deliverer.deliver(
                    lease,
                    deadline=self.deadline,
                    stop=self.stop,
                    follow=follow,
                    ahead=ahead,
                    quick=quick,
                )
                with self.lock:
                    self.total.add(stats)
                if self.progress is not None and stats.sent:
                    self.progress(stats.sent)
                if final:
                    return
                taken = follow is not None and follow.taken
                nxt = follow.lease if follow is not None else None
                if then is not None:
                    # The batch after this one goes next whatever the rules below say
                    # (it is on the wire, or leased for it); what this ack leased follows
                    # it, sent now so that the server has it while this thread reads.
                    # (The failure put ``lease``'s destination in backoff, not another's.)
                    quick = not stats.errors or then.destination.id != lease.destination.id
                    lease, sent, then, then_sent = then, then_sent, None, None
                    mine = True
                    if nxt is not None:
                        if quick and not self.done() and not last:
                            then = nxt
                            # Never ahead of a batch still to send: that one waits for a
                            # slot of the window (``acquire``), and the slot taken here
                            # could be the one it waits for, held by this very thread.
                            if sent is not None and self.sends_ahead(nxt, full):
                                then_sent = send_ahead(self.deliverer, nxt, deadline=self.deadline)
                        else:
                            follow = None
                            self.deliverer.give_back(nxt)
                    if sent is None and (self.done() or not quick):
                        # Not on the wire: handed back when the pass ends (``done`` may have
                        # turned since it was asked above: what the ack leased goes back
                        # too), or when the batch before failed for good: its destination
                        # backs off now, and the next lease skips it.
                        mine = False
                        self.deliverer.give_back(lease)
                        if then is not None:
                            leased, then = then, None
                            self.deliverer.give_back(leased)
                        if self.done():
                            return
                        lease, quick = self.lease_next(), True
                        mine = lease is not None
                    continue
                quick = True
                # A failing destination is now in backoff, so the next lease skips it and
                # the pass ends once only such messages are left.
                if (
                    (self.full_only and len(lease) < full)
                    # The destination turned out fast (a slow round trip or two were the
                    # GIL's or the CPU's, not the network's): extra threads would only
                    # contend for the GIL and the queue's write lock, so this helper stops.
                    or (not first and not self.deliverer.window(lease).latency_bound)
                    or self.done()
                    or (not first and self.alone)  # the caller appends again (``solo``)
                ):
                    if nxt is not None and taken and not first and self.winding_down():
                        # Leased in this batch's ack when the pass's own thread had just
                        # found nothing more: sent rather than handed back for another pass.
                        lease, final, mine = nxt, True, True
                        continue
                    if nxt is not None:
                        follow = None
                        self.deliverer.give_back(nxt)
                    return
                lease = nxt if taken else self.lease_next()
                mine = lease is not None
        except BaseException:
            # Sent ahead and not settled: their connections are dropped and their leases
            # handed back (the server may have them: sent again later, at least once).
            # Leased and not sent: handed back as they were.
            for pending in (sent, then_sent, None if ahead is None or ahead.taken else ahead):
                if pending is not None:
                    drop_ahead(self.deliverer, pending)
            unsent = [then if then_sent is None else None, lease if mine and not sent else None]
            if follow is not None and follow.lease is not lease and follow.lease is not then:
                unsent.append(follow.lease)
            for held in unsent:
                if held is not None:
                    self.deliverer.give_back(held)
            raise

    def sends_ahead(self, lease: Lease, full: int) -> bool:
        """Whether the calling thread sends the batch after ``lease`` before it reads
        ``lease``'s answer: a full batch (a backlog), more than one request allowed in
        flight, no helper of this pass running (they pipeline instead), the pass going on."""
        return self.count > 1 and self.running == 0 and len(lease) >= full and not self.done()

    def lease_next(self) -> Lease | None:
        """The next batch of what the pass was asked for (its own transaction)."""
        return self.deliverer.lease_next(
            destination=self.destination,
            up_to_id=self.up_to_id,
            batches=self.deliverer.lease_batches,
        )

    def guarded(self, window: Window, claim: list[bool]) -> None:
        with self.lock:
            if claim[0]:
                return  # taken back by ``spawn`` (interrupted) before it ran: not counted
            claim[0] = True
        try:
            self.run(False)
        except BaseException as exc:  # re-raised in the caller's thread
            self.failures.append(exc)
        finally:
            window.helpers_done()
            with self.finished:
                self.running -= 1
                self.finished.notify_all()


def send_ahead(
    deliverer: Deliverer, lease: Lease, *, deadline: float | None = None
) -> Ahead | None:
    """Send ``lease``'s batch now, its answer to be read by ``Deliverer.deliver(ahead=...)``.

    What lets one thread keep two requests in flight: it sends the next batch before it
    reads the answer to the one before, so the server works on one while the thread
    settles the other. None (nothing sent, the lease still the caller's) when the
    transport cannot (``SendsAhead``), the lease needs more than one request, the
    destination's window has no free slot, its Retry-After gate is closed, or
    ``deadline`` leaves too little time.
    """
    start: Callable[..., Started | None] | None = getattr(deliverer.transport, "start", None)
    if start is None or len(deliverer.batches(lease)) != 1:
        return None
    window = deliverer.window(lease)
    if window.gate_wait() > 0:
        return None
    remaining = None if deadline is None else deadline - time.monotonic()
    if remaining is not None and remaining < _AHEAD_MIN_TIME:
        return None
    ticket = window.try_acquire(deliverer.max_in_flight)
    if ticket is None:
        return None
    try:
        held = still_held(deliverer.queue, lease)
    except BaseException:
        window.release()
        raise
    if not held:
        # Not sent: ``Deliverer.deliver`` finds it lost too and sends nothing.
        window.release()
        return None
    keep_leased_from_now(deliverer.queue, lease)
    started: Started | None = None
    try:
        sent_at = time.monotonic()
        started = start(
            lease.destination, lease.bodies, timeout=remaining, retry_count=lease.attempts
        )
        if started is not None:
            return Ahead(lease, started, window, ticket, sent_at)
    except BaseException:
        # Also an interrupt between the request leaving and its ``Ahead``: the slot and
        # the keeper's entry go back, the connection is dropped (the lease is the
        # caller's, still unsent as far as it knows).
        if started is not None:
            started.cancel()
        stop_keeping(lease)
        window.release()
        raise
    stop_keeping(lease)
    window.release()
    return None


def drop_ahead(deliverer: Deliverer, ahead: Ahead) -> None:
    """Give up a batch ``send_ahead`` sent, its answer unread: the connection is closed
    and the lease handed back (the server may have taken the batch: it may be sent
    again, as after any lost answer)."""
    try:
        ahead.started.cancel()
    finally:
        stop_keeping(ahead.lease)
        ahead.window.release()
        deliverer.give_back(ahead.lease)


def _helpers_for(queue: QueueBackend, lease: Lease, count: int) -> int:
    """Helper threads worth starting beside the caller's: ``count - 1``, unless the queue
    keeps the destination's window for the fleet (PostgreSQL) and it has fewer slots (a
    helper it refuses would only ask again and end)."""
    try:
        room = queue.window.limit(lease.destination.id)
    except QueueError:
        room = None
    return count - 1 if room is None else max(0, min(count, room) - 1)
