"""The queue file on disk: a private directory, 0600 files, no symlinks, space on a full disk."""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import sqlite3
import stat
from pathlib import Path

from durable_analytics.exceptions import QueueDiskFull, QueuePermissionError


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parent 0700, whatever the umask."""
    missing: list[Path] = []
    d = directory
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # another process created it first
        os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask


def prepare_path(path: Path) -> None:
    """Create the directory 0700 and the file 0600; refuse symlinks and unsafe directories.

    An existing file more permissive than 0600 is narrowed by ``narrow_modes`` once it has
    proved to be a queue: a foreign file is left untouched.
    """
    parent = path.parent
    if not parent.exists():
        try:
            make_private_dirs(parent)
        except OSError as exc:
            raise QueuePermissionError(
                f"cannot create the queue directory {parent}: {exc.strerror}"
            ) from None
    try:
        pst = os.stat(parent)
    except OSError as exc:
        raise QueuePermissionError(f"cannot use the queue directory {parent}: {exc}") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise QueuePermissionError(f"the queue directory {parent} is not a directory")
    # What the path itself is comes first: for a directory or a symlink, advice about the
    # directory it sits in would be beside the point.
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise QueuePermissionError(f"cannot use the queue file {path}: {exc.strerror}") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise QueuePermissionError(f"the queue path {path} is a symlink; refusing to follow it")
        if stat.S_ISDIR(st.st_mode):
            raise QueuePermissionError(
                f"the queue path {path} is a directory, not a regular file; name a file "
                f"inside it, e.g. {shlex.quote(str(path / 'queue.sqlite3'))}"
            )
        if not stat.S_ISREG(st.st_mode):
            raise QueuePermissionError(f"the queue path {path} is not a regular file")
    if pst.st_mode & stat.S_IWOTH:
        raise QueuePermissionError(shared_directory_message(path, pst))
    check_directory_owner(parent, pst)
    if st is None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass  # another process created it first
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise QueueDiskFull(
                    f"cannot create the queue file {path}: the disk is full"
                ) from None
            raise QueuePermissionError(
                f"cannot create the queue file {path}: {exc.strerror}"
            ) from None
        else:
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
    for name in (str(path), f"{path}-wal", f"{path}-shm"):
        check_file_owner(Path(name))
    if read_only_fs(parent):
        raise QueuePermissionError(
            f"the queue file {path} is on a read-only file system; point queue_path at a "
            "writable directory"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        raise QueuePermissionError(f"the queue file {path} is not readable and writable")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QueuePermissionError(
            f"the queue directory {parent} is not writable (SQLite creates -wal and -shm files "
            "beside the queue)"
        )


def shared_directory_message(path: Path, st: os.stat_result) -> str:
    """Why a queue is refused in a directory other users can write, and where to put it.

    Such a directory is shared (``/tmp``, ``/var/tmp``, a team's drop folder): narrowing its
    mode would break everyone else who uses it, so the advice is a private directory of
    one's own inside it. Only a directory of this user's that is not sticky (so most likely
    widened by mistake) also gets the ``chmod`` that narrows it.
    """
    parent = path.parent
    mode = stat.S_IMODE(st.st_mode)
    sticky = bool(mode & stat.S_ISVTX)
    risk = (
        "could create files under the queue's names before it does"
        if sticky
        else "could replace the queue file"
    )
    private = parent / "myapp"
    advice = (
        f"keep the queue in a private directory instead, e.g. mkdir -m 700 "
        f"{shlex.quote(str(private))} and put the queue there "
        f"({shlex.quote(str(private / path.name))})"
    )
    if not sticky and st.st_uid == os.geteuid():
        advice += f"; or, if no one else uses {parent}: chmod o-w {shlex.quote(str(parent))}"
    return (
        f"the queue directory {parent} (mode {mode:04o}) is writable by other users, who "
        f"{risk}; {advice}"
    )


def _who(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def check_directory_owner(directory: Path, st: os.stat_result) -> None:
    """Refuse a queue directory another user controls, as ssh and gpg do.

    Its owner (or, when it is group-writable, its group) could rename a queue file of
    theirs into place or read ours: a directory must belong to this process's effective
    user, or to root and then not be group-writable.
    """
    euid = os.geteuid()
    where = shlex.quote(str(directory))
    if st.st_uid not in (euid, 0):
        raise QueuePermissionError(
            f"the queue directory {directory} belongs to {_who(st.st_uid)}, not to this "
            f"process's user ({_who(euid)}) or root: its owner could read or replace the queue; "
            f"use a directory of your own, or if it is yours: chown {euid} {where} && "
            f"chmod 700 {where}"
        )
    if st.st_uid != euid and st.st_mode & stat.S_IWGRP:
        raise QueuePermissionError(
            f"the queue directory {directory} belongs to root and is group-writable: the "
            f"group's members could replace the queue file; use a directory of your own, "
            f"or: chmod g-w {where}"
        )


def check_spool_directory(directory: Path) -> None:
    """Refuse a spool directory (``<queue>.spool``) as ``prepare_path`` refuses the queue's:
    a symlink, not a directory, writable by other users, or another user's.

    Whoever can write there can delete a journal before it is moved (the calls in it,
    which returned, are lost) or plant one that a mover delivers to the host and write key
    its records name. ``QueuePermissionError`` says which and what to do.
    """
    try:
        st = os.lstat(directory)
    except OSError as exc:
        raise QueuePermissionError(
            f"cannot use the spool directory {directory}: {exc.strerror}"
        ) from None
    if stat.S_ISLNK(st.st_mode):
        raise QueuePermissionError(
            f"the spool directory {directory} is a symlink; refusing to follow it"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise QueuePermissionError(f"the spool directory {directory} is not a directory")
    if st.st_mode & stat.S_IWOTH:
        advice = f"; chmod 700 {shlex.quote(str(directory))}" if st.st_uid == os.geteuid() else ""
        raise QueuePermissionError(
            f"the spool directory {directory} (mode {stat.S_IMODE(st.st_mode):04o}) is "
            f"writable by other users: they could delete or plant the calls kept there{advice}"
        )
    check_directory_owner(directory, st)


def check_file_owner(path: Path) -> None:
    """Refuse a queue file (or its -wal / -shm) that another user created.

    A file planted by another user keeps its owner's access whatever its mode says (its
    owner can chmod it back at any time): the write key and the messages would be theirs
    to read.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return
    euid = os.geteuid()
    if st.st_uid != euid:
        where = shlex.quote(str(path))
        raise QueuePermissionError(
            f"the queue file {path} belongs to {_who(st.st_uid)}, not to this process's user "
            f"({_who(euid)}): another user may have planted it to read what is queued; "
            f"remove it (rm {where}), or if it is yours: chown {euid} {where} && chmod 600 {where}"
        )


def narrow_modes(path: Path) -> None:
    """Make the queue file and its -wal and -shm files 0600 (SQLite copies the file's mode)."""
    for name in (str(path), f"{path}-wal", f"{path}-shm"):
        try:
            st = os.lstat(name)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077 and st.st_uid == os.getuid():
                os.chmod(name, 0o600)
        except OSError:
            continue


def read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def wal_checkpoint(
    conn: sqlite3.Connection, mode: str, wait_ms: int = 0
) -> tuple[int, int, int] | None:
    """``PRAGMA wal_checkpoint(mode)``: (busy, frames in the log, frames copied), or None.

    ``wait_ms``: how long SQLite may wait for a writer (or a reader, for RESTART and
    TRUNCATE) before it gives up; the connection waits for nobody again afterwards.
    """
    try:
        try:
            # Inside: a signal handler raising right after it still finds the reset below.
            if wait_ms:
                conn.execute(f"PRAGMA busy_timeout={int(wait_ms)}")
            busy, log, done = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        finally:
            if wait_ms:
                conn.execute("PRAGMA busy_timeout=0")
    except sqlite3.Error:
        return None
    return int(busy), int(log), int(done)


def checkpoint_for_space(conn: sqlite3.Connection, mode: str = "TRUNCATE") -> bool:
    """After SQLITE_FULL: copy the -wal into the main file and truncate it, once.

    The -wal grows to about 4 MB before SQLite checkpoints it on its own; on a nearly full
    disk that is where the space goes (on a 2 MB file system, 75 KB of messages filled it).
    A checkpoint gives it back, so the call can be tried once more. True when it completed
    (no reader held an older snapshot).
    """
    result = wal_checkpoint(conn, mode)
    return result is not None and not result[0]


def sync_wal(path: Path) -> None:
    """Make every commit in the ``-wal`` of ``path`` durable (an fsync; none if there is no
    ``-wal``)."""
    with contextlib.suppress(OSError):
        fd = os.open(f"{path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
