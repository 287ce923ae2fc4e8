"""The SQLite queue file: schema version, foreign and newer files, paths, permissions.

Each test's name states the behaviour it proves. Child processes are real (``start_python``,
``os.fork``); the heavier multi-process runs live in tests/reliability/.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from durable_analytics._store.sqlite import SCHEMA_VERSION
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics.exceptions import (
    QueueCorrupt,
    QueueError,
    QueuePermissionError,
    QueueVersionError,
)

from .sqlite_helpers import (
    HOST,
    KEY,
    NO_PERMISSIONS,
    ROOT_REASON,
    body,
    fill,
    fresh_rows,
    index,
)

# --------------------------------------------------------------------------- schema and files


def test_new_file_gets_schema_version_and_wal_journal(queue_path: Path) -> None:
    Queue(queue_path).close()
    conn = sqlite3.connect(str(queue_path))
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"messages", "destinations", "leases", "dead_letters", "counters"} <= tables
    finally:
        conn.close()


def test_reopening_an_existing_queue_keeps_its_messages(queue_path: Path) -> None:
    q = Queue(queue_path)
    ids = fill(q, q.destination(HOST, KEY), 3)
    q.close()
    q2 = Queue(queue_path)
    assert [index(b) for b in q2.bodies()] == [0, 1, 2]
    assert q2.max_id() == ids[-1]
    q2.close()


def test_newer_schema_version_raises_version_error_and_leaves_file_untouched(
    queue_path: Path,
) -> None:
    conn = sqlite3.connect(str(queue_path))
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, future_column TEXT)")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    os.chmod(queue_path, 0o640)
    before = queue_path.read_bytes()

    with pytest.raises(QueueVersionError) as info:
        Queue(queue_path)

    message = str(info.value)
    assert str(queue_path) in message
    assert f"version {SCHEMA_VERSION + 1}" in message
    assert "newer" in message
    assert "upgrade" in message
    assert queue_path.read_bytes() == before  # not even switched to WAL
    assert not Path(f"{queue_path}-wal").exists()
    assert stat.S_IMODE(queue_path.stat().st_mode) == 0o640  # not ours: mode left alone


@pytest.mark.parametrize(
    "content",
    [
        os.urandom(8192),
        b"this is a text file, not a database\n" * 200,
        b"hello\n",
        b"SQLite format 3\x00" + os.urandom(4080),
    ],
    ids=["random-bytes", "long-text", "short-text", "sqlite-header-then-garbage"],
)
def test_non_sqlite_file_raises_queue_corrupt_and_is_left_untouched(
    queue_path: Path, content: bytes
) -> None:
    queue_path.write_bytes(content)
    os.chmod(queue_path, 0o600)
    with pytest.raises(QueueCorrupt) as info:
        Queue(queue_path)
    assert str(queue_path) in str(info.value)
    assert queue_path.read_bytes() == content


def test_sqlite_file_with_foreign_tables_and_version_0_raises_queue_corrupt_untouched(
    queue_path: Path,
) -> None:
    conn = sqlite3.connect(str(queue_path))
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers (name) VALUES ('ada')")
    conn.commit()
    conn.close()
    before = queue_path.read_bytes()

    with pytest.raises(QueueCorrupt, match="not a durable-analytics queue"):
        Queue(queue_path)

    assert queue_path.read_bytes() == before
    assert not Path(f"{queue_path}-wal").exists()
    assert fresh_rows(queue_path, "SELECT name FROM customers") == [("ada",)]


def test_empty_existing_file_becomes_a_queue(queue_path: Path) -> None:
    queue_path.touch(mode=0o600)
    q = Queue(queue_path)
    assert q.append(q.destination(HOST, KEY), body(1)) > 0
    q.close()


def test_queue_path_that_is_a_directory_raises_permission_error(queue_path: Path) -> None:
    queue_path.mkdir(mode=0o700)
    with pytest.raises(QueuePermissionError, match="not a regular file"):
        Queue(queue_path)


def test_queue_directory_that_is_a_file_raises_permission_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "plainfile"
    not_a_dir.write_text("x")
    with pytest.raises(QueuePermissionError):
        Queue(not_a_dir / "queue.sqlite3")


def test_queue_directory_that_cannot_be_created_raises_permission_error(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(QueuePermissionError, match="cannot create the queue directory"):
        Queue(blocker / "sub" / "queue.sqlite3")


def test_queue_permission_error_is_a_permission_error() -> None:
    assert issubclass(QueuePermissionError, PermissionError)
    assert issubclass(QueuePermissionError, QueueError)


@pytest.mark.skipif(NO_PERMISSIONS, reason=ROOT_REASON)
def test_read_only_queue_file_raises_permission_error(queue_path: Path) -> None:
    Queue(queue_path).close()
    os.chmod(queue_path, 0o400)
    try:
        with pytest.raises(QueuePermissionError, match="not readable and writable"):
            Queue(queue_path)
    finally:
        os.chmod(queue_path, 0o600)


@pytest.mark.skipif(NO_PERMISSIONS, reason=ROOT_REASON)
def test_read_only_queue_directory_raises_permission_error(queue_path: Path) -> None:
    Queue(queue_path).close()
    for suffix in ("-wal", "-shm"):
        Path(f"{queue_path}{suffix}").unlink(missing_ok=True)
    os.chmod(queue_path.parent, 0o500)
    try:
        with pytest.raises(QueuePermissionError, match="not writable"):
            Queue(queue_path)
    finally:
        os.chmod(queue_path.parent, 0o700)


def test_symlinked_queue_path_is_refused(queue_path: Path) -> None:
    real = queue_path.parent / "real.sqlite3"
    Queue(real).close()
    queue_path.symlink_to(real)
    with pytest.raises(QueuePermissionError, match="symlink"):
        Queue(queue_path)


def test_dangling_symlink_queue_path_is_refused_and_nothing_is_created(
    queue_path: Path,
) -> None:
    target = queue_path.parent / "elsewhere.sqlite3"
    queue_path.symlink_to(target)
    with pytest.raises(QueuePermissionError, match="symlink"):
        Queue(queue_path)
    assert not target.exists()


def test_world_writable_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(QueuePermissionError, match="writable by other users"):
        Queue(shared / "queue.sqlite3")
    assert not (shared / "queue.sqlite3").exists()


def test_new_files_are_0600_and_created_directories_0700_regardless_of_umask(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a" / "b" / "c" / "queue.sqlite3"
    old = os.umask(0)
    try:
        q = Queue(path)
        dest_id = q.destination(HOST, KEY)
        fill(q, dest_id, 5)
        lease = q.lease(10, 10_000)
        assert lease is not None
        q.ack(lease)
        modes = {
            p: stat.S_IMODE(os.stat(p).st_mode)
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
        }
        dirs = {d: stat.S_IMODE(os.stat(d).st_mode) for d in (path.parents[0], path.parents[1])}
        dirs[path.parents[2]] = stat.S_IMODE(os.stat(path.parents[2]).st_mode)
        q.close()
    finally:
        os.umask(old)
    assert modes == dict.fromkeys(modes, 0o600), modes
    assert dirs == dict.fromkeys(dirs, 0o700), dirs


def test_existing_queue_file_more_permissive_than_0600_is_narrowed(queue_path: Path) -> None:
    q = Queue(queue_path)
    q.append(q.destination(HOST, KEY), body(1))
    for p in (queue_path, Path(f"{queue_path}-wal"), Path(f"{queue_path}-shm")):
        os.chmod(p, 0o644)
    q2 = Queue(queue_path)
    for p in (queue_path, Path(f"{queue_path}-wal"), Path(f"{queue_path}-shm")):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    q2.close()
    q.close()
