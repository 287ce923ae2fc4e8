"""The durable queue: one SQLite file shared by any number of threads and processes.

Every write is one explicit transaction; ``append`` returns only after its COMMIT. A
flusher ``lease``\\ s the oldest ready messages of one destination (host + write key), and
then ``ack``\\ s (deletes) them after a 2xx, ``release``\\ s them with a ``not_before`` for a
retry, or ``dead_letter``\\ s the ones the server rejected. Every one of those is fenced by
the lease token, so a holder whose lease expired and was taken over cannot touch the batch.

A lease names its holder (boot id, pid namespace, pid and process start time). A lease is
over when its holder is provably gone (same boot and pid namespace, and that process no
longer exists) or when ``lease_timeout`` has passed on the system's monotonic clock, so a
wall-clock jump neither steals a live lease nor keeps a dead one forever.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import sqlite3
import stat
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from ._salvage import (
    _FOREIGN_WAL,
    _PURGED_COUNTER,
    _RAW_LOCK,
    _RECOVER_LOCK_SECONDS,
    _SALVAGE_SECONDS,
    _SQLITE_BUSY,
    _SQLITE_CANTOPEN,
    _SQLITE_CORRUPT,
    _SQLITE_FULL,
    _SQLITE_IOERR,
    _SQLITE_LOCKED,
    _SQLITE_NOTADB,
    _SQLITE_READONLY,
    RecoveryReport,
    _copy_aside,
    _Damaged,
    _deadline_handler,
    _directory_lock,
    _errorcode,
    _fsync_dir,
    _Probe,
    _probe,
    _probe_header,
    _quarantine_name,
    _read_header,
    _ro_uri,
    _Salvage,
    _SinkFailed,
    _summary,
    log,
)
from ._store.base import (
    CLOCK_JUMP_MARGIN,
    MAX_BACKOFF_SECONDS,
    DeadLetter,
    Destination,
    DestinationStats,
    Lease,
    QueueStats,
)
from .exceptions import (
    QueueBusy,
    QueueCorrupt,
    QueueDiskFull,
    QueueError,
    QueuePermissionError,
    QueueVersionError,
)

__all__ = [
    "MAX_BACKOFF_SECONDS",
    "SCHEMA_VERSION",
    "DeadLetter",
    "Destination",
    "DestinationStats",
    "Lease",
    "Queue",
    "QueueStats",
    "RecoveryReport",
]

SCHEMA_VERSION = 1

_CLOCK_JUMP_MARGIN = CLOCK_JUMP_MARGIN

# Rough per-row overhead of a message in its B-tree page, for the in-process size estimate.
_ROW_OVERHEAD = 48
# How many bytes a process may append on its estimate before re-reading the real size,
# and how close to the cap it switches to reading the real size before every append.
_REFRESH_BYTES = 256 * 1024
_EXACT_ZONE = 2 * 1024 * 1024
# Below this much free disk space the -wal is kept small and appends stop _DISK_RESERVE short
# of full (Queue._low_disk).
_LOW_DISK_BYTES = 8 * 1024 * 1024
_LOW_DISK_CHECKPOINT = 32
_DISK_RESERVE = 512 * 1024


_SCHEMA_V1 = """
CREATE TABLE destinations (
    id INTEGER PRIMARY KEY,
    host TEXT NOT NULL,
    write_key TEXT NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_error_at REAL,
    UNIQUE (host, write_key)
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    dest INTEGER NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    enqueued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL
);
CREATE TABLE leases (
    token TEXT PRIMARY KEY,
    dest INTEGER NOT NULL,
    ids TEXT NOT NULL,
    count INTEGER NOT NULL,
    boot TEXT NOT NULL,
    pidns INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    pstart INTEGER NOT NULL,
    mono_expires REAL NOT NULL,
    wall_expires REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY,
    dest INTEGER NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    enqueued_at REAL NOT NULL,
    dead_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    status INTEGER,
    reason TEXT NOT NULL,
    excerpt TEXT NOT NULL DEFAULT ''
);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO counters (name, value) VALUES ('dropped_newest', 0), ('dropped_oldest', 0);
"""

# Migrations from version N to N + 1, applied in one transaction each.
_MIGRATIONS: dict[int, str] = {0: _SCHEMA_V1}

_INSERT = "INSERT INTO messages (dest, body, size, enqueued_at) VALUES (?, ?, ?, ?)"
# Writes nothing (and so costs no page) unless the destination has a backoff to forget.
_CLEAR_BACKOFF = (
    "UPDATE destinations SET not_before = 0, failures = 0 "
    "WHERE id = ? AND (failures != 0 OR not_before != 0)"
)


def _checkpoint_for_space(conn: sqlite3.Connection, mode: str = "TRUNCATE") -> bool:
    """After SQLITE_FULL: copy the -wal into the main file and truncate it, once.

    The -wal grows to about 4 MB before SQLite checkpoints it on its own; on a nearly full
    disk that is where the space goes (on a 2 MB file system, 75 KB of messages filled it).
    A checkpoint gives it back, so the call can be tried once more. True when it completed
    (no reader held an older snapshot).
    """
    try:
        busy, _, _ = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    except sqlite3.Error:
        return False
    return not busy


def _apply_migrations(conn: sqlite3.Connection, version: int) -> None:
    """Bring a file from ``version`` to SCHEMA_VERSION (inside the caller's transaction)."""
    while version < SCHEMA_VERSION:
        for statement in _MIGRATIONS[version].split(";"):
            if statement.strip():
                conn.execute(statement)
        version += 1
        conn.execute(f"PRAGMA user_version={version}")


def _stamp_application_id(conn: sqlite3.Connection, app_id: int = 0) -> None:
    """Give the file a random application_id, once (inside the caller's transaction).

    It identifies this very file: a -wal whose page 1 carries another id belongs to another
    database (see ``Queue._diagnose``).
    """
    if not conn.execute("PRAGMA application_id").fetchone()[0]:
        value = app_id if 0 < app_id <= 0x7FFFFFFF else (uuid.uuid4().int & 0x7FFFFFFF) or 1
        conn.execute(f"PRAGMA application_id={value}")


T = TypeVar("T")


# --------------------------------------------------------------------------- holder identity


def _read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid``, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return -1  # exists but unreadable: treat as alive
    fields = data[data.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


@dataclass(frozen=True)
class _Holder:
    boot: str
    pidns: int
    pid: int
    start: int


_BOOT_ID = _read_boot_id()
_holder_cache: _Holder | None = None


def _holder() -> _Holder:
    global _holder_cache  # noqa: PLW0603 - per-process identity, reset after fork
    cached = _holder_cache
    if cached is None or cached.pid != os.getpid():
        pid = os.getpid()
        cached = _Holder(_BOOT_ID, _pid_namespace(), pid, _process_start(pid) or 0)
        _holder_cache = cached
    return cached


def _holder_gone(boot: str, pidns: int, pid: int, pstart: int) -> bool:
    """True only when the lease holder provably no longer exists."""
    me = _holder()
    if not boot or not me.boot:
        return False
    if boot != me.boot:
        return True  # the machine rebooted since: no process of that boot survives
    if pidns != me.pidns or pidns == 0:
        return False  # another pid namespace: its pids mean nothing here
    start = _process_start(pid)
    return start is None or start not in (-1, pstart)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- file set-up


def _make_private_dirs(directory: Path) -> None:
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


def _prepare_path(path: Path) -> None:
    """Create the directory 0700 and the file 0600; refuse symlinks and unsafe directories.

    An existing file more permissive than 0600 is narrowed by ``_narrow_modes`` once it has
    proved to be a queue: a foreign file is left untouched.
    """
    parent = path.parent
    if not parent.exists():
        try:
            _make_private_dirs(parent)
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
    if pst.st_mode & stat.S_IWOTH:
        raise QueuePermissionError(
            f"the queue directory {parent} is writable by other users, who could replace the "
            "queue file; use a private directory (mode 0700)"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise QueuePermissionError(f"cannot use the queue file {path}: {exc.strerror}") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise QueuePermissionError(f"the queue path {path} is a symlink; refusing to follow it")
        if not stat.S_ISREG(st.st_mode):
            raise QueuePermissionError(f"the queue path {path} is not a regular file")
    else:
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
    if _read_only_fs(parent):
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


def _narrow_modes(path: Path) -> None:
    """Make the queue file and its -wal and -shm files 0600 (SQLite copies the file's mode)."""
    for name in (str(path), f"{path}-wal", f"{path}-shm"):
        try:
            st = os.lstat(name)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077 and st.st_uid == os.getuid():
                os.chmod(name, 0o600)
        except OSError:
            continue


def _disk_nearly_full(path: Path, below: int = 1 << 20) -> bool:
    """Whether the file system of ``path`` has less than ``below`` bytes free (SQLite reports
    a full disk as an I/O error when it cannot create or grow its -shm file)."""
    try:
        return shutil.disk_usage(path.parent).free < below
    except OSError:
        return False


def _read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _translate(exc: sqlite3.Error, path: Path) -> QueueError:
    """Turn an sqlite3 error into the documented QueueError subclass."""
    code = _errorcode(exc)
    if code == _SQLITE_FULL or (code == _SQLITE_IOERR and _disk_nearly_full(path)):
        return QueueDiskFull(
            f"the disk holding the queue {path} is full; the message was not stored"
        )
    if code in (_SQLITE_NOTADB, _SQLITE_CORRUPT):
        return QueueCorrupt(f"the queue file {path} is not a valid durable-analytics queue ({exc})")
    if code in (_SQLITE_READONLY, _SQLITE_CANTOPEN):
        return QueuePermissionError(f"the queue file {path} cannot be written ({exc})")
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return QueueBusy(f"the queue {path} stayed locked by another connection ({exc})")
    return QueueError(f"queue {path}: {exc}")


# --------------------------------------------------------------------------- the queue

_queues: weakref.WeakSet[Queue] = weakref.WeakSet()
_abandoned: list[object] = []  # connections inherited over fork: never used, never closed

#: How long ``fork()`` waits for this process's queue operations in flight to finish so that
#: it can close the connections first (see ``Queue._close_for_fork``).
_FORK_WAIT = 5.0


class _Connection(sqlite3.Connection):
    """An ``sqlite3.Connection`` a Queue can reference weakly, to close it before ``fork()``."""


_raw_lock_held_for_fork = False


def _before_fork() -> None:
    global _raw_lock_held_for_fork  # noqa: PLW0603
    for queue in list(_queues):
        queue._close_for_fork()
    _raw_lock_held_for_fork = _RAW_LOCK.acquire(timeout=_FORK_WAIT)


def _after_fork_in_parent() -> None:
    global _raw_lock_held_for_fork  # noqa: PLW0603
    if _raw_lock_held_for_fork:
        _raw_lock_held_for_fork = False
        _RAW_LOCK.release()
    for queue in list(_queues):
        queue._resume_after_fork()


def _after_fork_in_child() -> None:
    global _holder_cache, _RAW_LOCK, _raw_lock_held_for_fork  # noqa: PLW0603
    _holder_cache = None
    _RAW_LOCK = threading.RLock()
    _raw_lock_held_for_fork = False
    for queue in list(_queues):
        queue._forget_connections()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


class Queue:
    """A durable message queue in one SQLite file, shared by threads and processes.

    ``durability="normal"`` (WAL, synchronous=NORMAL) survives the crash or kill of any
    process; ``"full"`` (synchronous=FULL) also survives power loss, at one fsync per append.

    ``recover=True`` (what the Client uses): a damaged queue file (truncated, bytes flipped,
    not an SQLite file, a -wal of another database) is copied aside as
    ``<name>.corrupt-<UTC time>`` (0600, with its -wal and -shm), the readable messages are
    salvaged into a fresh queue at the same path, a warning is logged and the call goes on
    (``last_recovery`` says what happened). Detected at open, and when an operation meets
    SQLite's "malformed" / "not a database" errors. ``recover=False`` (the default, and the
    CLI's): ``QueueCorrupt`` is raised and nothing is written. A file of a newer schema
    version is never treated as damaged (``QueueVersionError``), nor is an intact SQLite
    database of another application (``QueueCorrupt``, untouched either way).

    ``max_queue_bytes`` caps the whole file (pages in use); dead letters may take at most
    ``max_dead_letter_bytes`` of it (default a tenth): past that, while the file is near the
    cap, the oldest dead letters are purged (counted, and logged).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Literal["normal", "full"] = "normal",
        max_queue_bytes: int = 1 << 30,
        overflow: Literal["drop_newest", "drop_oldest"] = "drop_newest",
        lease_timeout: float = 60.0,
        busy_timeout: float = 30.0,
        recover: bool = False,
        max_dead_letter_bytes: int | None = None,
    ) -> None:
        self.path = Path(os.fspath(path)).expanduser().absolute()
        self.durability = durability
        self.max_queue_bytes = max_queue_bytes
        self.overflow = overflow
        self.lease_timeout = lease_timeout
        self.busy_timeout = busy_timeout
        self.recover = recover
        self.max_dead_letter_bytes = (
            max_queue_bytes // 10 if max_dead_letter_bytes is None else max_dead_letter_bytes
        )
        #: What the last recovery of a damaged file did (None: there was none).
        self.last_recovery: RecoveryReport | None = None
        self._healthy_at = -1e9  # when a full check last found the file healthy
        self._dead_since_check = 1  # dead-letter bytes added since their last measure
        self._low_appends = 0  # appends made while the disk was nearly full
        self._recovering = False  # connections of _recover are open on the file
        self._real = os.path.realpath(self.path)
        self._dead_trimmed_at = -1e9  # when dead letters were last measured against their bound
        self._local = threading.local()
        # One writer at a time inside this process: SQLite allows one anyway, and waiting on
        # a Python lock is far cheaper than SQLite's sleep-and-retry between our own threads.
        # Readers take the read lock. A thread takes its connection only under one of them,
        # so that fork() can close every connection while it holds both.
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._conns: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._conns_lock = threading.Lock()
        self._fork_held = False
        self._dest_cache: dict[tuple[str, str], int] = {}
        self._est_used = 0
        self._since_refresh = _REFRESH_BYTES  # read the real size on the first append
        self._page_size = 4096
        self._closed = False
        _prepare_path(self.path)
        _queues.add(self)
        self._open_file()
        _narrow_modes(self.path)  # it proved to be a queue: only now touch its mode

    # ---------------------------------------------------------------- damaged files

    def _open_file(self) -> None:
        """Open and check the file; with ``recover``, replace a damaged one first."""
        for _ in range(3):
            try:
                self._preflight()
                with self._read_lock:
                    conn = self._conn()
                    try:
                        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
                        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
                    except sqlite3.Error as exc:
                        raise _translate(exc, self.path) from None
                if not app_id:
                    self._write(_stamp_application_id)
                return
            except _Damaged as exc:
                damage = exc
            except QueueCorrupt:
                found = self._diagnose(thorough=True)
                if not isinstance(found, _Damaged):
                    raise  # an intact database of another application: not ours to move
                damage = found
            self._close_connections()
            if not self.recover:
                raise QueueCorrupt(self._damaged_message(damage)) from None
            self._recover(damage)
        raise QueueCorrupt(f"the queue file {self.path} stayed damaged after recovery")

    def _damaged_message(self, damage: _Damaged) -> str:
        return (
            f"the queue file {self.path} is not a valid durable-analytics queue: it is damaged "
            f"({damage.reason}); a Client moves it aside and salvages what it can"
        )

    def _preflight(self) -> None:
        """The cheap check at open: the raw header, and the -wal against the main file."""
        with _RAW_LOCK:
            probe = _probe(self.path, raw=self._raw_allowed())
        if probe.user_version > SCHEMA_VERSION or not probe.size:
            return  # newer: QueueVersionError comes from the open; empty: a new queue
        # Read-only first: a read-write connection to a damaged file would create its -wal,
        # and its close could checkpoint a foreign -wal into the main file.
        damage = self._diagnose(thorough=bool(probe.suspicious), probe=probe)
        if damage == "foreign":
            self._check_version(0, 1)  # raises QueueCorrupt: another application's database
        if isinstance(damage, _Damaged):
            raise damage

    def _diagnose(
        self, *, thorough: bool, probe: _Probe | None = None
    ) -> _Damaged | Literal["foreign"] | None:
        """What is wrong with the file: None when it is healthy (or newer), ``"foreign"`` for
        an intact database of another application, else why it is damaged.

        Reads through a read-only connection, which never checkpoints on close: a -wal of
        another database must not be copied into the main file by merely looking at it.
        """
        if probe is None:
            with _RAW_LOCK:
                probe = _probe(self.path, raw=self._raw_allowed())
        if probe.user_version > SCHEMA_VERSION or not (probe.size or probe.wal_size):
            return None
        with _RAW_LOCK:
            # With no -wal nor -shm no process has the file open: read it as immutable, which
            # creates no file beside it (a plain read-only connection would create the -wal).
            # An immutable connection closes its descriptor at once, so only while no
            # connection of this process is open on the file (see _RAW_LOCK).
            if self._raw_allowed() and not any(
                os.path.lexists(f"{self.path}{s}") for s in ("-wal", "-shm")
            ):
                return self._diagnose_with(probe, thorough, main_only=True)
        return self._diagnose_with(probe, thorough, main_only=False)

    def _diagnose_with(
        self, probe: _Probe, thorough: bool, *, main_only: bool
    ) -> _Damaged | Literal["foreign"] | None:
        try:
            ro = sqlite3.connect(
                _ro_uri(self.path, main_only=main_only), uri=True, timeout=self.busy_timeout
            )
        except sqlite3.Error:
            return None
        try:
            return self._verdict(ro, probe, thorough)
        except sqlite3.DatabaseError as exc:
            if _errorcode(exc) not in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                return None
            detail = f"not an SQLite database: {probe.notadb}" if probe.notadb else str(exc)
            return _Damaged(detail)
        finally:
            ro.close()

    def _raw_allowed(self) -> bool:
        """Whether no connection of this process is open on the file (under _RAW_LOCK)."""
        for queue in list(_queues):
            if queue._real == self._real and (queue._conns or queue._recovering):
                return False
        return True

    def _verdict(
        self, ro: sqlite3.Connection, probe: _Probe, thorough: bool
    ) -> _Damaged | Literal["foreign"] | None:
        ro.set_progress_handler(_deadline_handler(time.monotonic() + _SALVAGE_SECONDS), 10_000)
        version, tables, app_id = ro.execute(
            "SELECT (SELECT user_version FROM pragma_user_version), "
            "(SELECT count(*) FROM sqlite_master WHERE type = 'table'), "
            "(SELECT application_id FROM pragma_application_id)"
        ).fetchone()
        if (probe.app_id and app_id != probe.app_id) or version < probe.user_version:
            return _Damaged(_FOREIGN_WAL, main_only=True)
        if version > SCHEMA_VERSION:
            return None  # newer: never treated as damaged
        if version == 0 and tables:
            return "foreign"
        if thorough or probe.notadb:
            # A main file whose header is not SQLite's, read fine through the -wal, is one a
            # recovery rewrote that no checkpoint has reached yet.
            rows = ro.execute("PRAGMA quick_check").fetchall()
            if [tuple(r) for r in rows] != [("ok",)]:
                return _Damaged(f"PRAGMA quick_check: {_summary(rows)}")
            self._healthy_at = time.monotonic()
        return None

    def _recover_from(self, error: QueueCorrupt) -> bool:
        """After an operation met a damaged file: recover it; True when a retry makes sense."""
        if not self.recover or self._closed:
            return False
        if time.monotonic() - self._healthy_at < 30.0:
            return False  # a full check just found the file sound: this error is another kind
        return self._recover(None, error=str(error))

    def _recover(self, damage: _Damaged | None, *, error: str = "") -> bool:
        """Set the damaged file aside, salvage it into a fresh queue at the same path.

        With every operation of this process paused (both locks) and recoveries of other
        processes excluded (a flock on the directory), the file is checked again: another
        process may have recovered it meanwhile. The damaged files are copied (not moved)
        to ``<name>.corrupt-<time>``; the salvage reads that copy. Then the fresh content
        replaces the old one through SQLite's backup API, inside the same file, so that every
        connection (other processes' too) moves to it safely: renaming a database that other
        connections still use would let the last of them delete the new file's -wal and
        -shm by name. Only a file SQLite cannot lock at all (not an SQLite file) is replaced
        by a rename.
        """
        started = time.monotonic()
        deadline = started + _SALVAGE_SECONDS
        self._recovering = True
        try:
            return self._recover_locked(damage, error, started, deadline)
        finally:
            self._recovering = False

    def _recover_locked(
        self, damage: _Damaged | None, error: str, started: float, deadline: float
    ) -> bool:
        with (
            self._write_lock,
            self._read_lock,
            _directory_lock(self.path.parent, _RECOVER_LOCK_SECONDS),
            contextlib.closing(self._keeper()),
        ):
            live: sqlite3.Connection | None = None
            try:
                live = sqlite3.connect(str(self.path), isolation_level=None, timeout=0)
                live.execute("PRAGMA writable_schema=ON")  # lock even if the header lies
                self._retry(lambda: live.execute("BEGIN IMMEDIATE") if live else None)
            except (sqlite3.Error, QueueCorrupt):
                if live is not None:
                    live.close()
                live = None  # SQLite cannot lock it: not an SQLite file
            # Now no other process can commit: the files stay as they are while copied.
            found = self._diagnose(thorough=True)
            foreign_wal = damage is not None and damage.main_only
            if not isinstance(found, _Damaged) and not foreign_wal:
                if live is not None:
                    live.close()
                return bool(error) and found is None  # healthy now (recovered meanwhile)
            moved = _quarantine_name(self.path)
            tmp = self.path.with_name(
                f"{self.path.name}.recover-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            )
            try:
                extra = _copy_aside(self.path, moved)
                if not isinstance(found, _Damaged):
                    # A foreign -wal is told by the main file's own header, which this
                    # process may no longer read in place (see _RAW_LOCK): read the copy's.
                    size, raw = _read_header(moved)
                    wal = moved.with_name(moved.name + "-wal")
                    wal_size = wal.stat().st_size if wal.exists() else 0
                    found = self._diagnose(thorough=False, probe=_probe_header(size, wal_size, raw))
                    if not isinstance(found, _Damaged):  # another process recovered it
                        for suffix in ("", "-wal", "-shm"):
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(f"{moved}{suffix}")
                        return bool(error) and found is None
                damage = found
                _fsync_dir(self.path.parent)
                salvage = self._build_fresh(tmp, moved, damage, deadline)
                if live is not None:
                    live.execute("ROLLBACK")
                    self._replace_in_place(tmp, live, deadline)
                else:
                    self._close_connections()
                    for suffix in ("-wal", "-shm"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(f"{self.path}{suffix}")
                    os.rename(tmp, self.path)
                    _fsync_dir(self.path.parent)
            finally:
                if live is not None:
                    live.close()
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{tmp}{suffix}")
            self._since_refresh = _REFRESH_BYTES
            self._est_used = 0
        report = RecoveryReport(
            moved_to=moved,
            reason=damage.reason,
            messages=salvage.messages,
            dead_letters=salvage.dead_letters,
            unreadable=salvage.unreadable,
            unroutable=salvage.unroutable,
            seconds=round(time.monotonic() - started, 3),
        )
        self.last_recovery = report
        log.warning(
            "the queue file %s was damaged (%s); moved it aside to %s%s and started a fresh "
            "queue; salvaged %d messages and %d dead letters "
            "(%d unreadable rows or pages, %d messages without a readable destination, left "
            "in the moved file) in %.1f s",
            self.path,
            damage.reason,
            moved,
            f" (with its {' and '.join(extra)})" if extra else "",
            report.messages,
            report.dead_letters,
            report.unreadable,
            report.unroutable,
            report.seconds,
        )
        return True

    def _keeper(self) -> sqlite3.Connection:
        """A read-only connection that has read the file, held open during a recovery.

        While it is open no other connection of this process can checkpoint on close (it
        cannot get the exclusive lock), and it never checkpoints itself: so closing this
        process's connections never writes a foreign -wal into the main file.
        """
        keeper = sqlite3.connect(_ro_uri(self.path), uri=True, timeout=self.busy_timeout)
        with contextlib.suppress(sqlite3.Error):
            keeper.execute("SELECT count(*) FROM sqlite_master").fetchall()
        return keeper

    def _build_fresh(self, tmp: Path, source: Path, damage: _Damaged, deadline: float) -> _Salvage:
        """Create a fresh queue file at ``tmp`` holding what ``source`` still has."""
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)
        size, raw = _read_header(source)  # the copy: no connection of ours uses it
        header = _probe_header(size, 0, raw)
        page_size = header.page_size or self._page_size
        conn = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            conn.execute(f"PRAGMA page_size={int(page_size)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")  # a private file, fsynced once at the end
            conn.execute("BEGIN IMMEDIATE")
            _apply_migrations(conn, 0)
            # The same application_id as the file it replaces in place: the main file keeps
            # the old header until a checkpoint, and must not look foreign to its -wal.
            _stamp_application_id(conn, header.app_id)
            salvage = _Salvage(source, conn, deadline)
            salvage.add_known_destinations(self._dest_cache)
            try:
                salvage.run(main_only=damage.main_only)
            except _SinkFailed as exc:
                raise _translate(exc.args[0], self.path) from None
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None
        finally:
            conn.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return salvage

    def _replace_in_place(self, tmp: Path, live: sqlite3.Connection, deadline: float) -> None:
        """Write the content of ``tmp`` over the live file, as one SQLite transaction."""
        src = sqlite3.connect(str(tmp))

        def give_up(status: int, remaining: int, total: int) -> None:
            if time.monotonic() > deadline:
                raise QueueBusy(f"the queue {self.path} stayed locked during its recovery")

        try:
            src.backup(live, pages=-1, progress=give_up, sleep=0.001)
            # Bring the main file up to date now if no reader holds an older snapshot.
            with contextlib.suppress(sqlite3.Error):
                live.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None
        finally:
            src.close()

    def _close_connections(self) -> None:
        """Close every connection of this process to the file (callers hold both locks, or
        are the only user: the constructor)."""
        with self._conns_lock:
            conns = list(self._conns)
            self._conns = weakref.WeakSet()
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    # ---------------------------------------------------------------- connections

    def __repr__(self) -> str:
        return f"Queue({str(self.path)!r}, durability={self.durability!r})"

    def _close_for_fork(self) -> None:
        """Close every connection of this process to the queue, just before ``fork()``.

        SQLite keeps its POSIX-lock bookkeeping per file and per process, shared by all the
        process's connections. A child forked while the parent has the file open inherits
        that bookkeeping but not the locks it describes, so even the child's own new
        connection runs without a real lock on the file: once the parent exits, another
        process closing its connection believes it is the last one, checkpoints and deletes
        the WAL under the child, and every commit the child makes afterwards is lost. With
        no connection open at fork, the child starts clean. The parent's threads reopen on
        their next operation.
        """
        if not self._write_lock.acquire(timeout=_FORK_WAIT):
            return  # an operation is stuck in flight: leave it (the child abandons them)
        if not self._read_lock.acquire(timeout=_FORK_WAIT):
            self._write_lock.release()
            return
        self._fork_held = True
        with self._conns_lock:
            conns = list(self._conns)
            self._conns = weakref.WeakSet()
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    def _resume_after_fork(self) -> None:
        if self._fork_held:
            self._fork_held = False
            self._read_lock.release()
            self._write_lock.release()

    def _forget_connections(self) -> None:
        # After fork the parent's connections (if any are still open: see _close_for_fork)
        # and lock state are not ours to use or close.
        _abandoned.append(self._local)
        _abandoned.extend(self._conns)
        self._local = threading.local()
        self._conns = weakref.WeakSet()
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._fork_held = False

    def _conn(self) -> sqlite3.Connection:
        try:
            conn: sqlite3.Connection = self._local.conn
            return conn
        except AttributeError:
            pass
        if self._closed:
            raise QueueError(f"the queue {self.path} is closed")
        conn = self._open()
        self._local.conn = conn
        with self._conns_lock:
            self._conns.add(conn)
        return conn

    def _open(self) -> _Connection:
        try:
            # timeout=0: busy waits are ours (_retry), with sub-millisecond first retries
            # instead of SQLite's 1 ms minimum sleep.
            conn = sqlite3.connect(
                str(self.path),
                timeout=0,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=64,
                factory=_Connection,
            )
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None
        try:
            with _RAW_LOCK:
                self._retry(lambda: self._setup(conn))
        except BaseException:
            conn.close()
            raise
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        try:
            # Refuse a newer or foreign file before switching it to WAL, which would write to
            # it: one statement, so one consistent snapshot of the version and the tables.
            version, tables = conn.execute(
                "SELECT (SELECT user_version FROM pragma_user_version), "
                "(SELECT count(*) FROM sqlite_master WHERE type = 'table')"
            ).fetchone()
            self._check_version(int(version), int(tables))
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            if _errorcode(exc) in (_SQLITE_BUSY, _SQLITE_LOCKED):
                raise
            raise _translate(exc, self.path) from None
        if str(mode).lower() != "wal":
            raise QueueError(f"the queue {self.path} could not be switched to WAL mode ({mode})")
        sync = "FULL" if self.durability == "full" else "NORMAL"
        conn.execute(f"PRAGMA synchronous={sync}")
        conn.execute("PRAGMA temp_store=MEMORY")
        self._migrate(conn)

    def _check_version(self, version: int, tables: int) -> None:
        if version > SCHEMA_VERSION:
            raise QueueVersionError(
                f"the queue {self.path} has schema version {version}, newer than this "
                f"durable-analytics knows ({SCHEMA_VERSION}); upgrade durable-analytics, or "
                "point queue_path at another file"
            )
        if version == 0 and tables:
            # A version-0 file must be empty (ours, just created); anything else is foreign.
            raise QueueCorrupt(
                f"{self.path} is an SQLite database but not a durable-analytics queue "
                "(it has tables of its own); point queue_path at another file"
            )

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version == SCHEMA_VERSION:
            return
        self._check_version(version, 0)
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tables = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            ).fetchone()[0]
            self._check_version(version, int(tables) if version == 0 else 0)
            _apply_migrations(conn, version)
            _stamp_application_id(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _retry(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying while another connection holds the lock (up to busy_timeout)."""
        deadline = 0.0
        delay = 0.00002
        while True:
            try:
                return fn()
            except sqlite3.Error as exc:
                code = _errorcode(exc)
                if code not in (_SQLITE_BUSY, _SQLITE_LOCKED):
                    raise _translate(exc, self.path) from None
                now = time.monotonic()
                if not deadline:
                    deadline = now + self.busy_timeout
                elif now >= deadline:
                    raise _translate(exc, self.path) from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.005)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` under the process write lock, rolled back on error."""
        with self._write_lock:
            conn = self._conn()
            self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                yield conn
                self._retry(lambda: conn.execute("COMMIT"))
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one write transaction, translating SQLite errors.

        When the file turns out damaged and ``recover`` is on, it is recovered and ``fn``
        runs once more, on the fresh file.
        """
        try:
            return self._write_once(fn)
        except QueueCorrupt as exc:
            if not self._recover_from(exc):
                raise
        except QueueDiskFull:
            with self._write_lock:
                freed = _checkpoint_for_space(self._conn())
            if not freed:
                raise
        return self._write_once(fn)

    def _write_once(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with self._transaction() as conn:
                return fn(conn)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return self._read_once(fn)
        except QueueCorrupt as exc:
            if not self._recover_from(exc):
                raise
        return self._read_once(fn)

    def _read_once(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._read_lock:
            conn = self._conn()
            try:
                return self._retry(lambda: fn(conn))
            except sqlite3.Error as exc:
                raise _translate(exc, self.path) from None

    def close(self) -> None:
        """Close this thread's connection; other threads' close when they end."""
        self._closed = True
        with self._write_lock:
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                del self._local.conn
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    # ---------------------------------------------------------------- destinations

    def destination(self, host: str, write_key: str) -> int:
        """The id of the (host, write key) destination, created on first use."""
        key = (host, write_key)
        cached = self._dest_cache.get(key)
        if cached is not None:
            return cached

        def find_or_create(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT id FROM destinations WHERE host=? AND write_key=?", key
            ).fetchone()
            if row is not None:
                return int(row[0])
            cur = conn.execute("INSERT INTO destinations (host, write_key) VALUES (?, ?)", key)
            return int(cur.lastrowid or 0)

        dest_id = self._write(find_or_create)
        self._dest_cache[key] = dest_id
        return dest_id

    # ---------------------------------------------------------------- append

    def append(self, dest_id: int, body: bytes, enqueued_at: float | None = None) -> int:
        """Store one serialized message; return its row id after COMMIT.

        Returns 0 when the ``max_queue_bytes`` cap dropped it (``overflow="drop_newest"``);
        with ``"drop_oldest"`` the oldest unleased messages make room instead. Both are counted.
        Raises ``QueueDiskFull`` when the disk is full (nothing committed before is affected).
        """
        size = len(body)
        when = time.time() if enqueued_at is None else enqueued_at
        if self._since_refresh >= _REFRESH_BYTES or (
            self._est_used + size + _EXACT_ZONE > self.max_queue_bytes
        ):
            return self._append_capped(dest_id, body, when)
        try:
            with self._write_lock:
                try:
                    conn = self._local.conn
                except AttributeError:
                    conn = self._conn()
                try:
                    row_id = conn.execute(_INSERT, (dest_id, body, size, when)).lastrowid
                except sqlite3.Error as exc:
                    row_id = self._insert_failed(conn, exc, (dest_id, body, size, when))
        except QueueCorrupt as exc:
            if not self._recover_from(exc):
                raise
            return self._append_capped(dest_id, body, when)  # stored in the fresh file
        grown = size + _ROW_OVERHEAD
        self._est_used += grown
        self._since_refresh += grown
        return row_id or 0

    def _insert_failed(
        self, conn: sqlite3.Connection, exc: sqlite3.Error, row: tuple[int, bytes, int, float]
    ) -> int:
        # Called with the write lock held. Nothing was written by the failed statement.
        code = _errorcode(exc)
        if code not in (_SQLITE_BUSY, _SQLITE_LOCKED):
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if code == _SQLITE_FULL and _checkpoint_for_space(conn):
                try:
                    return conn.execute(_INSERT, row).lastrowid or 0
                except sqlite3.Error as again:
                    exc = again
            raise _translate(exc, self.path) from None
        return self._retry(lambda: conn.execute(_INSERT, row)).lastrowid or 0

    def _used_bytes(self, conn: sqlite3.Connection) -> int:
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        return (pages - free) * self._page_size

    def _append_capped(self, dest_id: int, body: bytes, when: float) -> int:
        size = len(body)

        low = self._low_disk()

        def run(conn: sqlite3.Connection) -> int:
            pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
            free_pages = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            used = (pages - free_pages) * self._page_size
            if low is not None and low + free_pages * self._page_size < _DISK_RESERVE + size:
                raise QueueDiskFull(
                    f"the disk holding the queue {self.path} is full (less than "
                    f"{_DISK_RESERVE // 1024} KB left, kept so that deliveries can still be "
                    "recorded); the message was not stored"
                )
            over = used + size - self.max_queue_bytes
            if over > 0 and self._trim_dead_letters(conn, throttle=True):
                used = self._used_bytes(conn)
                over = used + size - self.max_queue_bytes
            # drop_oldest makes room from the oldest unleased messages; when even that is not
            # enough (the rest is leased, or dead letters), the new message is refused too:
            # the file never grows past the cap.
            if over > 0 and (
                self.overflow == "drop_newest" or self._drop_oldest(conn, over) < over
            ):
                conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'dropped_newest'")
                self._est_used = used
                return 0
            row_id = conn.execute(_INSERT, (dest_id, body, size, when)).lastrowid
            self._est_used = used + size + _ROW_OVERHEAD
            return row_id or 0

        try:
            stored = self._write(run)
        finally:
            # On a nearly full disk every append comes this way (see _low_disk); else the
            # next _REFRESH_BYTES go the fast way.
            self._since_refresh = _REFRESH_BYTES if low is not None else 0
        return stored

    def _low_disk(self) -> int | None:
        """None when the disk has room; else the bytes still free on it.

        SQLite lets the -wal grow to about 4 MB before it checkpoints; on a nearly full disk
        that space is better spent on messages. Below _LOW_DISK_BYTES free, every append
        comes through the capped path (a statvfs and a transaction instead of the bare
        INSERT), the -wal is checkpointed every _LOW_DISK_CHECKPOINT appends (RESTART: its
        file keeps the space it has, for the next frames), and appends stop _DISK_RESERVE
        short of full, so that acks, releases and dead letters can still be written.
        """
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            return None
        if free >= _LOW_DISK_BYTES:
            return None
        self._low_appends += 1
        if self._low_appends % _LOW_DISK_CHECKPOINT == 0:
            with self._write_lock:
                _checkpoint_for_space(self._conn(), "RESTART")
        return free

    def _drop_oldest(self, conn: sqlite3.Connection, need: int) -> int:
        """Delete the oldest unleased messages worth ``need`` bytes; returns the bytes freed."""
        need = max(need, 1)
        freed = 0
        dropped = 0
        leased = self._leased_ids(conn)
        while freed < need:
            rows = conn.execute(
                "SELECT id, size FROM messages ORDER BY id LIMIT ?", (64 + len(leased),)
            ).fetchall()
            take = []
            for row_id, row_size in rows:
                if row_id in leased:
                    continue  # a message under a lease is never dropped
                take.append(int(row_id))
                freed += int(row_size) + _ROW_OVERHEAD
                if freed >= need:
                    break
            if not take:
                break
            conn.execute(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(take))})", take)
            dropped += len(take)
        if dropped:
            conn.execute(
                "UPDATE counters SET value = value + ? WHERE name = 'dropped_oldest'", (dropped,)
            )
        return freed

    # ---------------------------------------------------------------- leases

    def _lease_over(
        self,
        now_wall: float,
        now_mono: float,
        boot: str,
        pidns: int,
        pid: int,
        pstart: int,
        mono_exp: float,
        wall_exp: float,
    ) -> bool:
        """Whether a lease record has expired or lost its holder."""
        if boot and boot == _holder().boot:
            expired = now_mono > mono_exp  # one boot, one monotonic clock for every process
        else:
            # Another boot (or no boot id): the wall clock, ignoring an expiry so far
            # ahead that only a backwards clock jump explains it.
            expired = now_wall > wall_exp or wall_exp > now_wall + self.lease_timeout + 60
        return expired or _holder_gone(boot, pidns, pid, pstart)

    def _scan_leases(self, conn: sqlite3.Connection, now_wall: float) -> tuple[set[int], list[str]]:
        """The message ids under live leases, and the tokens of leases that are over."""
        now_mono = time.monotonic()
        leased: set[int] = set()
        dead: list[str] = []
        for token, ids, *holder in conn.execute(
            "SELECT token, ids, boot, pidns, pid, pstart, mono_expires, wall_expires FROM leases"
        ).fetchall():
            if self._lease_over(now_wall, now_mono, *holder):
                dead.append(token)
            else:
                leased.update(_parse_ids(ids))
        return leased, dead

    def _leased_ids(self, conn: sqlite3.Connection) -> set[int]:
        """Every message id named by a lease record, live or not yet reclaimed."""
        leased: set[int] = set()
        for (ids,) in conn.execute("SELECT ids FROM leases").fetchall():
            leased.update(_parse_ids(ids))
        return leased

    def _reclaim(self, conn: sqlite3.Connection, now_wall: float) -> set[int]:
        """End the leases that expired or lost their holder; return the ids still leased.

        A lease is one record naming its message ids, so ending it frees every message at
        once without touching (rewriting) the messages themselves.
        """
        leased, dead = self._scan_leases(conn, now_wall)
        for token in dead:
            conn.execute("DELETE FROM leases WHERE token = ?", (token,))
        return leased

    def reclaim_expired(self) -> int:
        """Free the messages of dead or expired leases now; returns how many leases ended."""
        if not self.live_leases():
            return 0
        now_wall = time.time()

        def run(conn: sqlite3.Connection) -> int:
            _, dead = self._scan_leases(conn, now_wall)
            for token in dead:
                conn.execute("DELETE FROM leases WHERE token = ?", (token,))
            return len(dead)

        return self._write(run)

    def ready_summary(self, limit: int, now: float | None = None) -> tuple[int, float | None]:
        """How many of the oldest ``limit`` messages are ready to lease, and the oldest's time."""
        now_wall = time.time() if now is None else now
        horizon = now_wall + MAX_BACKOFF_SECONDS + _CLOCK_JUMP_MARGIN

        def run(conn: sqlite3.Connection) -> tuple[int, float | None]:
            leased = self._leased_ids(conn)
            rows = conn.execute(
                "SELECT m.id, m.enqueued_at FROM messages m "
                "JOIN destinations d ON d.id = m.dest "
                "WHERE (d.not_before <= ? OR d.not_before > ?) "
                "AND (m.not_before IS NULL OR m.not_before <= ? OR m.not_before > ?) "
                "ORDER BY m.id LIMIT ?",
                (now_wall, horizon, now_wall, horizon, limit + len(leased)),
            ).fetchall()
            ready = [float(t) for i, t in rows if i not in leased][:limit]
            return len(ready), (min(ready) if ready else None)

        return self._read(run)

    def lease(
        self,
        max_messages: int,
        max_bytes: int,
        *,
        destination: int | None = None,
        up_to_id: int | None = None,
        now: float | None = None,
        per_message_overhead: int = 1,
    ) -> Lease | None:
        """Take the oldest ready messages of one destination, or None when none are ready.

        At most ``max_messages`` messages and ``max_bytes`` bytes (each message counting its
        size plus ``per_message_overhead``, the comma between messages in the request body);
        the first message is always taken so a batch is never empty. ``destination`` limits
        the choice to one destination, ``up_to_id`` to messages stored no later than that id.
        A destination in backoff (``set_backoff``) yields nothing until its time comes.
        """
        now_wall = time.time() if now is None else now
        horizon = now_wall + MAX_BACKOFF_SECONDS + _CLOCK_JUMP_MARGIN
        top = up_to_id if up_to_id is not None else (1 << 62)

        def run(conn: sqlite3.Connection) -> Lease | None:
            leased = self._reclaim(conn, now_wall)
            dests = {
                int(r[0]): r
                for r in conn.execute(
                    "SELECT id, host, write_key, not_before, failures FROM destinations"
                ).fetchall()
            }
            ready = [
                d
                for d, r in dests.items()
                if (r[3] <= now_wall or r[3] > horizon) and destination in (None, d)
            ]
            if not ready:
                return None
            if len(ready) == 1:
                dest_id = ready[0]  # the common case: one destination, one query fewer
            else:
                marks = ",".join("?" * len(ready))
                firsts = conn.execute(
                    f"SELECT id, dest FROM messages WHERE dest IN ({marks}) "
                    "AND id <= ? AND (not_before IS NULL OR not_before <= ? OR not_before > ?) "
                    "ORDER BY id LIMIT ?",
                    (*ready, top, now_wall, horizon, 1 + len(leased)),
                ).fetchall()
                firsts = [r for r in firsts if r[0] not in leased]
                if not firsts:
                    return None
                dest_id = int(firsts[0][1])
            # Leased messages are skipped here rather than excluded in SQL: there are only
            # ever a few batches' worth of them, and the query stays one cached statement.
            rows = conn.execute(
                "SELECT id, body, attempts FROM messages WHERE dest = ? "
                "AND id <= ? AND (not_before IS NULL OR not_before <= ? OR not_before > ?) "
                "ORDER BY id LIMIT ?",
                (dest_id, top, now_wall, horizon, max_messages + len(leased)),
            ).fetchall()
            ids: list[int] = []
            bodies: list[bytes] = []
            total = 0
            attempts = 0
            for row_id, body, row_attempts in rows:
                if row_id in leased:
                    continue
                cost = len(body) + per_message_overhead
                if ids and (total + cost > max_bytes or len(ids) >= max_messages):
                    break
                ids.append(int(row_id))
                bodies.append(bytes(body))
                total += cost
                attempts = max(attempts, int(row_attempts))
            if not ids:
                return None
            token = uuid.uuid4().hex
            me = _holder()
            mono_expires = time.monotonic() + self.lease_timeout
            conn.execute(
                "INSERT INTO leases (token, dest, ids, count, boot, pidns, pid, pstart, "
                "mono_expires, wall_expires, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    token,
                    dest_id,
                    ",".join(map(str, ids)),
                    len(ids),
                    me.boot,
                    me.pidns,
                    me.pid,
                    me.start,
                    mono_expires,
                    now_wall + self.lease_timeout,
                    now_wall,
                ),
            )
            row = dests[dest_id]
            dest = Destination(dest_id, row[1], row[2])
            return Lease(
                token, dest, tuple(ids), tuple(bodies), attempts, mono_expires, int(row[4])
            )

        return self._write(run)

    def extend(self, lease: Lease) -> bool:
        """Push the lease's expiry ``lease_timeout`` from now; False if it was lost already."""
        now_wall = time.time()
        mono = time.monotonic() + self.lease_timeout

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE leases SET mono_expires = ?, wall_expires = ? WHERE token = ?",
                (mono, now_wall + self.lease_timeout, lease.token),
            )
            return cur.rowcount > 0

        return self._write(run)

    def _held_ids(self, conn: sqlite3.Connection, lease: Lease) -> list[int] | None:
        """The ids ``lease`` still holds, or None once it has ended or been taken over.

        This is the fence: a lease record names the ids its holder has not yet acked,
        released or dead-lettered, and every operation works only on those, so a stale
        holder can never touch a message it no longer holds (nor a new message that
        reused the id of one it acked).
        """
        row = conn.execute("SELECT ids FROM leases WHERE token = ?", (lease.token,)).fetchone()
        return None if row is None else _parse_ids(row[0])

    def _settle(
        self, conn: sqlite3.Connection, lease: Lease, held: list[int], done: set[int]
    ) -> None:
        """Remove ``done`` from the lease record, ending the lease when nothing is left."""
        left = [i for i in held if i not in done]
        if left:
            conn.execute(
                "UPDATE leases SET ids = ?, count = ? WHERE token = ?",
                (",".join(map(str, left)), len(left), lease.token),
            )
        else:
            conn.execute("DELETE FROM leases WHERE token = ?", (lease.token,))

    def _chosen(self, held: list[int], ids: Iterable[int] | None) -> list[int]:
        if ids is None:
            return held
        wanted = set(ids)
        return [i for i in held if i in wanted]

    def ack(self, lease: Lease, ids: Iterable[int] | None = None) -> int:
        """Delete delivered messages (all the lease still holds, or ``ids``); returns how many.

        Fenced by the token: once a lease has expired or been taken over, its holder's ack
        deletes nothing (the messages are sent again: at-least-once). The destination's
        backoff and failure count are cleared in the same transaction (the server took the
        batch, whoever holds the lease now).
        """
        wanted = None if ids is None else list(ids)

        def run(conn: sqlite3.Connection) -> int:
            held = self._held_ids(conn, lease)
            if held is None:
                return 0
            chosen = self._chosen(held, wanted)
            deleted = 0
            for chunk in _chunks(chosen, 500):
                deleted += conn.execute(
                    f"DELETE FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk
                ).rowcount
            self._settle(conn, lease, held, set(chosen))
            return deleted

        def run_and_clear(conn: sqlite3.Connection) -> int:
            deleted = run(conn)
            # A delivery went through: the destination is healthy again, for every holder.
            conn.execute(_CLEAR_BACKOFF, (lease.destination.id,))
            return deleted

        return self._write(run_and_clear)

    def release(
        self,
        lease: Lease,
        not_before: float | None = None,
        *,
        ids: Iterable[int] | None = None,
        count_attempt: bool = True,
    ) -> int:
        """Return leased messages to the queue, not to be leased again before ``not_before``.

        Fenced by the token: a stale holder cannot release a batch someone else now holds.
        """
        wanted = None if ids is None else list(ids)
        bump = 1 if count_attempt else 0
        return self._write(lambda conn: self._release_in(conn, lease, not_before, wanted, bump))

    def _release_in(
        self,
        conn: sqlite3.Connection,
        lease: Lease,
        not_before: float | None,
        wanted: list[int] | None,
        bump: int,
    ) -> int:
        held = self._held_ids(conn, lease)
        if held is None:
            return 0
        chosen = self._chosen(held, wanted)
        released = 0
        if not_before is not None or bump:
            for chunk in _chunks(chosen, 500):
                released += conn.execute(
                    "UPDATE messages SET not_before = ?, attempts = attempts + ? "
                    f"WHERE id IN ({','.join('?' * len(chunk))})",
                    (not_before, bump, *chunk),
                ).rowcount
        else:
            for chunk in _chunks(chosen, 500):
                released += conn.execute(
                    f"SELECT count(*) FROM messages WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchone()[0]
        self._settle(conn, lease, held, set(chosen))
        return int(released)

    def dead_letter(
        self,
        lease: Lease,
        ids: Iterable[int],
        *,
        status: int | None,
        reason: str,
        excerpt: str = "",
    ) -> int:
        """Move leased messages to the dead-letter table with the status and a response excerpt."""
        wanted = list(ids)
        if not wanted:
            return 0
        now = time.time()

        def run(conn: sqlite3.Connection) -> int:
            held = self._held_ids(conn, lease)
            if held is None:
                return 0
            chosen = self._chosen(held, wanted)
            moved = 0
            for chunk in _chunks(chosen, 500):
                marks = ",".join("?" * len(chunk))
                moved += conn.execute(
                    "INSERT INTO dead_letters (dest, body, size, enqueued_at, dead_at, attempts, "
                    "status, reason, excerpt) SELECT dest, body, size, enqueued_at, ?, "
                    f"attempts + 1, ?, ?, ? FROM messages WHERE id IN ({marks})",
                    (now, status, reason[:500], excerpt[:2000], *chunk),
                ).rowcount
                conn.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
            self._settle(conn, lease, held, set(chosen))
            if moved:
                done = set(chosen)
                pairs = zip(lease.ids, lease.bodies, strict=True)
                added = sum(len(b) for i, b in pairs if i in done)
                self._bound_dead_letters(conn, added)
            return moved

        return self._write(run)

    def _bound_dead_letters(self, conn: sqlite3.Connection, added: int) -> None:
        """Keep dead letters within ``max_dead_letter_bytes`` while the file is near its cap.

        Dead letters count in the file's cap like everything else; this bound keeps them
        from crowding out new messages. They are measured only when the file is within that
        bound of the cap (and not more often than every eighth of the bound), so a queue
        far from its cap never pays for it. The oldest go first, down to 90 % of the bound;
        how many is counted (``dead_letters_purged``) and logged.
        """
        self._dead_since_check += added
        if self._dead_since_check < max(1, self.max_dead_letter_bytes // 8):
            return
        if self._used_bytes(conn) + self.max_dead_letter_bytes < self.max_queue_bytes:
            return
        self._trim_dead_letters(conn)

    def _trim_dead_letters(self, conn: sqlite3.Connection, *, throttle: bool = False) -> int:
        """Purge the oldest dead letters beyond max_dead_letter_bytes; returns how many.

        Called when the file is at (or near) its cap: before a message is dropped, and after
        dead letters were added. ``throttle``: unless this process added dead letters since
        the last measure, at most once a second (a full queue refusing every append must not
        measure its dead letters every time).
        """
        now = time.monotonic()
        if throttle and not self._dead_since_check and now - self._dead_trimmed_at < 1.0:
            return 0
        self._dead_trimmed_at = now
        self._dead_since_check = 0
        limit = self.max_dead_letter_bytes
        total = int(
            conn.execute(
                "SELECT total(size) + count(*) * ? FROM dead_letters", (_ROW_OVERHEAD,)
            ).fetchone()[0]
        )
        if total <= limit:
            return 0
        target = total - int(limit * 0.9)
        purged = freed = 0
        while freed < target:
            rows = conn.execute(
                "SELECT id, size FROM dead_letters ORDER BY id LIMIT 256"
            ).fetchall()
            if not rows:
                break
            take = []
            for row_id, row_size in rows:
                take.append(int(row_id))
                freed += int(row_size) + _ROW_OVERHEAD
                if freed >= target:
                    break
            conn.execute(
                f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * len(take))})", take
            )
            purged += len(take)
        conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (_PURGED_COUNTER, purged),
        )
        log.warning(
            "the dead letters of %s passed max_dead_letter_bytes (%d bytes) with the queue near "
            "its cap: purged the %d oldest",
            self.path,
            limit,
            purged,
        )
        return purged

    def dead_letters_purged(self) -> int:
        """How many dead letters were purged to keep them within ``max_dead_letter_bytes``."""
        row = self._read(
            lambda conn: conn.execute(
                "SELECT value FROM counters WHERE name = ?", (_PURGED_COUNTER,)
            ).fetchone()
        )
        return 0 if row is None else int(row[0])

    # ---------------------------------------------------------------- backoff and errors

    def set_backoff(self, dest_id: int, until: float, error: str | None = None) -> None:
        """Hold every process back from leasing ``dest_id`` until ``until`` (wall clock)."""
        now = time.time()
        self._write(lambda conn: _store_backoff(conn, dest_id, until, error, now))

    def retry_later(self, lease: Lease, delay: Callable[[int], float], error: str) -> float:
        """Back the destination off and hand the batch back, in one transaction.

        Reads the destination's consecutive failures (other holders' included), stores a
        backoff of ``delay(failures + 1)`` seconds from now with ``error`` as its last
        error, and releases what ``lease`` still holds until then, counting an attempt.
        Returns the wall-clock time the backoff ends. Fenced like ``release``: a stale
        holder's batch is not touched, but its failure still counts for the destination.
        """
        dest_id = lease.destination.id

        def run(conn: sqlite3.Connection) -> float:
            row = conn.execute("SELECT failures FROM destinations WHERE id = ?", (dest_id,))
            found = row.fetchone()
            now = time.time()
            until = now + delay((int(found[0]) if found else 0) + 1)
            _store_backoff(conn, dest_id, until, error, now)
            self._release_in(conn, lease, until, None, 1)
            return until

        return self._write(run)

    def clear_backoff(self, dest_id: int) -> None:
        """Forget the destination's failures after a successful delivery."""

        self._write(lambda conn: conn.execute(_CLEAR_BACKOFF, (dest_id,)))

    def backoff(self, dest_id: int) -> tuple[float, int]:
        """``(not_before, consecutive failures)`` of a destination."""
        row = self._read(
            lambda conn: conn.execute(
                "SELECT not_before, failures FROM destinations WHERE id = ?", (dest_id,)
            ).fetchone()
        )
        if row is None:
            return 0.0, 0
        return float(row[0]), int(row[1])

    def next_ready_at(self, *, up_to_id: int | None = None) -> float | None:
        """The earliest wall-clock time at which some pending message may be leased."""
        top = up_to_id if up_to_id is not None else (1 << 62)
        horizon = time.time() + MAX_BACKOFF_SECONDS + _CLOCK_JUMP_MARGIN

        def run(conn: sqlite3.Connection) -> float | None:
            leased = self._leased_ids(conn)
            # Times beyond the horizon (a wall clock that jumped back) count as ready now,
            # as lease() treats them.
            rows = conn.execute(
                "SELECT m.id, max(CASE WHEN coalesce(m.not_before, 0) > ?1 THEN 0 "
                "ELSE coalesce(m.not_before, 0) END, "
                "CASE WHEN d.not_before > ?1 THEN 0 ELSE d.not_before END) AS t FROM messages m "
                "JOIN destinations d ON d.id = m.dest WHERE m.id <= ?2 ORDER BY t LIMIT ?3",
                (horizon, top, 1 + len(leased)),
            ).fetchall()
            times = [float(t) for i, t in rows if i not in leased]
            return times[0] if times else None

        return self._read(run)

    # ---------------------------------------------------------------- inspection

    def max_id(self) -> int:
        """The id of the newest message (0 when empty): ``flush`` waits for ids up to it."""
        row = self._read(lambda conn: conn.execute("SELECT max(id) FROM messages").fetchone())
        return int(row[0] or 0)

    def pending(self, *, up_to_id: int | None = None, destination: int | None = None) -> int:
        """How many messages are not yet delivered (leased or not)."""
        top = up_to_id if up_to_id is not None else (1 << 62)
        if destination is None:
            row = self._read(
                lambda conn: conn.execute(
                    "SELECT count(*) FROM messages WHERE id <= ?", (top,)
                ).fetchone()
            )
        else:
            row = self._read(
                lambda conn: conn.execute(
                    "SELECT count(*) FROM messages WHERE id <= ? AND dest = ?", (top, destination)
                ).fetchone()
            )
        return int(row[0])

    def live_leases(self) -> int:
        """How many leases are held right now (by anyone)."""
        row = self._read(lambda conn: conn.execute("SELECT count(*) FROM leases").fetchone())
        return int(row[0])

    def stats(self) -> QueueStats:
        """Counts and health of the queue (see ``QueueStats``)."""
        now = time.time()

        def run(conn: sqlite3.Connection) -> QueueStats:
            conn.execute("BEGIN")  # one consistent snapshot for every count
            try:
                now_mono = time.monotonic()
                live_ids: set[int] = set()
                for ids, *holder in conn.execute(
                    "SELECT ids, boot, pidns, pid, pstart, mono_expires, wall_expires FROM leases"
                ).fetchall():
                    if not self._lease_over(now, now_mono, *holder):
                        live_ids.update(_parse_ids(ids))
                per_dest: dict[int, tuple[int, int]] = {}
                leased_by_dest: dict[int, int] = {}
                # One scan per destination (there are few) rather than GROUP BY dest, which
                # sorts every message in memory (temp_store=MEMORY): ~40 MB per million.
                for (d,) in conn.execute("SELECT id FROM destinations ORDER BY id").fetchall():
                    n, b = conn.execute(
                        "SELECT count(*), total(size) FROM messages WHERE dest = ?", (d,)
                    ).fetchone()
                    if n:
                        per_dest[int(d)] = (int(n), int(b))
                # Leased means under a live lease: not a record that expired, nor the
                # messages of a lease already acked or dead-lettered.
                for chunk in _chunks(sorted(live_ids), 500):
                    for d, n in conn.execute(
                        f"SELECT dest, count(*) FROM messages WHERE id IN "
                        f"({','.join('?' * len(chunk))}) GROUP BY dest",
                        chunk,
                    ).fetchall():
                        leased_by_dest[int(d)] = leased_by_dest.get(int(d), 0) + int(n)
                dead = int(conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0])
                oldest = conn.execute("SELECT min(enqueued_at) FROM messages").fetchone()[0]
                dropped = int(
                    conn.execute(
                        "SELECT total(value) FROM counters WHERE name LIKE 'dropped_%'"
                    ).fetchone()[0]
                )
                dests = conn.execute(
                    "SELECT id, host, write_key, not_before, failures, last_error, last_error_at "
                    "FROM destinations ORDER BY id"
                ).fetchall()
            finally:
                conn.execute("COMMIT")
            destinations = []
            last: tuple[float, str, str] | None = None
            for d, host, key, not_before, failures, err, err_at in dests:
                n, _ = per_dest.get(int(d), (0, 0))
                if err is not None and err_at is not None and (last is None or err_at > last[0]):
                    last = (float(err_at), str(err), str(host))
                destinations.append(
                    DestinationStats(
                        host=host,
                        write_key=Destination(int(d), host, key).redacted_key,
                        pending=n,
                        leased=leased_by_dest.get(int(d), 0),
                        backoff_until=_iso(not_before) if not_before > now else None,
                        failures=int(failures),
                        last_error=err,
                    )
                )
            pending = sum(n for n, _ in per_dest.values())
            return QueueStats(
                pending=pending,
                leased=sum(leased_by_dest.values()),
                dead_letters=dead,
                bytes=int(sum(b for _, b in per_dest.values())),
                oldest_age_seconds=None if oldest is None else max(0.0, round(now - oldest, 3)),
                dropped=dropped,
                last_error=None
                if last is None
                else {"message": last[1], "at": _iso(last[0]) or "", "host": last[2]},
                destinations=destinations,
            )

        return self._read(run)

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` result (``"ok"`` when healthy)."""
        rows = self._read(lambda conn: conn.execute("PRAGMA integrity_check").fetchall())
        return "; ".join(str(r[0]) for r in rows)

    def bodies(self) -> list[bytes]:
        """Every pending message body, oldest first (for tests and tools)."""
        rows = self._read(
            lambda conn: conn.execute("SELECT body FROM messages ORDER BY id").fetchall()
        )
        return [bytes(r[0]) for r in rows]

    # ---------------------------------------------------------------- dead letters

    def dead_letters(self, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        """The dead letters (all, or those with ``ids``), oldest first."""

        def run(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            sql = (
                "SELECT l.id, d.host, d.write_key, l.status, l.reason, l.excerpt, l.attempts, "
                "l.enqueued_at, l.dead_at, l.body FROM dead_letters l "
                "JOIN destinations d ON d.id = l.dest"
            )
            if ids is None:
                return conn.execute(sql + " ORDER BY l.id").fetchall()
            marks = ",".join("?" * len(ids))
            return conn.execute(sql + f" WHERE l.id IN ({marks}) ORDER BY l.id", ids).fetchall()

        out = []
        for row_id, host, key, status, reason, excerpt, attempts, enq, dead_at, body in self._read(
            run
        ):
            try:
                msg = json.loads(body)
            except ValueError:
                msg = {}
            out.append(
                DeadLetter(
                    id=int(row_id),
                    host=host,
                    write_key=Destination(0, host, key).redacted_key,
                    type=str(msg.get("type", "")),
                    event=msg.get("event") or msg.get("name"),
                    message_id=msg.get("messageId"),
                    status=status,
                    reason=reason,
                    excerpt=excerpt,
                    attempts=int(attempts),
                    enqueued_at=float(enq),
                    dead_at=float(dead_at),
                    body=bytes(body),
                )
            )
        return out

    def requeue_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Put dead letters (all, or ``ids``) back in the queue; returns how many."""
        return self._move_dead(ids, requeue=True)

    def purge_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Delete dead letters (all, or ``ids``) for good; returns how many."""
        return self._move_dead(ids, requeue=False)

    def _move_dead(self, ids: Sequence[int] | None, *, requeue: bool) -> int:
        def run(conn: sqlite3.Connection) -> int:
            where: str = ""
            params: tuple[int, ...] = ()
            if ids is not None:
                if not ids:
                    return 0
                where = f" WHERE id IN ({','.join('?' * len(ids))})"
                params = tuple(ids)
            if requeue:
                conn.execute(
                    "INSERT INTO messages (dest, body, size, enqueued_at) "
                    f"SELECT dest, body, size, enqueued_at FROM dead_letters{where} ORDER BY id",
                    params,
                )
            return int(conn.execute(f"DELETE FROM dead_letters{where}", params).rowcount)

        return self._write(run)


def _store_backoff(
    conn: sqlite3.Connection, dest_id: int, until: float, error: str | None, now: float
) -> None:
    """Record one more failure of ``dest_id`` and hold it back until ``until``."""
    horizon = now + MAX_BACKOFF_SECONDS + _CLOCK_JUMP_MARGIN
    # A stored not_before beyond the horizon is a leftover of a wall clock that jumped
    # back; lease() ignores it, so it must not outvote the new backoff either.
    conn.execute(
        "UPDATE destinations SET not_before = CASE WHEN not_before > ? THEN ? "
        "ELSE max(not_before, ?) END, failures = failures + 1,"
        " last_error = coalesce(?, last_error), last_error_at = CASE WHEN ? IS NULL "
        "THEN last_error_at ELSE ? END WHERE id = ?",
        (horizon, until, until, error, error, now, dest_id),
    )


def _parse_ids(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
