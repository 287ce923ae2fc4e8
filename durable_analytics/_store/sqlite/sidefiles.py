"""The -wal and -shm deleted under open connections: detect it, and keep what was stored.

While any connection of this process is open on the queue, SQLite never removes its -wal
or -shm (only the last connection of all processes does, on close). A cleanup job or an
operator can: this process's connections then go on writing to the unlinked files, which
no other process sees, while a new process creates fresh ones; the commits in between are
lost, and two processes using two different -shm for one -wal overwrite each other's frames.

``SideFiles`` remembers the identity (st_dev, st_ino) of both files once a connection has
them open. The -shm is compared before every write: one ``stat`` relative to a directory
descriptor (cheaper than by full path), because a single write through a stale -shm can
overwrite another process's frames in the shared -wal. The -wal is compared before every
``CHECK_EVERY``-th write and at close: a write to an unlinked -wal harms no one else, and
the old connection still reads it, so ``restore`` keeps what was written meanwhile.
``restore`` then reads every pending message through the old connection (which still
reads its own, unlinked files), lets go of every connection of this queue object without a
checkpoint, reopens on the files now on disk and stores again each message missing there.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from .errors import log
from .probe import ro_uri
from .schema import INSERT

__all__ = ["SideFiles", "restore"]

Identity = tuple[int, int] | None

#: Compare the side files' identity before every this many writes (and at close).
CHECK_EVERY = 32


def _identity(name: str, dir_fd: int | None) -> Identity:
    try:
        st = os.stat(name, dir_fd=dir_fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class SideFiles:
    """The identity of the queue's -wal and -shm as this process's connections use them."""

    def __init__(self, path: Path, dir_fd: Callable[[], int]) -> None:
        self.names = (f"{path.name}-wal", f"{path.name}-shm")  # relative to the directory
        self._dir_fd = dir_fd
        self.known: tuple[Identity, Identity] | None = None
        self._countdown = CHECK_EVERY

    def _ids(self, which: slice) -> tuple[Identity, ...]:
        try:
            fd: int | None = self._dir_fd()
        except OSError:
            fd = None
        names = self.names if fd is not None else ()
        return tuple(_identity(n, fd) for n in names[which])

    def record(self) -> None:
        """Called once a first connection has the files open."""
        wal, shm = self._ids(slice(0, 2)) or (None, None)
        self.known = (wal, shm)

    def forget(self) -> None:
        self.known = None

    def changed(self, *, both: bool = False) -> str:
        """Which side file is no longer the one in use ("" when both still are): the -shm
        each time, the -wal every CHECK_EVERY-th time or with ``both``."""
        known = self.known
        if known is None:
            return ""
        self._countdown -= 1
        shm = known[1]
        if not both and self._countdown > 0 and shm is not None:
            # The usual case, before every append: one stat of the -shm, found unchanged.
            # Anything else (not there, another file, no directory) is decided below.
            try:
                st = os.stat(self.names[1], dir_fd=self._dir_fd())
                if st.st_ino == shm[1] and st.st_dev == shm[0]:
                    return ""
            except OSError:
                pass
        if both or self._countdown <= 0:
            self._countdown = CHECK_EVERY
            now = self._ids(slice(0, 2))
        else:
            now = (known[0], *self._ids(slice(1, 2)))
        if len(now) != 2:
            return ""  # the directory cannot be opened: nothing to compare
        gone = [n for n, was, is_ in zip(self.names, known, now, strict=True) if was and is_ != was]
        return " and ".join(gone)


def restore(
    path: Path,
    what: str,
    old: sqlite3.Connection,
    close_all: Callable[[], None],
    reopen: Callable[[], sqlite3.Connection],
) -> int:
    """Move to the files now on disk, storing again what only the old connection still sees.

    Returns how many messages were stored again. Their ids change; a message another
    process delivered meanwhile may be sent twice, none is lost.
    """
    rows = old.execute(
        "SELECT d.id, d.host, d.write_key, m.body, m.size, m.enqueued_at "
        "FROM messages m JOIN destinations d ON d.id = m.dest ORDER BY m.id"
    ).fetchall()
    dests = old.execute("SELECT id, host, write_key FROM destinations").fetchall()
    # While the keeper (read-only, it never checkpoints) is open, closing the old connections
    # cannot checkpoint the unlinked -wal into the main file: they are not the last.
    keeper = sqlite3.connect(ro_uri(path), uri=True, timeout=5.0)
    try:
        with contextlib.suppress(sqlite3.Error):
            keeper.execute("SELECT count(*) FROM sqlite_master").fetchall()
        close_all()
    finally:
        keeper.close()
    conn = reopen()
    present = {bytes(b) for (b,) in conn.execute("SELECT body FROM messages")}
    missing = [r for r in rows if bytes(r[3]) not in present]
    conn.execute("BEGIN IMMEDIATE")
    try:
        ids: dict[tuple[str, str], int] = {
            (h, k): int(i)
            for i, h, k in conn.execute("SELECT id, host, write_key FROM destinations")
        }
        taken = set(ids.values())
        for dest_id, host, key in dests:
            if (host, key) not in ids:
                # The same id when it is free: this process's queue object caches it.
                new_id = dest_id if dest_id not in taken else None
                cur = conn.execute(
                    "INSERT INTO destinations (id, host, write_key) VALUES (?, ?, ?)",
                    (new_id, host, key),
                )
                ids[(host, key)] = int(cur.lastrowid or 0)
                taken.add(ids[(host, key)])
        for _, host, key, body, size, when in missing:
            conn.execute(INSERT, (ids[(host, key)], body, size, when))
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    log.warning(
        "the queue's %s beside %s was deleted or replaced while this process had it open "
        "(a cleanup job?); reopened the queue on the files now on disk and stored again "
        "%d messages that only this process still saw",
        what,
        path,
        len(missing),
    )
    return len(missing)
