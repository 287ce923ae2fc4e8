"""Moves of journal files: every process's calls into the queue, exactly once.

A journal file (``journal.py``) is moved a chunk of ``MOVE_BYTES`` per transaction: the
chunk's complete records go into the queue with the file's record (the offset after the
last record moved, ``move_records``), checked again inside the transaction. A file no call
writes any more (sealed: a newer generation of its owner exists, or its owner is gone) is
deleted once moved in whole, its record kept a while as a tombstone (``TOMBSTONE_KEEP``).

``JournalMoves`` is a base of ``SpoolMoves``, which runs these moves beside the spools'.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from durable_analytics.exceptions import QueueDiskFull, QueueError

from .files import sync_wal
from .journal import SUFFIX, Journal, first_size, parse, read_from
from .move_records import RECORD, RECORD_SET, commit_chunk, owner_gone, record_of

if TYPE_CHECKING:
    from .queue import SqliteQueue

__all__ = ["MOVE_BUDGET", "MOVE_BYTES", "TOMBSTONE_KEEP", "JournalDamaged", "JournalMoves"]

logger = logging.getLogger("durable_analytics.queue")

#: The most bytes of a journal file read and moved into the queue per transaction: the
#: records' parsing holds the GIL, which a Client's flusher thread shares with the caller.
MOVE_BYTES = 32 * 1024
#: About how many bytes of journals a Client's flusher thread moves before a lease or a
#: poll (``SqliteQueue._move_spools_due``); ``flush()`` moves everything.
MOVE_BUDGET = 2 * MOVE_BYTES
#: How long the record of a deleted journal file stays, as a tombstone (``_drop_logs``).
TOMBSTONE_KEEP = 60.0


class JournalDamaged(QueueError):
    """A journal file holds a record that fails its check (or is not a regular file)."""


class JournalMoves:
    """The journal half of ``SpoolMoves``: this process's journal files, and others'."""

    # Set by ``Spools.__init__``.
    dir: Path
    path: Path
    _own_name: str
    _bad: set[str]
    #: What is left of the current move's ``budget`` (bytes of journals), None: no bound.
    _budget: int | None = None

    def _move_own_journal(self, queue: SqliteQueue, journal: Journal) -> int:
        """Move this process's journal files; delete the sealed ones once all is moved."""
        moved = 0
        done: list[str] = []  # sealed and moved in whole: deleted together, after one sync
        for stem in list(journal.files):
            try:
                more, room, end = self._move_log(queue, stem, journal=journal)
            except QueueDiskFull:
                break  # the queue file's disk: the records wait in the journal, whole
            except (JournalDamaged, OSError) as exc:
                # Damaged: journaling stops here; the file stays on disk as it is.
                self._bad.add(stem + SUFFIX)
                journal.forget(stem)
                if not journal.off:
                    journal.off = True
                    logger.warning(
                        "calls to %s go to the queue file from now on in this process: its "
                        "journal %s could not be moved (%s)",
                        self.path,
                        self.dir / f"{stem}{SUFFIX}",
                        exc,
                    )
                continue
            moved += more
            if end is None:
                journal.forget(stem)  # another mover deleted it: all of it was moved
            elif room and stem != journal.stem and end >= journal.files.get(stem, 0):
                # Sealed: read now, not before the loop, since a call may have started a
                # newer file meanwhile (and the file it writes must never be deleted). A file
                # once sealed is never written again (calls write under the journal's lock,
                # which the switch to a newer file holds), and its size is final.
                done.append(stem)
        if done:
            self._drop_logs(queue, done)
            for stem in done:
                journal.forget(stem)
        return moved

    def _move_log(
        self, queue: SqliteQueue, stem: str, *, journal: Journal | None = None
    ) -> tuple[int, bool, int | None]:
        """Move one journal file's complete records past its record into the queue, a chunk
        per transaction (``journal`` when the file is this process's own).

        Returns how many moved, False when it stopped with records left because the queue
        had no room for them (``_room_for``) or the move's budget was spent, and the offset
        up to which the file is moved
        (None: the file is gone, all of it moved by another mover). Raises
        ``JournalDamaged`` at a record that fails its check, after moving those before it.
        """
        record = RECORD + stem
        path = self.dir / f"{stem}{SUFFIX}"
        moved = 0
        known: dict[tuple[str, str], int] = {}

        def gone() -> bool:
            return not path.exists()  # deleted by a mover that moved all of it

        while True:
            found = queue._db.read(partial(record_of, name=record))
            after = int(found[0]) if found is not None else 0
            if after < 0:
                return moved, True, None  # a tombstone: moved in whole and deleted
            if self._budget is not None and self._budget <= 0:
                return moved, False, after  # the move's budget is spent: the rest next time
            data = read_from(path, after, MOVE_BYTES)
            if data is None:
                return moved, True, None
            entries, end, damaged = parse(data, after)
            if not entries and not damaged and first_size(data) > MOVE_BYTES:
                # One record longer than a chunk (a message near 32 KiB with its names).
                data = read_from(path, after, first_size(data))
                if data is None:
                    return moved, True, None
                entries, end, damaged = parse(data, after)
            if entries:
                done = queue._db.write(
                    partial(commit_chunk, queue, record, after, entries, known, gone)
                )
                if not done:
                    if done is None:
                        return moved, False, after
                    if not path.exists():
                        return moved, True, None
                    continue
                queue._note_destinations(known)
                moved += len(entries)
                if self._budget is not None:
                    self._budget -= end - after
            if journal is not None:
                journal.moved[stem] = max(journal.moved.get(stem, 0), end)
            if damaged:
                raise JournalDamaged(f"the journal {path} is damaged at offset {end}")
            if not entries or len(data) < MOVE_BYTES or end == after:
                return moved, True, end

    def _drop_logs(self, queue: SqliteQueue, stems: list[str]) -> None:
        """Delete journal files moved in whole, then mark their records deleted (in that
        order: a mover that read a record before finds no file, and takes nothing again).

        A record becomes a tombstone, the deletion's time negated, kept ``TOMBSTONE_KEEP``
        seconds: a look that opened the file before it was deleted (``spool_counts``) reads
        the record in its snapshot of the queue file, and a record simply gone would there
        mean "nothing moved yet" and count the moved messages again."""
        if queue.durability != "full":
            # What was moved must be durable in the queue before the file that held it goes.
            sync_wal(queue.path)
        for stem in stems:
            with contextlib.suppress(FileNotFoundError):
                (self.dir / f"{stem}{SUFFIX}").unlink()
        now = time.time()
        tombstone = -max(1, int(now))

        def mark(conn: sqlite3.Connection) -> None:
            conn.executemany(RECORD_SET, [(RECORD + stem, tombstone) for stem in stems])
            conn.execute(
                "DELETE FROM counters WHERE name LIKE 'spool:%' AND value < 0 AND value > ?",
                (-(now - TOMBSTONE_KEEP),),
            )

        queue._db.write(mark)

    def _move_journals(self, queue: SqliteQueue, logs: dict[str, list[tuple[int, str]]]) -> int:
        """Move other processes' journal files (``logs``: by owner, their generations and
        stems). A file is sealed once a newer generation exists or its owner is gone: moved
        in whole, it is deleted; a gone owner's cut-off last record is dropped with it."""
        moved = 0
        for owner, files in sorted(logs.items()):
            if owner == self._own_name:
                continue
            lock_path = self.dir / f"{owner}.lock"
            fd = owner_gone(lock_path)
            try:
                newest = max(gen for gen, _ in files)
                for gen, stem in sorted(files):
                    if stem + SUFFIX in self._bad:
                        continue
                    try:
                        more, room, end = self._move_log(queue, stem)
                    except QueueDiskFull:
                        return moved  # the queue file's disk: the records wait, whole
                    except (JournalDamaged, OSError) as exc:
                        self._bad.add(stem + SUFFIX)
                        logger.warning(
                            "the journal %s could not be moved into the queue (left as it is): %s",
                            self.dir / f"{stem}{SUFFIX}",
                            exc,
                        )
                        continue
                    moved += more
                    if end is None or not room or (fd == -1 and gen == newest):
                        continue
                    path = self.dir / f"{stem}{SUFFIX}"
                    try:
                        size = path.stat().st_size
                    except FileNotFoundError:
                        continue
                    if end < size:
                        if fd == -1:
                            continue  # sealed while we read: the rest is moved next time
                        logger.warning(
                            "dropped the last %d bytes of %s: a record its process was "
                            "killed while writing (that call never returned)",
                            size - end,
                            path,
                        )
                    self._drop_logs(queue, [stem])
                if fd != -1 and not self._owns_files(owner):
                    with contextlib.suppress(FileNotFoundError):
                        lock_path.unlink()
            finally:
                if fd >= 0:
                    os.close(fd)
        return moved

    def _owns_files(self, owner: str) -> bool:
        """Whether a spool or journal file of ``owner`` is still in the directory."""
        with os.scandir(self.dir) as entries:
            return any(
                e.name.startswith(owner + ".") and not e.name.endswith(".lock") for e in entries
            )
