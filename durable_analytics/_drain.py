"""The one "deliver until done or until the deadline" loop, and the drains built on it.

``deliver_until`` serves every path that must deliver now rather than in the background:
``Client.flush()`` and exit, ``sync_mode``, the end of the flusher process, the detached
exit drain, and the CLI's ``drain``. ``drain_queue`` is that loop with the rules of
``durable-analytics drain``; ``drain_lock`` keeps detached exit drains to one per queue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._delivery import Deliverer, DeliveryStats, make_deliverer
from ._store import QueueBackend
from ._transport import DestinationOverride, open_transport
from ._transport.base import Outcome, Transport

if TYPE_CHECKING:
    from ._config import Config

__all__ = ["DrainResult", "deliver_until", "drain", "drain_lock", "drain_queue"]

log = logging.getLogger("durable_analytics.delivery")

Progress = Callable[[int], object]

# How often the loop looks again while another holder has the rest under a lease.
_HOLDER_POLL = 0.05


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
    concurrency: int = 4,
    timeout: float | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    up_to_id: int | None = None,
) -> DrainResult:
    """One pass: lease and deliver with ``concurrency`` workers until nothing is ready.

    Stops when nothing is ready any more (the rest is leased by others, in backoff, or the
    server keeps failing), when ``timeout`` passes, or when ``stop`` is set. ``up_to_id``
    limits it to the messages stored up to that id; ``left`` then counts only those. Most
    callers want ``deliver_until`` or ``drain_queue``, which also wait for other holders.
    """
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    with queue.bounded(timeout):  # no queue wait outlasts the deadline
        total = _pass(
            queue,
            make_deliverer,
            concurrency=concurrency,
            deadline=deadline,
            progress=progress,
            stop=stop,
            up_to_id=up_to_id,
            destination=None,
        )
    return _result(queue, total, started, up_to_id, None)


def deliver_until(
    queue: QueueBackend,
    deliverer: Deliverer | Callable[[], Deliverer],
    *,
    concurrency: int = 1,
    destination: int | None = None,
    up_to_id: int | None = None,
    deadline: float | None = None,
    wait_for_backoff: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> DrainResult:
    """Deliver the pending messages (of ``destination``, up to ``up_to_id``) until done.

    Runs passes of ``concurrency`` workers, each leasing and delivering until nothing is
    ready. Between passes, messages another live holder leased are waited for (that holder
    may give them back); messages waiting out a retry backoff are waited for only with
    ``wait_for_backoff`` (``flush()``), otherwise the loop ends and leaves them queued.
    It also ends at ``deadline`` (a ``time.monotonic()`` value) or when ``stop`` is set.

    ``deliverer`` is one Deliverer (used in this thread; ``concurrency`` must be 1, and its
    transport stays open) or a factory called once per worker (each worker closes its
    transport when done). ``progress(n)`` is called after each batch with the messages it
    sent. ``up_to_id`` is what makes a drain end under constant production: pass the
    queue's ``max_id()`` at the start to deliver only what was queued by then.
    """
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
        )


def _deliver_until(
    queue: QueueBackend,
    deliverer: Deliverer | Callable[[], Deliverer],
    *,
    concurrency: int,
    destination: int | None,
    up_to_id: int | None,
    deadline: float | None,
    wait_for_backoff: bool,
    progress: Progress | None,
    stop: threading.Event | None,
) -> DrainResult:
    started = time.monotonic()
    total = DeliveryStats()
    stalled = False  # the last pass found ready messages but leased none
    while True:
        stats = _pass(
            queue,
            deliverer,
            concurrency=concurrency,
            deadline=deadline,
            progress=progress,
            stop=stop,
            up_to_id=up_to_id,
            destination=destination,
        )
        total.add(stats)
        if queue.pending(up_to_id=up_to_id, destination=destination) == 0:
            break
        if (stop is not None and stop.is_set()) or _passed(deadline):
            break
        queue.reclaim_expired()
        next_at = queue.next_ready_at(up_to_id=up_to_id)
        now = time.time()
        if next_at is None:
            wait = _HOLDER_POLL  # the rest is leased by another live holder: wait for it
        elif next_at > now:
            if not wait_for_backoff:
                break  # what is left waits out a retry backoff
            wait = max(0.01, min(1.0, next_at - now))
        elif stats.sent or stats.dead_lettered or wait_for_backoff or not stalled:
            # Ready again (a holder gave some back, a lease expired): go on after a breath.
            # One pass without progress is allowed: a lease that expired just after this
            # pass looked (a dead holder's, on a backend that cannot tell it died) is ready.
            stalled = not (stats.sent or stats.dead_lettered)
            wait = 0.01
        else:
            break  # ready but not leasable by this loop, and no progress: nothing to wait for
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - time.monotonic()))
        if stop is not None:
            stop.wait(wait)
        else:
            time.sleep(wait)
    return _result(queue, total, started, up_to_id, destination)


def drain_queue(
    queue: QueueBackend,
    config: Config,
    *,
    host: str | None = None,
    write_key: str | None = None,
    timeout: float | None = None,
    concurrency: int = 4,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    transport: Callable[[], Transport] | None = None,
) -> DrainResult:
    """Deliver everything queued when called, as ``durable-analytics drain`` does.

    Only the messages stored up to the call are taken (so a drain ends under constant
    production), each to its stored destination unless ``host`` / ``write_key`` replace it.
    ``concurrency`` workers each use a Deliverer built by ``make_deliverer(config, queue)``
    (batch size, retries, request ``timeout``, gzip, proxies from ``config``). Messages
    another live process holds under a lease are waited for; messages waiting out a retry
    backoff are left queued. Ends after ``timeout`` seconds or when ``stop`` is set.
    ``progress(n)`` is called with the number sent after each batch (for a progress bar).
    ``result.left`` counts what is still pending of the messages it was asked to deliver.
    ``transport`` makes each worker's transport (default: ``open_transport(config)``).

    A process that has no write key of its own (the CLI) builds ``config`` with
    ``Config.for_delivery(timeout=..., max_retries=...)``.
    """

    def make() -> Deliverer:
        one = open_transport(config) if transport is None else transport()
        if host is not None or write_key is not None:
            one = DestinationOverride(one, host=host, write_key=write_key)
        return make_deliverer(config, queue, one)

    deadline = None if timeout is None else time.monotonic() + timeout
    return deliver_until(
        queue,
        make,
        concurrency=concurrency,
        up_to_id=queue.max_id(),
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


def _passed(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _pass(
    queue: QueueBackend,
    deliverer: Deliverer | Callable[[], Deliverer],
    *,
    concurrency: int,
    deadline: float | None,
    progress: Progress | None,
    stop: threading.Event | None,
    up_to_id: int | None,
    destination: int | None,
) -> DeliveryStats:
    """Lease and deliver with ``concurrency`` workers until nothing is ready."""
    total = DeliveryStats()
    lock = threading.Lock()

    def run(one: Deliverer) -> None:
        while not (stop is not None and stop.is_set()) and not _passed(deadline):
            stats = one.deliver_next(destination=destination, up_to_id=up_to_id, deadline=deadline)
            if stats is None:
                return
            with lock:
                total.add(stats)
            if progress is not None and stats.sent:
                progress(stats.sent)
            # A failing destination is now in backoff, so the next lease skips it and the
            # pass ends once only such messages are left.

    if isinstance(deliverer, Deliverer):
        run(deliverer)
        return total
    factory = deliverer

    def worker() -> None:
        one = factory()
        try:
            run(one)
        finally:
            one.transport.close()

    threads = [
        threading.Thread(target=worker, name=f"durable-analytics-drain-{i}", daemon=True)
        for i in range(max(1, concurrency))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total


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
