"""Damaged queue files: the check at open, and recovery (copy aside, salvage, replace).

``SqliteQueue(path, recover=True)`` (what the Client uses): a damaged queue file
(truncated, bytes flipped, a torn header, a -wal of another database) is moved aside: copied
to ``<name>.corrupt-<UTC time>`` (0600, with its -wal and -shm), the readable messages are
salvaged into a fresh queue that replaces it at the same path, a warning is logged and the
call goes on. ``recover=False`` (the CLI's default) raises ``QueueCorrupt`` and leaves the
files untouched. A file of a newer schema version is never treated as damaged, and a file
with no trace of SQLite (``probe.not_a_database``: a mistyped path) is refused untouched.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from durable_analytics.exceptions import QueueBusy, QueueCorrupt, QueueDiskFull, QueueError

from .connections import Connections
from .errors import SQLITE_CORRUPT, SQLITE_NOTADB, errorcode, log, translate
from .files import fsync_dir
from .forks import raw_allowed, raw_lock
from .probe import (
    FOREIGN_WAL,
    RECOVER_LOCK_SECONDS,
    SALVAGE_SECONDS,
    Damaged,
    NotOurs,
    Probe,
    deadline_handler,
    not_a_database,
    probe_file,
    probe_header,
    read_header,
    ro_uri,
    summary,
)
from .salvage import SalvageCounts, SinkFailed, salvage_into
from .schema import SCHEMA_VERSION, apply_migrations, check_version, stamp_application_id

__all__ = ["Recovery", "RecoveryReport"]


@dataclass(frozen=True)
class RecoveryReport:
    """What ``SqliteQueue(recover=True)`` did with a damaged file (its ``last_recovery``)."""

    #: Where the damaged file went (its -wal and -shm, if any, got the same name + suffix).
    moved_to: Path
    #: Why the file was judged damaged.
    reason: str
    #: Pending messages copied into the fresh queue.
    messages: int
    #: Dead letters copied, including messages whose stored body was no longer valid JSON.
    dead_letters: int
    #: Rows or regions that could not be read (left in the moved file).
    unreadable: int
    #: Messages whose destination (host + write key) could not be read: left in the file.
    unroutable: int
    seconds: float


def quarantine_name(path: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    candidate = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while any(os.path.lexists(f"{candidate}{s}") for s in ("", "-wal", "-shm")):
        n += 1
        candidate = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    return candidate


_COPY_SCRIPT = """
import os, shutil, sys
for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        fin = open(src, "rb")
    except FileNotFoundError:
        continue
    with fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fout:
            os.fchmod(fd, 0o600)
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fd)
    print(dst, flush=True)
"""


def copy_aside(path: Path, moved: Path) -> list[str]:
    """Copy the queue file and its -wal and -shm to ``moved`` (0600); returns the suffixes
    of the -wal / -shm copied.

    The copy runs in a child process: reading the live files here would drop this
    process's locks on them when the descriptors close (see forks.raw_lock).
    """
    args: list[str] = []
    for suffix in ("", "-wal", "-shm"):
        args += [f"{path}{suffix}", f"{moved}{suffix}"]
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _COPY_SCRIPT, *args],
            capture_output=True,
            text=True,
            timeout=SALVAGE_SECONDS,
            check=False,
            close_fds=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise QueueError(f"could not copy the damaged queue {path} aside: {exc}") from None
    if proc.returncode != 0 or not os.path.exists(moved):
        detail = (proc.stderr.strip().splitlines() or ["no copy made"])[-1]
        if "No space left" in detail:
            raise QueueDiskFull(
                f"the disk holding the queue {path} is full: its damaged file could not be "
                "copied aside"
            )
        raise QueueError(f"could not copy the damaged queue {path} aside: {detail}")
    copied = set(proc.stdout.split())
    return [s for s in ("-wal", "-shm") if f"{moved}{s}" in copied]


@contextlib.contextmanager
def directory_lock(directory: Path, timeout: float) -> Iterator[None]:
    """An exclusive flock on the queue's directory: one recovery at a time, across processes."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise QueueBusy(
                        f"another process kept recovering the queue in {directory} for over "
                        f"{timeout:.3g} s"
                    ) from None
                time.sleep(0.02)
            except OSError:
                break  # a file system without flock: go on unserialized
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _held(lock: threading.RLock, until: float, path: Path) -> Iterator[None]:
    """This process's ``lock``, waited for until ``until`` (monotonic), then QueueBusy."""
    if not lock.acquire(timeout=max(0.0, until - time.monotonic())):
        raise QueueBusy(
            f"the queue {path} needs recovering, but another operation of this process "
            "kept it busy past the deadline"
        )
    try:
        yield
    finally:
        lock.release()


class Recovery:
    """Checks a queue file at open and recovers it when damaged (see the module docstring).

    Works through the queue's ``Connections`` (their locks pause every operation of this
    process during a recovery). ``enabled`` is the queue's ``recover`` setting;
    ``known_destinations`` the queue's destination ids, kept across a recovery;
    ``on_recovered`` runs once a fresh file replaced the damaged one.
    """

    def __init__(
        self,
        db: Connections,
        *,
        enabled: bool,
        known_destinations: dict[tuple[str, str], int],
        on_recovered: Callable[[], None],
    ) -> None:
        self.db = db
        self.path = db.path
        self.enabled = enabled
        self.known_destinations = known_destinations
        self.on_recovered = on_recovered
        #: What the last recovery of a damaged file did (None: there was none).
        self.last: RecoveryReport | None = None
        self.healthy_at = -1e9  # when a full check last found the file healthy
        self.page_size = 4096

    def open_file(self) -> None:
        """Open and check the file; with ``recover``, replace a damaged one first."""
        for _ in range(3):
            try:
                self._preflight()
                with self.db.read_lock:
                    conn = self.db.conn()
                    try:
                        self.page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
                        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
                    except sqlite3.Error as exc:
                        raise translate(exc, self.path) from None
                if not app_id:
                    self.db.write(stamp_application_id)
                return
            except NotOurs as exc:
                raise QueueCorrupt(str(exc)) from None
            except Damaged as exc:
                damage = exc
            except QueueCorrupt:
                found = self._diagnose(thorough=True)
                if not isinstance(found, Damaged):
                    raise  # an intact database of another application: not ours to move
                damage = found
            self.db.close_all()
            if not self.enabled:
                raise QueueCorrupt(self._damaged_message(damage)) from None
            self._recover(damage)
        raise QueueCorrupt(f"the queue file {self.path} stayed damaged after recovery")

    def _damaged_message(self, damage: Damaged) -> str:
        return (
            f"the queue file {self.path} is not a valid durable-analytics queue: it is damaged "
            f"({damage.reason}); a Client moves it aside and salvages what it can"
        )

    def _not_ours_message(self, why: str) -> str:
        where = shlex.quote(str(self.path))
        return (
            f"the file {self.path} is not a valid durable-analytics queue: it is not an SQLite "
            f"database ({why}), so it was left as it is; point queue_path (or --queue) at "
            "another file (a path that does not exist yet becomes a new queue). If it was a "
            f"queue, damaged beyond recognition, move it aside (mv {where} {where}.damaged) "
            "and a fresh queue starts there"
        )

    def _preflight(self) -> None:
        """The cheap check at open: the raw header, and the -wal against the main file."""
        with raw_lock():
            raw = raw_allowed(self.db.real)
            probe = probe_file(self.path, raw=raw)
            not_sqlite = not_a_database(self.path, probe.size) if raw and probe.notadb else ""
        if not_sqlite:
            raise NotOurs(self._not_ours_message(not_sqlite))
        if probe.user_version > SCHEMA_VERSION or not probe.size:
            return  # newer: QueueVersionError comes from the open; empty: a new queue
        # Read-only first: a read-write connection to a damaged file would create its -wal,
        # and its close could checkpoint a foreign -wal into the main file.
        damage = self._diagnose(thorough=bool(probe.suspicious), probe=probe)
        if damage == "foreign":
            check_version(self.path, 0, 1)  # raises QueueCorrupt: another application's database
        if isinstance(damage, Damaged):
            raise damage

    def _diagnose(
        self, *, thorough: bool, probe: Probe | None = None
    ) -> Damaged | Literal["foreign"] | None:
        """What is wrong with the file: None when it is healthy (or newer), ``"foreign"`` for
        an intact database of another application, else why it is damaged.

        Reads through a read-only connection, which never checkpoints on close: a -wal of
        another database must not be copied into the main file by merely looking at it.
        """
        if probe is None:
            with raw_lock():
                probe = probe_file(self.path, raw=raw_allowed(self.db.real))
        if probe.user_version > SCHEMA_VERSION or not (probe.size or probe.wal_size):
            return None
        with raw_lock():
            # With no -wal nor -shm no process has the file open: read it as immutable, which
            # creates no file beside it (a plain read-only connection would create the -wal).
            # An immutable connection closes its descriptor at once, so only while no
            # connection of this process is open on the file (see forks.raw_lock).
            if raw_allowed(self.db.real) and not any(
                os.path.lexists(f"{self.path}{s}") for s in ("-wal", "-shm")
            ):
                return self._diagnose_with(probe, thorough, main_only=True)
        return self._diagnose_with(probe, thorough, main_only=False)

    def _diagnose_with(
        self, probe: Probe, thorough: bool, *, main_only: bool
    ) -> Damaged | Literal["foreign"] | None:
        try:
            ro = sqlite3.connect(
                ro_uri(self.path, main_only=main_only), uri=True, timeout=self.db.waits.remaining()
            )
        except sqlite3.Error:
            return None
        try:
            return self._verdict(ro, probe, thorough)
        except sqlite3.DatabaseError as exc:
            if errorcode(exc) not in (SQLITE_CORRUPT, SQLITE_NOTADB):
                return None
            detail = f"not an SQLite database: {probe.notadb}" if probe.notadb else str(exc)
            return Damaged(detail)
        finally:
            ro.close()

    def _verdict(
        self, ro: sqlite3.Connection, probe: Probe, thorough: bool
    ) -> Damaged | Literal["foreign"] | None:
        ro.set_progress_handler(deadline_handler(time.monotonic() + SALVAGE_SECONDS), 10_000)
        version, tables, app_id = ro.execute(
            "SELECT (SELECT user_version FROM pragma_user_version), "
            "(SELECT count(*) FROM sqlite_master WHERE type = 'table'), "
            "(SELECT application_id FROM pragma_application_id)"
        ).fetchone()
        if (probe.app_id and app_id != probe.app_id) or version < probe.user_version:
            return Damaged(FOREIGN_WAL, main_only=True)
        if version > SCHEMA_VERSION:
            return None  # newer: never treated as damaged
        if version == 0 and tables:
            return "foreign"
        if thorough or probe.notadb:
            # A main file whose header is not SQLite's, read fine through the -wal, is one a
            # recovery rewrote that no checkpoint has reached yet.
            rows = ro.execute("PRAGMA quick_check").fetchall()
            if [tuple(r) for r in rows] != [("ok",)]:
                return Damaged(f"PRAGMA quick_check: {summary(rows)}")
            self.healthy_at = time.monotonic()
        return None

    def recover_from(self, error: QueueCorrupt) -> bool:
        """After an operation met a damaged file: recover it; True when a retry makes sense."""
        if not self.enabled or self.db.closed:
            return False
        if time.monotonic() - self.healthy_at < 30.0:
            return False  # a full check just found the file sound: this error is another kind
        return self._recover(None, error=str(error))

    def _recover(self, damage: Damaged | None, *, error: str = "") -> bool:
        """Set the damaged file aside, salvage it into a fresh queue at the same path.

        With every operation of this process paused (both locks) and recoveries of other
        processes excluded (a flock on the directory), the file is checked again: another
        process may have recovered it meanwhile. The damaged files are copied (not moved)
        to ``<name>.corrupt-<time>``; the salvage reads that copy. Then the fresh content
        replaces the old one through SQLite's backup API, inside the same file, so that every
        connection (other processes' too) moves to it safely: renaming a database that other
        connections still use would let the last of them delete the new file's -wal and
        -shm by name. Only a file SQLite cannot lock at all (its header is gone) is replaced
        by a rename.
        """
        started = time.monotonic()
        deadline = started + SALVAGE_SECONDS
        self.db.recovering = True
        try:
            return self._recover_locked(damage, error, started, deadline)
        finally:
            self.db.recovering = False

    def _recover_locked(
        self, damage: Damaged | None, error: str, started: float, deadline: float
    ) -> bool:
        # Before anything is touched: the waits for this process's other operations and for
        # another process's recovery end by the deadline of a flush, an exit or a drain
        # that met the damage (the recovery's own 180 s otherwise); then QueueBusy, with
        # nothing done (the next operation recovers the file).
        until = started + self.db.waits.within(RECOVER_LOCK_SECONDS)
        with (
            _held(self.db.write_lock, until, self.path),
            _held(self.db.read_lock, until, self.path),
            directory_lock(self.path.parent, max(0.0, until - time.monotonic())),
            contextlib.closing(self._keeper()),
        ):
            live: sqlite3.Connection | None = None
            try:
                live = sqlite3.connect(str(self.path), isolation_level=None, timeout=0)
                live.execute("PRAGMA writable_schema=ON")  # lock even if the header lies
                self.db.retry(lambda: live.execute("BEGIN IMMEDIATE") if live else None)
            except (sqlite3.Error, QueueCorrupt):
                if live is not None:
                    live.close()
                live = None  # SQLite cannot lock it: not an SQLite file
            # Now no other process can commit: the files stay as they are while copied.
            found = self._diagnose(thorough=True)
            foreign_wal = damage is not None and damage.main_only
            if not isinstance(found, Damaged) and not foreign_wal:
                if live is not None:
                    live.close()
                return bool(error) and found is None  # healthy now (recovered meanwhile)
            moved = quarantine_name(self.path)
            tmp = self.path.with_name(
                f"{self.path.name}.recover-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            )
            try:
                extra = copy_aside(self.path, moved)
                if not isinstance(found, Damaged):
                    # A foreign -wal is told by the main file's own header, which this
                    # process may no longer read in place (see forks.raw_lock): read
                    # the copy's.
                    size, raw = read_header(moved)
                    wal = moved.with_name(moved.name + "-wal")
                    wal_size = wal.stat().st_size if wal.exists() else 0
                    found = self._diagnose(thorough=False, probe=probe_header(size, wal_size, raw))
                    if not isinstance(found, Damaged):  # another process recovered it
                        for suffix in ("", "-wal", "-shm"):
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(f"{moved}{suffix}")
                        return bool(error) and found is None
                damage = found
                fsync_dir(self.path.parent)
                salvage = self._build_fresh(tmp, moved, damage, deadline)
                if live is not None:
                    live.execute("ROLLBACK")
                    self._replace_in_place(tmp, live, deadline)
                else:
                    self.db.close_all()
                    for suffix in ("-wal", "-shm"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(f"{self.path}{suffix}")
                    os.rename(tmp, self.path)
                    fsync_dir(self.path.parent)
            finally:
                if live is not None:
                    live.close()
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{tmp}{suffix}")
            self.on_recovered()
        report = RecoveryReport(
            moved_to=moved,
            reason=damage.reason,
            messages=salvage.messages,
            dead_letters=salvage.dead_letters,
            unreadable=salvage.unreadable,
            unroutable=salvage.unroutable,
            seconds=round(time.monotonic() - started, 3),
        )
        self.last = report
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
        keeper = sqlite3.connect(ro_uri(self.path), uri=True, timeout=self.db.busy_timeout)
        with contextlib.suppress(sqlite3.Error):
            keeper.execute("SELECT count(*) FROM sqlite_master").fetchall()
        return keeper

    def _build_fresh(
        self, tmp: Path, source: Path, damage: Damaged, deadline: float
    ) -> SalvageCounts:
        """Create a fresh queue file at ``tmp`` holding what ``source`` still has."""
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)
        size, raw = read_header(source)  # the copy: no connection of ours uses it
        header = probe_header(size, 0, raw)
        page_size = header.page_size or self.page_size
        conn = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            conn.execute(f"PRAGMA page_size={int(page_size)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")  # a private file, fsynced once at the end
            conn.execute("BEGIN IMMEDIATE")
            apply_migrations(conn, 0)
            # The same application_id as the file it replaces in place: the main file keeps
            # the old header until a checkpoint, and must not look foreign to its -wal.
            stamp_application_id(conn, header.app_id)
            try:
                salvage = salvage_into(
                    source,
                    conn,
                    deadline,
                    known_destinations=self.known_destinations,
                    main_only=damage.main_only,
                )
            except SinkFailed as exc:
                raise translate(exc.args[0], self.path) from None
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from None
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
            raise translate(exc, self.path) from None
        finally:
            src.close()
