"""Issue 5, row 6: corrupt or foreign queue files.

Every damage below is applied to a copy of one seeded queue (pending messages, acked ones,
dead letters, large bodies on overflow pages). Then:

- ``Queue(path, recover=True)`` (what the Client uses) never crashes or hangs: the damaged
  bytes are set aside as ``<name>.corrupt-<UTC time>`` (0600, with the -wal and -shm), a
  warning says where and how many messages were salvaged, every salvaged message is one
  that was pending (byte for byte, never one that was acked), and the fresh queue works;
- ``Queue(path)`` (the CLI's default) and ``durable-analytics drain`` refuse with
  QueueCorrupt / exit 3 and leave the main file and its -wal byte for byte as they were;
- a file of a newer schema version, or an intact database of another application, is never
  treated as damaged, whatever ``recover`` says; nor is a file with no trace of SQLite (a
  mistyped queue_path): it is refused and keeps its content, name and mode.

Run: ``pytest tests/reliability/test_corrupt_files.py -s`` prints each case's figures.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import WRITE_KEY, child_env, start_python

from durable_analytics import Client
from durable_analytics._store.sqlite import SCHEMA_VERSION
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite.schema import SCHEMA_V1 as _SCHEMA_V1
from durable_analytics.exceptions import QueueCorrupt, QueueVersionError
from durable_analytics.testing import Collector

HOST = "https://api.example.test"
PAGE = 4096
MESSAGES_ROOT = 4  # the messages table's root page in a file this version created


# --------------------------------------------------------------------------- the seeded queue


def message(i: int, pad: int = 150) -> bytes:
    body = {
        "type": "track",
        "event": "Seeded",
        "userId": f"user-{i}",
        "messageId": f"seed-{i}",
        "properties": {"i": i, "pad": "x" * pad},
    }
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Seed:
    path: Path
    pending: dict[str, bytes]  # messageId -> body, what must survive
    acked: frozenset[str]  # delivered: must never come back
    dead: frozenset[str]


def seed_queue(path: Path) -> Seed:
    """700 messages (every 25th with a 9 KB body, on overflow pages); 150 acked, 3 dead."""
    q = Queue(path)
    dest = q.destination(HOST, WRITE_KEY)
    bodies = {}
    for i in range(700):
        body = message(i, 9000 if i % 25 == 0 else 150)
        q.append(dest, body)
        bodies[f"seed-{i}"] = body
    lease = q.lease(150, 100_000_000)
    assert lease is not None
    acked = {json.loads(b)["messageId"] for b in lease.bodies}
    q.ack(lease)
    lease = q.lease(3, 100_000_000)
    assert lease is not None
    dead = {json.loads(b)["messageId"] for b in lease.bodies}
    q.dead_letter(lease, lease.ids, status=400, reason="seeded")
    q.close()  # the last connection: the file is checkpointed, no -wal left
    assert not Path(f"{path}-wal").exists()
    pending = {k: v for k, v in bodies.items() if k not in acked and k not in dead}
    return Seed(path, pending, frozenset(acked), frozenset(dead))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Seed:
    directory = tmp_path_factory.mktemp("template")
    directory.chmod(0o700)
    return seed_queue(directory / "template.sqlite3")


@pytest.fixture
def damaged_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "q"
    directory.mkdir(mode=0o700)
    return directory


def copy_seed(seed: Seed, directory: Path) -> Path:
    path = directory / "queue.sqlite3"
    shutil.copyfile(seed.path, path)
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------- damages


def read_page(path: Path, number: int) -> bytes:
    with open(path, "rb") as f:
        f.seek((number - 1) * PAGE)
        return f.read(PAGE)


def xor(path: Path, offset: int, length: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def messages_leaf(path: Path, which: str) -> int:
    """A leaf page of the messages table: the first (``"first"``) or the rightmost."""
    root = read_page(path, MESSAGES_ROOT)
    assert root[0] == 5, "the seeded messages table must have an interior root"
    if which == "first":
        cell = int.from_bytes(root[12:14], "big")
        return int.from_bytes(root[cell : cell + 4], "big")
    return int.from_bytes(root[8:12], "big")


def capture_wal(directory: Path, build: Callable[[sqlite3.Connection], None]) -> bytes:
    """The -wal of another database, taken while its connection is still open."""
    other = directory / "other.sqlite3"
    conn = sqlite3.connect(str(other), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    build(conn)
    data = Path(f"{other}-wal").read_bytes()
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{other}{suffix}").unlink(missing_ok=True)
    return data


def another_queue(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA_V1)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.execute("PRAGMA application_id=12345")
    conn.execute("INSERT INTO destinations (host, write_key) VALUES ('https://x', 'other')")
    for i in range(200):
        conn.execute(
            "INSERT INTO messages (dest, body, size, enqueued_at) VALUES (1, ?, 20, 0)",
            (json.dumps({"messageId": f"other-{i}"}).encode(),),
        )


def an_app_database(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO customers (name) VALUES (?)", [("ada" * 40,)] * 200)


@dataclass(frozen=True)
class Damage:
    name: str
    apply: Callable[[Path], None]
    #: every pending message is expected back (the damage hit no message row)
    full: bool
    #: SQLite sees the damage at open (not only when an operation reads the bad page)
    at_open: bool = True
    #: at least this share of the pending messages is expected back
    least: float = 1.0


def _truncate(fraction: float) -> Callable[[Path], None]:
    return lambda p: os.truncate(p, int(p.stat().st_size * fraction))


def _write_wal(data: Callable[[Path], bytes]) -> Callable[[Path], None]:
    return lambda p: Path(f"{p}-wal").write_bytes(data(p.parent))


DAMAGES = [
    Damage("truncated-to-90%", _truncate(0.9), full=False, least=0.6),
    Damage("truncated-to-50%", _truncate(0.5), full=False, least=0.15),
    Damage("truncated-to-one-page", lambda p: os.truncate(p, PAGE), full=False, least=0.0),
    Damage("truncated-to-50-bytes", lambda p: os.truncate(p, 50), full=False, least=0.0),
    Damage("header-magic-flipped", lambda p: xor(p, 0, 4), full=True),
    Damage("header-page-size-flipped", lambda p: xor(p, 16, 2), full=True),
    Damage("header-reserved-bytes-flipped", lambda p: xor(p, 20), full=True),
    Damage("header-page-count-flipped", lambda p: xor(p, 28, 4), full=True),
    Damage("header-free-list-flipped", lambda p: xor(p, 32, 4), full=True),
    Damage("page-1-btree-header-flipped", lambda p: xor(p, 100, 1), full=True),
    Damage("schema-text-flipped", lambda p: xor(p, PAGE - 300, 40), full=True),
    Damage(
        "messages-root-page-flipped",
        lambda p: xor(p, (MESSAGES_ROOT - 1) * PAGE, 1),
        full=True,
        at_open=False,
    ),
    Damage(
        "messages-leaf-cell-pointers-flipped",
        lambda p: xor(p, (messages_leaf(p, "first") - 1) * PAGE + 8, 16),
        full=False,
        at_open=False,
        least=0.9,
    ),
    Damage(
        "messages-leaf-header-zeroed",
        lambda p: xor(p, (messages_leaf(p, "first") - 1) * PAGE, 1),
        full=False,
        at_open=False,
        least=0.9,
    ),
    # A header a power loss tore: zeros where the data never reached the disk (XFS, ext4
    # data=writeback), or a first sector of garbage. Still recovered, unlike a file that
    # was never SQLite's (test_a_file_that_is_not_sqlite_is_refused_and_left_untouched).
    Damage("header-zeroed", lambda p: overwrite(p, 0, bytes(100)), full=True),
    Damage("first-sector-zeroed", lambda p: overwrite(p, 0, bytes(512)), full=True),
    Damage("first-sector-garbage", lambda p: overwrite(p, 0, os.urandom(512)), full=True),
    Damage("truncated-to-10-bytes", lambda p: os.truncate(p, 10), full=False, least=0.0),
    Damage(
        "wal-of-another-queue",
        _write_wal(lambda d: capture_wal(d, another_queue)),
        full=True,
    ),
    Damage(
        "wal-of-another-application",
        _write_wal(lambda d: capture_wal(d, an_app_database)),
        full=True,
    ),
]
BY_NAME = {d.name: d for d in DAMAGES}


def files_of(path: Path) -> dict[str, str]:
    """Name -> sha256 of the queue file and its -wal (the bytes a refusal must not touch)."""
    out = {}
    for suffix in ("", "-wal"):
        p = Path(f"{path}{suffix}")
        if p.exists():
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def moved_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


def pending_bodies(path: Path) -> list[bytes]:
    conn = sqlite3.connect(str(path))
    try:
        return [bytes(r[0]) for r in conn.execute("SELECT body FROM messages ORDER BY id")]
    finally:
        conn.close()


def integrity(path: Path) -> str:
    conn = sqlite3.connect(str(path))
    try:
        return "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall())
    finally:
        conn.close()


# --------------------------------------------------------------------------- recover=True


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.name)
def test_recover_sets_the_damaged_file_aside_and_salvages_every_readable_message(
    template: Seed, damaged_dir: Path, damage: Damage, caplog: pytest.LogCaptureFixture
) -> None:
    path = copy_seed(template, damaged_dir)
    damage.apply(path)
    evidence = files_of(path)
    caplog.set_level(logging.WARNING, logger="durable_analytics")

    started = time.monotonic()
    q = Queue(path, recover=True)
    opened_recovered = q.last_recovery is not None
    dest = q.destination(HOST, WRITE_KEY)
    # An operation that meets the damage recovers and succeeds: the call raises nothing.
    new_id = q.append(dest, message(10_000))
    assert new_id > 0
    stored_before_recovery = q.last_recovery is None  # then the salvage copied it too
    lease = q.lease(100_000, 1 << 40)
    stats = q.stats()
    report = q.last_recovery
    elapsed = time.monotonic() - started
    q.close()

    assert report is not None, "the damage went unnoticed"
    assert opened_recovered == damage.at_open
    assert lease is not None
    # The damaged bytes are kept, as they were, private.
    moved = moved_files(path)
    assert report.moved_to in moved
    assert report.moved_to.name.startswith("queue.sqlite3.corrupt-")
    main_digest = hashlib.sha256(report.moved_to.read_bytes()).hexdigest()
    assert main_digest == evidence["queue.sqlite3"], "the moved file is not the damaged one"
    for p in moved:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    if "queue.sqlite3-wal" in evidence:
        wal = Path(f"{report.moved_to}-wal")
        assert hashlib.sha256(wal.read_bytes()).hexdigest() == evidence["queue.sqlite3-wal"]
    # What was salvaged: pending messages only, byte for byte, each once.
    salvaged = [b for b in pending_bodies(path) if json.loads(b)["messageId"] != "seed-10000"]
    ids = [json.loads(b)["messageId"] for b in salvaged]
    assert len(ids) == len(set(ids)), "a message was salvaged twice"
    assert not set(ids) & template.acked, "an acked message came back"
    for b in salvaged:
        assert template.pending[json.loads(b)["messageId"]] == b
    assert report.messages == len(salvaged) + (1 if stored_before_recovery else 0)
    share = len(salvaged) / len(template.pending)
    if damage.full:
        assert set(ids) == set(template.pending)
    assert share >= damage.least, f"only {len(salvaged)} of {len(template.pending)} salvaged"
    assert stats.pending == len(salvaged) + 1
    assert integrity(path) == "ok"
    assert elapsed < 30
    # The warning says where the file went and how many messages came back.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        str(report.moved_to) in w and f"salvaged {report.messages} messages" in w for w in warnings
    )
    print(
        f"\n[corrupt:{damage.name}] salvaged={len(salvaged)}/{len(template.pending)} "
        f"dead_letters={report.dead_letters} unreadable={report.unreadable} "
        f"detected={'open' if opened_recovered else 'operation'} seconds={elapsed:.2f}"
    )


def test_garbage_in_the_wal_is_ignored_and_nothing_is_lost(
    template: Seed, damaged_dir: Path
) -> None:
    """SQLite checks every -wal frame's checksum: garbage is no frame at all."""
    path = copy_seed(template, damaged_dir)
    Path(f"{path}-wal").write_bytes(os.urandom(200_000))
    q = Queue(path, recover=True)
    assert q.last_recovery is None
    assert sorted(q.bodies()) == sorted(template.pending.values())
    q.close()
    assert moved_files(path) == []
    assert integrity(path) == "ok"


def test_a_wal_of_another_database_is_never_written_into_the_main_file(
    template: Seed, damaged_dir: Path
) -> None:
    """Merely opening (and closing) the queue must not checkpoint a foreign -wal into it.

    Before this was checked, ``Queue(path)`` failed on the foreign schema and its
    connection, the last one, checkpointed the -wal on close: the 500 messages were gone.
    """
    path = copy_seed(template, damaged_dir)
    BY_NAME["wal-of-another-application"].apply(path)
    before = files_of(path)
    for _ in range(3):
        with pytest.raises(QueueCorrupt, match="-wal file belongs to another database"):
            Queue(path)
    assert files_of(path) == before
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == len(template.pending)
    finally:
        conn.close()


def test_bytes_flipped_inside_a_message_body_cost_only_that_message(
    template: Seed, damaged_dir: Path, collector: Collector
) -> None:
    """SQLite keeps no checksum of row contents: a flip inside a stored body is invisible to
    it (and to quick_check). The message is sent as it is now; the server rejects that batch
    (not JSON), the delivery splits it down to the one message and dead-letters it; every
    other message is delivered once."""
    path = copy_seed(template, damaged_dir)
    conn = sqlite3.connect(str(path))
    conn.execute("UPDATE destinations SET host = ?", (collector.url,))
    conn.commit()
    conn.close()
    data = path.read_bytes()
    at = data.index(b'"messageId":"seed-400"')
    xor(path, at + 60, 4)  # inside its "pad" text
    q = Queue(path, recover=True)
    assert q.integrity_check() == "ok"  # nothing SQLite could see
    q.close()
    client = Client(WRITE_KEY, host=collector.url, queue_path=path, flusher="none")
    result = client.flush(timeout=60)
    client.close()
    assert result.pending == 0
    assert result.dead_lettered == 1
    received = collector.message_ids()
    assert set(received) == set(template.pending) - {"seed-400"}
    assert max(received.values()) == 1
    dead = Queue(path).dead_letters()
    assert [d.status for d in dead if d.message_id is None] == [400]


# --------------------------------------------------------------------------- recover=False, CLI


@pytest.mark.parametrize("damage", [d for d in DAMAGES if d.at_open], ids=lambda d: d.name)
def test_without_recover_open_refuses_and_touches_nothing(
    template: Seed, damaged_dir: Path, damage: Damage
) -> None:
    path = copy_seed(template, damaged_dir)
    damage.apply(path)
    before = files_of(path)
    with pytest.raises(QueueCorrupt) as info:
        Queue(path)
    assert str(path) in str(info.value)
    assert files_of(path) == before
    assert moved_files(path) == []


def test_without_recover_an_operation_on_a_damaged_page_raises_and_touches_nothing(
    template: Seed, damaged_dir: Path
) -> None:
    path = copy_seed(template, damaged_dir)
    BY_NAME["messages-root-page-flipped"].apply(path)
    before = files_of(path)
    q = Queue(path)
    with pytest.raises(QueueCorrupt, match="not a valid durable-analytics queue"):
        q.append(q.destination(HOST, WRITE_KEY), message(1))
    with pytest.raises(QueueCorrupt):
        q.lease(10, 1_000_000)
    assert q.last_recovery is None
    q.close()
    assert files_of(path) == before
    assert moved_files(path) == []


@pytest.mark.parametrize(
    "name",
    [
        "truncated-to-50%",
        "header-magic-flipped",
        "schema-text-flipped",
        "messages-root-page-flipped",
        "messages-leaf-cell-pointers-flipped",
        "first-sector-garbage",
        "wal-of-another-queue",
    ],
)
def test_drain_exits_3_with_a_clear_message_and_repairs_nothing(
    template: Seed, damaged_dir: Path, name: str
) -> None:
    path = copy_seed(template, damaged_dir)
    BY_NAME[name].apply(path)
    before = files_of(path)
    proc = subprocess.run(
        [sys.executable, "-m", "durable_analytics.cli", "drain", "--queue", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    assert "not a valid durable-analytics queue" in proc.stderr
    assert str(path) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert files_of(path) == before
    assert moved_files(path) == []


# --------------------------------------------------------------------------- never damaged


@pytest.mark.parametrize("recover", [False, True])
def test_a_newer_file_is_never_treated_as_damaged(damaged_dir: Path, recover: bool) -> None:
    path = damaged_dir / "queue.sqlite3"
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body BLOB, new_column TEXT)")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    path.chmod(0o600)
    # Even with a damaged page on top of it: a newer durable-analytics may know better.
    with open(path, "r+b") as f:
        f.seek(PAGE + 10)
        f.write(b"\xff" * 32)
    before = files_of(path)
    with pytest.raises(QueueVersionError):
        Queue(path, recover=recover)
    assert files_of(path) == before
    assert moved_files(path) == []


@pytest.mark.parametrize("recover", [False, True])
def test_another_applications_database_is_refused_and_left_alone(
    damaged_dir: Path, recover: bool
) -> None:
    path = damaged_dir / "queue.sqlite3"
    conn = sqlite3.connect(str(path))
    an_app_database(conn)
    conn.commit()
    conn.close()
    before = files_of(path)
    with pytest.raises(QueueCorrupt, match="not a durable-analytics queue"):
        Queue(path, recover=recover)
    assert files_of(path) == before
    assert moved_files(path) == []


# --------------------------------------------------------------------------- never taken over

NOT_SQLITE = {
    "an-env-file": b"SECRET=abc\n",
    "a-text-file": b"not a database\n" * 500,
    "random-bytes": os.urandom(64 * 1024),
    "a-png": b"\x89PNG\r\n\x1a\n" + os.urandom(4000),
    "json": b'{"queue": "settings"}',
    # Beside a -wal SQLite would accept, the -wal's own header must be right too.
    "beside-a-stray-wal": b"[section]\nkey = value\n" * 20,
}


def dir_state(directory: Path) -> dict[str, tuple[str, int, int]]:
    """Name -> (sha256, mode, inode) of every file: what a refusal must leave as it was."""
    return {
        p.name: (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            stat.S_IMODE(p.stat().st_mode),
            p.stat().st_ino,
        )
        for p in sorted(directory.iterdir())
    }


@pytest.mark.parametrize("recover", [False, True])
@pytest.mark.parametrize("kind", sorted(NOT_SQLITE))
def test_a_file_that_is_not_sqlite_is_refused_and_left_untouched(
    damaged_dir: Path, kind: str, recover: bool
) -> None:
    """A mistyped queue_path never takes over the user's file as a "damaged queue"."""
    path = damaged_dir / "settings.env"
    path.write_bytes(NOT_SQLITE[kind])
    path.chmod(0o644)
    if kind == "beside-a-stray-wal":
        Path(f"{path}-wal").write_bytes(b"not a wal header" * 4)
    before = dir_state(damaged_dir)
    with pytest.raises(QueueCorrupt) as info:
        Queue(path, recover=recover)
    text = str(info.value)
    assert str(path) in text
    assert "not an SQLite database" in text
    assert "point queue_path" in text
    assert "SECRET" not in text  # the file's content is never quoted
    assert dir_state(damaged_dir) == before  # content, name, mode; nothing beside it


def test_a_client_refuses_a_mistyped_queue_path_and_the_cli_exits_3(
    damaged_dir: Path, collector: Collector
) -> None:
    path = damaged_dir / "settings.env"
    path.write_bytes(b"SECRET=abc\n")
    path.chmod(0o644)
    before = dir_state(damaged_dir)
    with pytest.raises(QueueCorrupt, match="not an SQLite database"):
        Client(WRITE_KEY, host=collector.url, queue_path=path, flusher="none", on_exit="none")
    for args in (
        ["track", "--write-key", WRITE_KEY, "--user-id", "u", "--event", "E"],
        ["status"],
        ["drain"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "durable_analytics.cli", *args, "--queue", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(),
            check=False,
        )
        assert proc.returncode == 3, (args, proc.stdout, proc.stderr)
        assert "not an SQLite database" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert dir_state(damaged_dir) == before
    assert collector.message_ids() == {}


def test_a_main_file_of_garbage_beside_the_queues_wal_is_not_refused(damaged_dir: Path) -> None:
    """The -wal's header is evidence that SQLite used the file (a recovery's or a new
    queue's content can sit there before a checkpoint writes the main file): not refused,
    and every message the -wal holds is read from it."""
    path = damaged_dir / "queue.sqlite3"
    q = Queue(path)
    dest = q.destination(HOST, WRITE_KEY)
    for i in range(20):
        q.append(dest, message(i))
    size, wal = path.stat().st_size, Path(f"{path}-wal").read_bytes()
    q.close()
    path.write_bytes(os.urandom(size))
    Path(f"{path}-wal").write_bytes(wal)
    q = Queue(path)
    lease = q.lease(100, 1 << 30)
    q.close()
    assert lease is not None
    assert [json.loads(b)["messageId"] for b in lease.bodies] == [f"seed-{i}" for i in range(20)]
    assert moved_files(path) == []


# --------------------------------------------------------------------------- processes

OPEN_AND_APPEND = """
import json, sys, time
from durable_analytics._store.sqlite import SqliteQueue as Queue
path, name, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import os
while not os.path.exists(go):
    time.sleep(0.001)
q = Queue(path, recover=True)
dest = q.destination("https://api.example.test", "test-write-key-0001")
ids = []
for i in range(n):
    body = json.dumps({"type": "track", "messageId": f"{name}-{i}", "properties": {}}).encode()
    ids.append(q.append(dest, body))
print(json.dumps({"stored": sum(1 for i in ids if i), "recovered": q.last_recovery is not None}))
q.close()
"""


@pytest.mark.parametrize(
    "name", ["messages-root-page-flipped", "header-magic-flipped", "wal-of-another-queue"]
)
def test_processes_meeting_the_damage_at_once_recover_it_once_and_lose_no_append(
    template: Seed, damaged_dir: Path, name: str
) -> None:
    path = copy_seed(template, damaged_dir)
    BY_NAME[name].apply(path)
    go = damaged_dir / "go"
    procs = [start_python(OPEN_AND_APPEND, str(path), f"p{k}", "300", str(go)) for k in range(4)]
    time.sleep(0.3)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["stored"] for r in results] == [300] * 4
    assert sum(r["recovered"] for r in results) == 1, results
    mains = [p for p in moved_files(path) if not p.name.endswith(("-wal", "-shm"))]
    assert len(mains) == 1, moved_files(path)
    ids = [json.loads(b)["messageId"] for b in pending_bodies(path)]
    assert len(ids) == len(set(ids)), "duplicates"
    appended = {f"p{k}-{i}" for k in range(4) for i in range(300)}
    assert appended <= set(ids)
    assert set(ids) - appended == set(template.pending)
    assert integrity(path) == "ok"


HOLDER = """
import json, sys
from durable_analytics._store.sqlite import SqliteQueue as Queue
q = Queue(sys.argv[1])
dest = q.destination("https://api.example.test", "test-write-key-0001")
print("open", flush=True)
sys.stdin.readline()             # the parent recovers the file meanwhile
for i in range(200):
    q.append(dest, json.dumps({"type": "track", "messageId": f"holder-{i}"}).encode())
print("appended", q.pending(), flush=True)
q.close()
"""


def test_another_process_with_the_file_open_moves_to_the_recovered_content(
    template: Seed, damaged_dir: Path
) -> None:
    """The recovery rewrites the file in place through SQLite: a connection another process
    holds sees the fresh queue at its next transaction, and its last close (which deletes
    the -wal and -shm by name) cannot hit the fresh file's, as it could after a rename."""
    path = copy_seed(template, damaged_dir)
    BY_NAME["messages-root-page-flipped"].apply(path)
    holder = start_python(HOLDER, str(path), stdin=subprocess.PIPE)
    assert holder.stdout is not None
    assert holder.stdin is not None
    assert holder.stdout.readline().strip() == "open"

    q = Queue(path, recover=True)
    dest = q.destination(HOST, WRITE_KEY)
    assert q.append(dest, message(50_000)) > 0
    assert q.last_recovery is not None

    holder.stdin.write("go\n")
    holder.stdin.flush()
    out, err = holder.communicate(timeout=60)
    assert holder.returncode == 0, err
    assert "appended" in out
    # The holder closed its connection (maybe the last but ours): ours still works.
    assert q.append(dest, message(50_001)) > 0
    ids = {json.loads(b)["messageId"] for b in q.bodies()}
    q.close()
    assert {f"holder-{i}" for i in range(200)} <= ids
    assert {"seed-50000", "seed-50001"} <= ids
    assert set(template.pending) <= ids
    assert integrity(path) == "ok"


CLIENT_ON_A_DAMAGED_FILE = """
import functools, json, sys
import durable_analytics._client as client_module
from durable_analytics import Client
from durable_analytics._store.sqlite import SqliteQueue as Queue
# The Client opens its queue with recover=True (until it does by itself, this stands in).
client_module.Queue = functools.partial(Queue, recover=True)
path, host, key = sys.argv[1], sys.argv[2], sys.argv[3]
client = Client(key, host=host, queue_path=path, flusher="none", on_exit="none")
ok, msg = client.track("user-new", "After Recovery", message_id="after-recovery")
result = client.flush(timeout=30)
print(json.dumps({"ok": ok, "sent": result.sent, "pending": result.pending,
                  "moved": str(client.queue.last_recovery.moved_to)}))
"""


@pytest.mark.parametrize("name", ["header-magic-flipped", "messages-root-page-flipped"])
def test_a_client_on_a_damaged_file_delivers_every_salvaged_message(
    template: Seed, damaged_dir: Path, name: str, collector: Collector
) -> None:
    path = copy_seed(template, damaged_dir)
    # The seed's destination host is not this collector: point it there.
    conn = sqlite3.connect(str(path))
    conn.execute("UPDATE destinations SET host = ?", (collector.url,))
    conn.commit()
    conn.close()
    BY_NAME[name].apply(path)
    proc = start_python(CLIENT_ON_A_DAMAGED_FILE, str(path), collector.url, WRITE_KEY)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] is True
    assert result["pending"] == 0
    received = collector.message_ids()
    assert set(received) == set(template.pending) | {"after-recovery"}
    assert max(received.values()) == 1
    assert Path(result["moved"]).exists()


HOST_SURVIVES = """
import json, logging, os, sys, time
sys.path[:0] = [sys.argv[2], os.path.dirname(sys.argv[2])]
from durable_analytics._store.sqlite import SqliteQueue as Queue
import test_corrupt_files as t
logging.disable(logging.WARNING)
seed = t.Seed(t.Path(sys.argv[1]), {}, frozenset(), frozenset())
for damage in t.DAMAGES:
    d = t.Path(sys.argv[3]) / damage.name
    d.mkdir(mode=0o700)
    p = t.copy_seed(seed, d)
    damage.apply(p)
    started = time.monotonic()
    q = Queue(p, recover=True)
    dest = q.destination("https://h", "k")
    q.append(dest, b'{"type":"track"}')
    q.lease(10_000, 1 << 40)
    q.close()
    print(damage.name, round(time.monotonic() - started, 3), flush=True)
print("survived", flush=True)
"""


def test_the_host_process_survives_every_damage_in_turn(template: Seed, tmp_path: Path) -> None:
    """One child process meets every damage above, one after another: it neither crashes
    nor hangs, and ends normally."""
    here = str(Path(__file__).resolve().parent)
    proc = start_python(HOST_SURVIVES, str(template.path), here, str(tmp_path))
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    lines = out.strip().splitlines()
    assert lines[-1] == "survived"
    assert len(lines) == len(DAMAGES) + 1
    slowest = max(float(line.split()[1]) for line in lines[:-1])
    print(f"\n[corrupt:host-survives] cases={len(DAMAGES)} slowest={slowest:.2f}s")
    assert slowest < 30


def test_recover_option_is_a_keyword_with_a_false_default() -> None:
    """The CLI opens queues with ``Queue(path)``: no repair unless asked for."""
    assert functools.partial(Queue, recover=True).keywords == {"recover": True}
    import inspect

    parameter = inspect.signature(Queue).parameters["recover"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    assert parameter.default is False
