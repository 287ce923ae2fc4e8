"""Spools: where an append goes while the queue file's write lock is taken.

A Client's call goes first to its process's journal (``journal.py``: one ``write()``, moved
in by the same movers); what follows is for a call the journal does not take (it is full,
off, or the queue is ``durability="full"``) that would wait for the file.

SQLite has one write lock per file. A delivering transaction (a lease, an ack, a fold of the
index) holds it for 0.1-1 ms, and an append that waited for it was the slowest of a
producer's calls: about one call in twenty while a flusher or a worker delivered. So an
append that would wait commits instead to a small queue file of this process's own, its
*spool* (``<queue>.spool/<pid>-<random>.db``, the queue's schema), which only this process
appends to: a commit there, like one in the queue, is durable before ``track()`` returns.

Whoever delivers moves spooled messages into the queue in bulk: this process's flusher
before each lease, ``flush()`` and ``drain`` before they look at what is pending, and every
poll of a flusher, a ``worker`` or a ``drain`` process (the spools of every process, at most
every ``SCAN_EVERY``). A move is exactly once, whoever makes it and wherever it stops: the
transaction that inserts a chunk of rows into the queue also records, in the queue's
``counters`` table (``spool:<name>``), the id of the last row it moved; the next move starts
after it, and only then are the moved rows deleted from the spool (the moves are
``spool_moves.py``'s and ``journal_moves.py``'s: ``Spools`` inherits them from
``SpoolMoves``). A mover killed between the two commits leaves rows that no later move
takes again; two movers serialize on the queue's write lock and each starts after the
other's record. The spool's newest moved row is kept: ids of a table without AUTOINCREMENT
start again after the largest one left, and a new row must never get an id at or below the
record.

A spool's owner holds an exclusive ``flock`` on ``<name>.lock`` while its queue object
lives. A mover that can take that lock knows the owner is gone: once everything was moved
it deletes the files and the record. A process forked from the owner starts a spool of its
own. A move never holds the locks of two files at once (``fork()`` takes each file's in
turn), and never waits for another process's spool lock.

What bounds a spool: an append spools only on the queue's fast path, never with a
``max_queue_size``, and only while this process has fewer than its share of
``MOST_SPOOLED`` rows not yet moved (``Spools.hold_share``); past that it waits for the
queue file's lock, as before. The share is all of it while ``SPOOL_MARGIN`` for each
process with a spool or a journal (this one included, counted at most every
``SCAN_EVERY``) fits under ``max_queue_bytes`` beside the file, and shrinks in proportion
when it does not (many processes on one queue, or a file near the cap): what all of them
may hold outside the file stays within the cap, and forty web workers on one queue still
journal their calls instead of all waiting for the file's lock (they did, up to
``busy_timeout``, with 26 or more processes at the default cap). A spool that cannot be
created or read turns spooling off in this process (logged once): appends then wait, as
before; nothing stored is lost.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
import weakref
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from durable_analytics.exceptions import QueueBusy, QueueError

from . import forks
from .files import check_spool_directory, make_private_dirs, sync_wal
from .journal import MOST_JOURNALED, SUFFIX, Journal, owner_of
from .move_records import RECORD, record_of
from .spool_moves import SCAN_EVERY, SpoolMoves
from .waits import owned

if TYPE_CHECKING:
    from .queue import SqliteQueue

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LEAST_SHARE",
    "MOST_SPOOLED",
    "SPOOL_MARGIN",
    "SpoolOpener",
    "Spools",
    "open_spool",
    "spool_dir",
]

logger = logging.getLogger("durable_analytics.queue")

#: Most rows this process keeps spooled before its appends wait for the queue file instead.
MOST_SPOOLED = 1024
#: How long an append waits for another thread's turn at this process's spool (a producer's
#: INSERT, or a mover deleting what it moved: one statement each) before waiting for the
#: queue file instead.
LOCAL_WAIT = 0.002
#: A message spools or journals only while the file is at least this far under
#: ``max_queue_bytes`` by the estimate for each process with a spool or a journal in the
#: directory (this one included), and never with a ``max_queue_size``: a move adds what
#: waited, without the caps' check (at most ``MOST_SPOOLED`` messages of at most 32 KiB per
#: spool, and ``MOST_JOURNALED`` bytes per journal). With more processes than fit, each holds
#: a share of it (``Spools.hold_share``).
SPOOL_MARGIN = MOST_SPOOLED * 32 * 1024 + MOST_JOURNALED
#: The smallest share of ``SPOOL_MARGIN`` a process journals or spools with (128 KiB of
#: journal, 16 rows of spool): below it, its calls go to the queue file.
LEAST_SHARE = 1 / 64


def spool_dir(path: Path) -> Path:
    """The directory of the spools of the queue file ``path``."""
    return path.with_name(path.name + ".spool")


def _release_lock(fd: int, owned_files: list[SqliteQueue], journal_fd: list[int]) -> None:
    """Close a collected Spools' own spool (if it made one) and journal file, and let go of
    its owner lock."""
    for spool in owned_files:
        with contextlib.suppress(Exception):
            spool._db.close_all()
    if journal_fd[0] >= 0:
        with contextlib.suppress(OSError):
            os.close(journal_fd[0])
    with contextlib.suppress(OSError):
        os.close(fd)


def _names_of(queue: SqliteQueue, dest_id: int) -> tuple[str, str] | None:
    """The (host, write key) of one of ``queue``'s destinations, or None if there is none."""
    names = queue._dest_names.get(dest_id)
    if names is None:
        row = queue._db.read(
            lambda conn: conn.execute(
                "SELECT host, write_key FROM destinations WHERE id = ?", (dest_id,)
            ).fetchone()
        )
        if row is not None:
            names = queue._dest_names[dest_id] = (str(row[0]), str(row[1]))
    return names


def open_spool(queue: SqliteQueue, path: Path, *, wait: float | None = None) -> SqliteQueue:
    """A spool file of ``queue``: its schema and durability, never measured for the caps
    (the queue's appender counts what is spooled). Its waits last at most ``wait`` (default
    the queue's ``busy_timeout``), and never past a deadline set on ``queue``."""
    spool = type(queue)(
        path,
        durability=queue.durability,
        lease_timeout=queue.lease_timeout,
        busy_timeout=queue.busy_timeout if wait is None else min(wait, queue.busy_timeout),
        deadlines_of=queue,
    )
    spool._appender.capped = False
    spool._spools = None  # a spool has no spools of its own
    spool.restart_exclusive = False  # its directory's fence is every spool's
    if queue.durability != "full":
        # A spool checkpoint makes the movers' deletes durable: what they moved must be
        # durable in the queue first (synchronous=NORMAL syncs neither file on commit), or a
        # power loss could keep the delete and lose the moved rows.
        spool.before_checkpoint = partial(sync_wal, queue.path)
    return spool


class SpoolOpener(Protocol):
    """Opens a spool file as a queue (``open_spool`` bound to the spool's queue)."""

    def __call__(self, path: Path, *, wait: float | None = None) -> SqliteQueue: ...


class Spools(SpoolMoves):
    """This process's spool of one queue, and the moves of every spool into the queue."""

    def __init__(self, path: Path, opener: SpoolOpener, *, journal: bool = False) -> None:
        self.path = path
        self.dir = spool_dir(path)
        self._opener = opener
        self._own: SqliteQueue | None = None
        self._own_name = ""
        self._lock_fd = -1
        self._off = False
        self._own_bad = False  # this process's spool could not be read: no more moves
        self._release: weakref.finalize[[int, list[SqliteQueue], list[int]], Spools] | None = None
        #: What the owner lock's release closes: this process's spool, once it has one.
        self._owned_files: list[SqliteQueue] = []
        #: This process's journal (``journal.py``): where its calls go first, if journaling.
        self.journal: Journal | None = Journal(self.dir, self._claim) if journal else None
        #: Destinations of the queue -> their ids in this process's spool.
        self._dests: dict[int, int] = {}
        #: The newest id appended to this process's spool, and the newest moved from it.
        self.last_spooled = 0
        self.moved_upto = 0
        self._looked = -math.inf  # when the record was last read (``_moved_elsewhere``)
        self._others: dict[str, SqliteQueue] = {}
        self._bad: set[str] = set()
        #: Others' spools that stayed busy past ``OTHERS_WAIT``: left alone until then.
        self._busy_until: dict[str, float] = {}
        self._scanned = -math.inf
        self._dir_warned = False  # the directory was refused (``dir_trusted``)
        self._spoolers = 1
        self._counted_at = -math.inf  # when the spools were last counted (``spoolers``)
        self._moving = threading.RLock()
        self._creating = threading.RLock()
        #: Threads inside a call that waits for the queue file's lock, with how many such
        #: calls each (a signal handler's call nests inside the one it interrupted).
        self._waiting: dict[int, int] = {}
        _registry.add(self)

    # ---------------------------------------------------------------- appending

    def append(
        self, queue: SqliteQueue, dest_id: int, body: bytes, enqueued_at: float | None
    ) -> int:
        """``queue.append`` with spooling: the queue file if that needs no wait, else this
        process's spool (a negated id), else the queue file after the wait."""
        appender = queue._appender
        when = time.time() if enqueued_at is None else enqueued_at
        size = len(body)
        journal = self.journal
        me = threading.get_ident()
        # A signal handler's call inside a call of this thread that waits for the queue's
        # lock journals (or spools) even past the bound, and when the estimates of the
        # file's size are due to be measured (the waiting call does that): waiting too,
        # each handler's call nested inside the one before, and a storm of signals during
        # one long wait ended in a RecursionError.
        # The same for a handler's call inside this thread's own journal write, which the
        # journal takes after the interrupted record (``Journal._append_nested``).
        nested = me in self._waiting or (journal is not None and owned(journal.lock))
        if (
            journal is not None
            and not journal.off
            # A child forked while its parent was inside an operation refuses the file
            # (``Connections._open``): its calls raise at once, none journaled unseen.
            and not forks.inherited_open(queue._db.real)
        ):
            share = self.hold_share(queue, size, nested)
            names = queue._dest_names.get(dest_id)
            end = (
                None
                if names is None or not share
                else journal.append(names, body, when, past_bound=nested, share=share)
            )
            if end is not None:
                appender.count_stored(size)
                return -end
        row_id = appender.try_append(dest_id, body, when)
        if row_id is not None:
            return row_id
        share = self.hold_share(queue, size, nested)
        if share:
            names = queue._dest_names.get(dest_id)
            spooled = self.try_append(
                queue, dest_id, names, body, when, past_bound=nested, share=share
            )
            if spooled is not None:
                appender.count_stored(size)
                return spooled
        waiting = self._waiting
        waiting[me] = waiting.get(me, 0) + 1
        try:
            return appender.append(dest_id, body, when)
        finally:
            # Only this thread (and its signal handlers, which return first) touch its entry.
            left = waiting.get(me, 1) - 1
            if left:
                waiting[me] = left
            else:
                waiting.pop(me, None)

    def hold_share(self, queue: SqliteQueue, size: int, nested: bool = False) -> float:
        """The share of ``SPOOL_MARGIN`` this process may hold outside the file (in its
        journal and its spool) with a message of ``size`` bytes; 0.0: none, store it in
        the file.

        0.0 off the fast path (``nested``: it is also taken when the estimates are due to
        be measured, which the waiting call it interrupted is about to do) or with a count
        cap. Else all of it (1.0) while ``SPOOL_MARGIN`` for each holding process fits
        under ``max_queue_bytes`` beside the file, and that room divided among them when it
        does not (each process computes the same share, so what they hold together stays
        within the cap), down to ``LEAST_SHARE``."""
        appender = queue._appender
        if appender.max_queue_size is not None:
            return 0.0
        need = SPOOL_MARGIN * self.spoolers()
        if not appender.fast(size, stale_ok=nested) and (
            # The measure is due: from the files' sizes when they leave room to spare (no
            # SQLite read, and this call still journals), else by the caller's way.
            nested or not appender.measured_from_sizes(size, need)
        ):
            return 0.0
        room = appender.max_queue_bytes - appender.est_used - size
        if room >= need:
            return 1.0
        share = room / need
        return share if share >= LEAST_SHARE else 0.0

    def spoolers(self) -> int:
        """How many processes may hold spooled or journaled messages: the owners of the spools
        and journals in the directory, this process counted even before it has one (looked at
        most every ``SCAN_EVERY``)."""
        now = time.monotonic()
        if now - self._counted_at >= SCAN_EVERY:
            self._counted_at = now
            owners: set[str] = set()
            try:
                for entry in os.scandir(self.dir):
                    if entry.name.endswith(".db"):
                        owners.add(entry.name[: -len(".db")])
                    elif entry.name.endswith(SUFFIX):
                        found = owner_of(entry.name[: -len(SUFFIX)])
                        if found is not None:
                            owners.add(found[0])
            except OSError:
                pass  # no directory yet: no spool
            owners.discard(self._own_name)
            self._spoolers = len(owners) + 1
        return self._spoolers

    def try_append(
        self,
        queue: SqliteQueue,
        dest_id: int,
        names: tuple[str, str] | None,
        body: bytes,
        when: float,
        *,
        past_bound: bool = False,
        share: float = 1.0,
    ) -> int | None:
        """Store one message in this process's spool without waiting; None if it cannot.

        ``names`` is the destination's (host, write key). Returns the spool row's id,
        negated (a queue row id is positive). ``share``: the part of ``MOST_SPOOLED`` this
        process may hold now (``hold_share``, at least one row). ``past_bound``: even past
        that (a signal handler's call inside a waiting call, as for the journal).
        """
        own = self._own
        if (
            self._off
            or names is None
            # A signal handler inside this thread's own spool operation (or its creation).
            or (own is not None and (owned(own._db.write_lock) or owned(own._db.read_lock)))
            or owned(self._creating)
        ):
            return None
        most = MOST_SPOOLED if share >= 1.0 else max(1, int(MOST_SPOOLED * share))
        if (
            not past_bound
            and self.last_spooled - self.moved_upto >= most
            and not self._moved_elsewhere(queue, most)
        ):
            return None
        try:
            if own is None:
                own = self._create()
                if own is None:
                    return None
            spool_dest = self._dests.get(dest_id)
            if spool_dest is None:
                # A write, which waits for the spool directory's commit fence: a process
                # stopped while it holds that exclusively would hold this call up for
                # busy_timeout (movers take it shared only, see checkpoint.restart_log).
                # This call goes to the queue file instead (after GRACE).
                with own.bounded(0):
                    spool_dest = own.destination(*names)
                self._dests[dest_id] = spool_dest
            row_id = own._appender.try_append(spool_dest, body, when, local_wait=LOCAL_WAIT)
        except QueueBusy:
            return None  # the spool's lock, for a moment (a mover's delete): wait for the queue
        except (QueueError, OSError, sqlite3.Error) as exc:
            self._turn_off(exc)
            return None
        if row_id is None:
            return None
        self.last_spooled = max(self.last_spooled, row_id)
        return -row_id

    def _moved_elsewhere(self, queue: SqliteQueue, most: int) -> bool:
        """Whether another process moved this one's spool below ``most`` rows (read at most
        every ``SCAN_EVERY`` while at the bound: a worker moves it without telling us)."""
        now = time.monotonic()
        if now - self._looked < SCAN_EVERY:
            return False
        self._looked = now
        try:
            row = queue._db.read(partial(record_of, name=RECORD + self._own_name))
        except QueueError:
            return False
        if row is not None:
            self.moved_upto = max(self.moved_upto, int(row[0]))
        return self.last_spooled - self.moved_upto < most

    def _create(self) -> SqliteQueue | None:
        if not self._creating.acquire(blocking=False):
            return None  # another thread creates it: this append waits for the queue file
        try:
            return self._create_locked()
        finally:
            self._creating.release()

    def _create_locked(self) -> SqliteQueue | None:
        if self._own is not None or self._off:
            return self._own
        name = self._claim_locked()
        own = self._opener(self.dir / f"{name}.db")
        self._owned_files.append(own)
        self._own = own
        return own

    def _claim(self) -> str | None:
        """This process's spool name, its owner lock taken (the journal's files are named
        after it); None when another thread is taking it or it cannot be taken."""
        if self._own_name:
            return self._own_name
        if not self._creating.acquire(blocking=False):
            return None
        try:
            return self._claim_locked()
        except (OSError, QueueError) as exc:
            if self.journal is not None:
                self.journal.off = True
            logger.warning("could not start the journal in %s: %s", self.dir, exc)
            return None
        finally:
            self._creating.release()

    def _claim_locked(self) -> str:
        if self._own_name:
            return self._own_name
        name = f"{os.getpid()}-{secrets.token_hex(6)}"
        make_private_dirs(self.dir)
        check_spool_directory(self.dir)  # one another user controls is not used at all
        lock_path = self.dir / f"{name}.lock"
        fd = os.open(
            lock_path,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0),
            0o600,
        )
        # Known before it is locked: a fork() from here on closes the child's copy.
        self._lock_fd = fd
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            self._lock_fd = -1
            os.close(fd)
            with contextlib.suppress(OSError):
                lock_path.unlink()
            raise
        # Released with this object (the spool and journal of a closed, dropped queue are
        # then adopted by the next mover), or at exit.
        self._owned_files = []
        box = [-1] if self.journal is None else self.journal.fd_box
        self._release = weakref.finalize(self, _release_lock, fd, self._owned_files, box)
        # Not at exit: the exit handler may still append and move; the kernel lets go then.
        self._release.atexit = False
        self._own_name = name
        return name

    def _turn_off(self, exc: BaseException) -> None:
        if not self._off:
            self._off = True
            logger.warning(
                "appends to %s wait for the queue file's lock from now on in this process: "
                "its spool in %s failed (%s)",
                self.path,
                self.dir,
                exc,
            )

    # ---------------------------------------------------------------- moving

    def has_unmoved(self) -> bool:
        """Whether this process spooled rows not moved yet (no I/O)."""
        return self.last_spooled > self.moved_upto

    def has_unjournaled(self) -> bool:
        """Whether this process journaled calls its own moves have not taken (no I/O)."""
        return self.journal is not None and self.journal.has_unmoved()

    # ---------------------------------------------------------------- fork

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's spool is the parent's; this process makes its own."""
        if self._release is not None:
            self._release.detach()
            self._release = None
        if self._lock_fd >= 0:
            # The parent's descriptor keeps the lock: closing this copy releases nothing.
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
        self._lock_fd = -1
        self._own = None
        self._own_name = ""
        self._owned_files = []
        if self.journal is not None:
            self.journal.close_after_fork()
        self._dests = {}
        self._waiting = {}  # the parent's threads' waits (only the forking thread lives on)
        self.last_spooled = self.moved_upto = 0
        self._others = {}
        self._scanned = -math.inf
        self._counted_at = -math.inf
        self._moving = threading.RLock()
        self._creating = threading.RLock()


_registry: weakref.WeakSet[Spools] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for spools in list(_registry):
        spools.forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
