"""How big the queue's ``-wal`` may grow, and who pays for checkpointing it.

SQLite checkpoints the write-ahead log from whichever connection commits once it holds
``wal_autocheckpoint`` pages: on the call path, that is one ``track()`` in several hundred
paying a few milliseconds. Connections that append (producers) therefore checkpoint only
past a much larger size, while the connections that lease and acknowledge (a flusher thread,
a flusher process, a worker, ``drain``) checkpoint at the normal size, off the caller's
thread, and after their transaction rather than inside its commit: a commit runs under the
process's write lock, and a checkpoint there (milliseconds, with its fsyncs) made every
append of the caller's thread wait behind it (the flusher thread's p99.9 was 6-7 ms, 2 ms
without). ``SqliteQueue`` runs that checkpoint (PASSIVE: writers go on meanwhile) once the
log holds ``normal_pages``; SQLite's own, inside a commit, is left as a backstop at the
producers' size (``commit_pages``). With nobody delivering (``flusher="none"`` and no
worker running) producers still bound the file at the larger size.

Once a checkpoint has copied the whole log back, the next commit restarts it from the start
of the file. That commit keeps the file as it is up to ``keep_limit`` bytes
(``journal_size_limit``): cutting it back there, on whichever commit restarted the log (most
often a caller's append), took 4-5 ms of ``ftruncate`` on ext4, and the file then grew again
block by block. A file past its normal size is given back while the queue is idle (a
TRUNCATE checkpoint when a flusher finds nothing to send, ``SqliteQueue``).

Both sizes scale down with ``max_queue_bytes`` so that the ``-wal`` stays a small part of
the cap. A reader that holds an old snapshot open (an ``sqlite3`` shell, a backup, a stopped
process) keeps any checkpoint from resetting the log: ``Appender`` then counts the ``-wal``
against the cap (see ``WalBudget.excess``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WalBudget", "open_readers", "wal_bytes"]

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


def wal_bytes(path: Path) -> int:
    """The size of the queue's ``-wal`` file (0 when there is none)."""
    try:
        return os.stat(f"{path}-wal").st_size
    except OSError:
        return 0


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
