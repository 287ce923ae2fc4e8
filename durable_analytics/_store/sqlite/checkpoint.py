"""Running a checkpoint of a queue file on the calling thread's connection.

``wal.Checkpoints`` decides when a delivering connection checkpoints; this module runs it:
a PASSIVE pass, then a RESTART and the small commit of this thread's own that starts the log
over (``restart_log``), or, on an idle queue, a TRUNCATE that gives the file's space back.
Failures are ignored: a later checkpoint runs again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

from durable_analytics.exceptions import QueueError

from .connections import Connections, owned
from .files import wal_checkpoint
from .wal import start_log_over

__all__ = ["RESTART_WAIT_MS", "restart_log", "run_checkpoint"]

#: How long a RESTART checkpoint waits for the writer or a reader in its way (SQLite's busy
#: handler): a moment, since it keeps new writers waiting meanwhile.
RESTART_WAIT_MS = 2
#: How long a delivering thread waits for the process's write lock, then for its read lock,
#: to start the log over itself (``restart_log``); past it, the RESTART runs without them.
_LOG_LOCK_WAIT = 0.01
#: How long it tries for the commit fence exclusively (other processes' writers hold it for
#: one commit at a time), before it takes it shared like any writer.
_LOG_FENCE_WAIT = 0.002


def run_checkpoint(
    db: Connections,
    truncate: bool,
    *,
    before: Callable[[], None] | None = None,
    exclusive: bool = True,
) -> None:
    """A checkpoint on this thread's connection that lets the log start over; failures
    ignored (a later one checkpoints again). TRUNCATE (an idle queue) waits for nobody.

    PASSIVE first: it copies while writers go on. Beside a producer that appends without
    pause that never lets the log start over (the next writer restarts the log only if its
    snapshot began once everything was copied), so the log grew until SQLite's backstop
    checkpoint ran inside a producer's commit: 0.4-2.7 ms of that call's CPU, a few calls
    per thousand, the p99.9 of ``track()`` with a worker delivering. So a RESTART follows
    (``restart_log``): it keeps new writers waiting while it copies what the PASSIVE left
    (the Client's calls spool meanwhile; the PASSIVE first keeps that short for writers that
    do not spool: their p99.9 was 3-5 times longer behind a RESTART alone) and until no
    reader uses the log, and makes the next commit start it over, this thread's own where
    it can be. It waits at most ``RESTART_WAIT_MS`` for the writer or a reader in its way.
    ``before`` runs first (a spool's: the queue's ``-wal`` synced, see ``spool.py``);
    ``exclusive`` as in ``restart_log``.
    """
    with contextlib.suppress(QueueError):
        if truncate:
            # The file is given back; the next commit, whenever it comes, starts it.
            db.read(partial(wal_checkpoint, mode="TRUNCATE"))
            return
        if before is not None:
            before()
        db.read(partial(wal_checkpoint, mode="PASSIVE"))
        restart_log(db, exclusive=exclusive)


def restart_log(db: Connections, *, exclusive: bool = True) -> None:
    """The RESTART checkpoint, then this thread's commit starts the log over.

    The commit that starts a log over writes its header and syncs it (SQLite does so with
    ``synchronous=NORMAL`` too: its order against the frames that follow is what keeps the
    file whole on power loss). Left to the next writer, that fsync fell on a caller's
    ``track()`` once per checkpoint (20-30 of 20,000 calls, 0.1-0.8 ms each on the
    benchmark machine's disk, more on one that flushes for real). So the RESTART and a small
    commit of this thread's run under the process's write and read locks and the commit
    fence, held exclusively with ``exclusive`` (``fence.py``): callers of every process
    spool meanwhile and never start the log. Each taken only for a moment (else: the RESTART
    alone, and the next writer starts the log over, as before). A spool's queue passes
    ``exclusive=False``: its fence is the spool directory's, every process's spool's.
    """
    lock = db.write_lock
    restart = partial(wal_checkpoint, mode="RESTART", wait_ms=RESTART_WAIT_MS)
    # A caller holds the lock for one append at a time: the wait is short, but may last
    # until the caller lets go of the GIL (its switch interval).
    if owned(lock) or owned(db.read_lock) or not lock.acquire(timeout=_LOG_LOCK_WAIT):
        db.read(restart)
        return
    # The read lock too, for a moment only, and before the fence: another thread's read
    # (stats() of a large queue) may hold it long, and waiting for it inside ``db.read``
    # kept the write lock and the exclusive fence (every writer of every process) for the
    # whole read; a signal handler's track() inside a read, waiting for the write lock,
    # deadlocked with it until ``busy_timeout``.
    if not db.read_lock.acquire(timeout=_LOG_LOCK_WAIT):
        lock.release()
        db.read(restart)  # as before: waits for the read without holding anything
        return
    try:
        db.check_side_files()
        fence = db.fence
        depth = fence.depth
        try:
            # Exclusive keeps other processes' callers out too; shared, only this one's.
            if not ((exclusive and fence.try_exclusive(_LOG_FENCE_WAIT)) or fence.try_enter()):
                db.read(restart)  # a recovery holds the directory: no commit now
                return
            done = db.read(restart)
            # Everything copied: the next commit starts the log over; this one.
            if done is not None and done[1] == done[2]:
                db.read(start_log_over)
        finally:
            # Not a plain leave after the take: ``flush()`` runs this on the caller's
            # thread, and a signal handler may raise into it in ``try_exclusive``'s
            # retries, right after its flock, or before this block knew it held the
            # fence. A count left at 1 kept every later commit's lock held.
            fence.unwind(depth)
    finally:
        db.read_lock.release()
        lock.release()
