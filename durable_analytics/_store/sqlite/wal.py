"""How big the queue's ``-wal`` may grow, and who pays for checkpointing it.

SQLite checkpoints the write-ahead log from whichever connection commits once it holds
``wal_autocheckpoint`` pages: on the call path, that is one ``track()`` in several hundred
paying a few milliseconds. Connections that append (producers) therefore checkpoint only
past a much larger size, while the connections that lease and acknowledge (a flusher thread,
a flusher process, a worker, ``drain``) checkpoint at the normal size, off the caller's
thread, and after their transaction rather than inside its commit: a commit runs under the
process's write lock, and a checkpoint there (milliseconds, with its fsyncs) made every
append of the caller's thread wait behind it (the flusher thread's p99.9 was 6-7 ms, 2 ms
without). ``checkpoint.run_checkpoint`` runs that checkpoint (PASSIVE, then RESTART)
once the log holds ``normal_pages``; SQLite's own, inside a commit, is left as a backstop at
the producers' size (``commit_pages``). With nobody delivering (``flusher="none"`` and no
worker running) producers still bound the file at the larger size.

Once a checkpoint has copied the whole log back, the next commit restarts it from the start
of the file. That commit keeps the file as it is up to ``keep_limit`` bytes
(``journal_size_limit``): cutting it back there, on whichever commit restarted the log (most
often a caller's append), took 4-5 ms of ``ftruncate`` on ext4, and the file then grew again
block by block. A file past its normal size is given back while the queue is idle (a
TRUNCATE checkpoint when a flusher finds nothing to send, ``Checkpoints.when_idle``), and
since its size no longer tells the log's length, the log's frames are counted
(``log_frames``) to know when it grew by the normal size.

Both sizes scale down with ``max_queue_bytes`` so that the ``-wal`` stays a small part of
the cap. A reader that holds an old snapshot open (an ``sqlite3`` shell, a backup, a stopped
process) keeps any checkpoint from resetting the log: ``Appender`` then counts the ``-wal``
against the cap (see ``WalBudget.excess``).
"""

from __future__ import annotations

import math
import os
import sqlite3
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CHECKPOINT_EVERY",
    "COUNT_EVERY",
    "SHRINK_EVERY",
    "Checkpoints",
    "WalBudget",
    "log_frames",
    "open_readers",
    "start_log_over",
    "wal_bytes",
]

#: The most often (seconds) a delivering connection checkpoints a ``-wal`` past its normal
#: size when the log's frames cannot be counted (``Checkpoints.after_delivery``).
CHECKPOINT_EVERY = 0.1
#: The most often (seconds) an idle queue tries to give back a ``-wal`` past its normal size.
SHRINK_EVERY = 1.0
#: The most often (seconds) a delivering connection counts the log's frames
#: (``log_frames``: about 15 reads) once the file is past its normal size: a flush
#: delivers a batch every millisecond on loopback, and counting after each took ~6 % of
#: its CPU. The log grows by a few frames per commit, so a count 5 ms late checkpoints a
#: little later, never a log much longer.
COUNT_EVERY = 0.005
#: SQLite's default checkpoint size in pages, the most a delivering connection lets build up.
_NORMAL_PAGES = 1000
#: The fewest pages worth checkpointing at once (below, checkpoints cost more than they save).
_MIN_PAGES = 32
#: Producers checkpoint only once the log is this many times the normal size.
_PRODUCER_FACTOR = 4


@dataclass(frozen=True)
class WalBudget:
    """The checkpoint sizes of one queue file, from its cap and page size."""

    #: Pages at which a delivering connection checkpoints (after its transaction).
    normal_pages: int
    #: Pages at which a producer checkpoints (nobody else did).
    producer_pages: int
    #: ``normal_pages`` of frames in bytes: past it a delivering connection checkpoints, and
    #: an idle queue gives the file's space back.
    size_limit: int
    #: Bytes of ``-wal`` that are the normal cost of a healthy log, beyond the cap.
    allowance: int

    @classmethod
    def for_cap(cls, max_queue_bytes: int, page_size: int = 4096) -> WalBudget:
        """The budget of a queue capped at ``max_queue_bytes``: a log of at most ~1/8 of it."""
        frame = page_size + 24  # each frame is a page and its header
        normal = max(_MIN_PAGES, min(_NORMAL_PAGES, max_queue_bytes // 8 // frame))
        producer = normal * _PRODUCER_FACTOR
        return cls(
            normal_pages=normal,
            producer_pages=producer,
            size_limit=normal * frame,
            # A producer's threshold plus the transactions committed while a checkpoint runs.
            allowance=(producer + normal) * frame + 32 + 64 * 1024,
        )

    @property
    def keep_limit(self) -> int:
        """``journal_size_limit``: a restarted log keeps its file up to this many bytes."""
        return self.allowance

    @property
    def commit_pages(self) -> int:
        """A delivering connection's ``wal_autocheckpoint``: a backstop, see the module."""
        return self.producer_pages

    def excess(self, wal_size: int) -> int:
        """Bytes of ``-wal`` beyond what a healthy log takes: they count against the cap."""
        return max(0, wal_size - self.allowance)


#: The smallest write there is to make: it counts the logs started over (``counters``).
_LOG_RESTART = (
    "INSERT INTO counters (name, value) VALUES ('log_restarts', 1) "
    "ON CONFLICT (name) DO UPDATE SET value = value + 1"
)


def start_log_over(conn: sqlite3.Connection) -> bool:
    """Commit one small write on ``conn`` (autocommit, its busy timeout), right after a
    checkpoint that let the log start over: that commit starts it (and syncs its header).

    False when it could not (another connection writes: its commit starts the log over).
    """
    try:
        conn.execute(_LOG_RESTART)
    except sqlite3.Error:
        return False
    return True


def wal_bytes(path: Path) -> int:
    """The size of the queue's ``-wal`` file (0 when there is none)."""
    try:
        return os.stat(f"{path}-wal").st_size
    except OSError:
        return 0


_WAL_MAGIC = (0x377F0682, 0x377F0683)
_WAL_VERSION = 3007000
_HEADER = struct.Struct(">IIIIII")  # magic, version, page size, checkpoint seq, salts
_FRAME_SALTS = struct.Struct(">II")  # at offset 8 of each 24-byte frame header


def log_frames(path: Path) -> tuple[tuple[int, int, int], int] | None:
    """The ``-wal``'s current log: ``(its generation, how many frames it holds)``.

    A log that restarts keeps its file (see the module docstring), so the file's size says
    nothing of the log's length. The log's own frames carry the salts of the file's header
    (SQLite's WAL format; a restart writes new salts, so frames of older logs never match),
    and they run from the start of the file: a binary search over frame headers finds where
    they end (about 15 reads of 8 bytes). The generation (checkpoint sequence and salts)
    changes with each restart. ``None`` when there is no ``-wal`` or it is not one.

    Only a hint for when to checkpoint: the file is read without SQLite's locks (the
    ``-wal`` carries none; its ``-shm`` does, and opening and closing that file would drop
    this process's locks on it), so a frame being written may or may not be counted.
    """
    try:
        fd = os.open(f"{path}-wal", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = os.pread(fd, _HEADER.size, 0)
        if len(head) < _HEADER.size:
            return None
        magic, version, page_size, sequence, salt1, salt2 = _HEADER.unpack(head)
        if magic not in _WAL_MAGIC or version != _WAL_VERSION or page_size < 512:
            return None
        frame = page_size + 24
        size = os.fstat(fd).st_size
        low, high = 0, max(0, (size - 32) // frame)  # frames [0, low) are the log's
        while low < high:
            mid = (low + high) // 2
            salts = os.pread(fd, _FRAME_SALTS.size, 32 + mid * frame + 8)
            if len(salts) == _FRAME_SALTS.size and _FRAME_SALTS.unpack(salts) == (salt1, salt2):
                low = mid + 1
            else:
                high = mid
        return (sequence, salt1, salt2), low
    except OSError:
        return None
    finally:
        os.close(fd)


class Checkpoints:
    """When one queue object's delivering connections checkpoint the ``-wal``.

    ``run(truncate)`` runs a PASSIVE and RESTART (or a TRUNCATE) checkpoint on the calling thread's
    connection (outside any transaction and outside the process's write lock).
    """

    def __init__(self, path: Path, budget: WalBudget, run: Callable[[bool], None]) -> None:
        self.path = path
        self.budget = budget
        self._run = run
        # At the last checkpoint: the log's generation and frames, the file's size, the
        # monotonic time.
        self._last: tuple[tuple[int, int, int] | None, int, int, float] = (
            None,
            0,
            0,
            -CHECKPOINT_EVERY,
        )
        self._shrunk_at = -math.inf  # monotonic time of the last idle TRUNCATE (none yet)
        self._counted_at = -math.inf  # monotonic time of the last ``log_frames``

    def after_delivery(self) -> None:
        """After a lease, ack or release: checkpoint once the log grew by the normal size
        since this object's last checkpoint."""
        size = wal_bytes(self.path)
        # A file no longer than the normal size holds at most that much log.
        if size <= self.budget.size_limit:
            return
        # A longer file may hold a long log or a short one: a restarted log is rewritten
        # from the start of the file it keeps. Its frames are counted instead. While the log
        # cannot restart (a reader in the way; with PASSIVE checkpoints, also producers
        # committing without pause): checkpointing after each lease and ack then
        # copied the few frames since the last, with two fsyncs each time (~40 % of a
        # flusher's time beside a busy producer). So again only once the log grew by another
        # normal size since the last checkpoint, or restarted and grew that much since.
        now = time.monotonic()
        if now - self._counted_at < COUNT_EVERY:
            return
        self._counted_at = now
        log = log_frames(self.path)
        generation, frames, last_size, at = self._last
        if log is not None:
            grown = log[1] if log[0] != generation else log[1] - frames
            if grown < self.budget.normal_pages:
                return
            self._last = (log[0], log[1], size, now)
        else:
            # Not readable as a log: by the file's growth, or every CHECKPOINT_EVERY (a
            # restarted log cannot be told apart by the file's size).
            if last_size <= size < last_size + self.budget.size_limit and (
                now - at < CHECKPOINT_EVERY
            ):
                return
            self._last = (None, 0, size, now)
        self._run(False)

    def when_idle(self) -> None:
        """Nothing is to be sent: cut a ``-wal`` past its normal size back to nothing.

        After a burst the kept file stays as big as the burst made it (at most
        ``WalBudget.keep_limit``) until this TRUNCATE checkpoint. It waits for nobody: with
        a writer or a reader of an older snapshot in the way it gives up until a later idle
        poll (at most every ``SHRINK_EVERY``).
        """
        if wal_bytes(self.path) <= self.budget.size_limit:
            return
        now = time.monotonic()
        if now - self._shrunk_at < SHRINK_EVERY:
            return
        self._shrunk_at = now
        self._run(True)


def open_readers(path: Path) -> list[str]:
    """Other processes that have the queue file open, as ``"pid (name)"`` (Linux; else [])."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    me = os.getpid()
    found: list[str] = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if st.st_ino == target.st_ino and st.st_dev == target.st_dev:
                try:
                    with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
                        name = f.read().strip()
                except OSError:
                    name = "?"
                found.append(f"{pid} ({name})")
                break
    return found
