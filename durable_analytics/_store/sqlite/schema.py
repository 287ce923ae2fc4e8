"""The queue file's schema, its migrations, and the checks that a file is ours and not newer."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

from durable_analytics.exceptions import QueueCorrupt, QueueVersionError

SCHEMA_VERSION = 3

SCHEMA_V1 = """
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

# Version 2: messages waiting out a retry (not_before set) are few and have their own
# partial index, which an append (not_before NULL) never touches: "when is the next message
# ready" is answered from it without reading the backlog of a destination that backs off.
SCHEMA_V2 = """
CREATE INDEX messages_waiting ON messages (dest, not_before) WHERE not_before IS NOT NULL;
"""

# Version 3: the index of messages by destination that appends do not write (bydest.py):
# leasing one destination and polling cost what that destination holds, not the backlog
# of another. Built here from the messages already queued; the trigger deletes a message's
# entry with the message, whichever statement deletes it.
SCHEMA_V3 = """
CREATE TABLE dest_ids (
    dest INTEGER NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (dest, id)
) WITHOUT ROWID;
INSERT INTO dest_ids (dest, id) SELECT dest, id FROM messages ORDER BY dest, id;
CREATE TRIGGER dest_ids_forget AFTER DELETE ON messages BEGIN
    DELETE FROM dest_ids WHERE dest = OLD.dest AND id = OLD.id;
END;
"""

# Migrations from version N to N + 1, applied in one transaction each.
MIGRATIONS: dict[int, str] = {0: SCHEMA_V1, 1: SCHEMA_V2, 2: SCHEMA_V3}

INSERT = "INSERT INTO messages (dest, body, size, enqueued_at) VALUES (?, ?, ?, ?)"
# Writes nothing (and so costs no page) unless the destination has a backoff to forget.
CLEAR_BACKOFF = (
    "UPDATE destinations SET not_before = 0, failures = 0 "
    "WHERE id = ? AND (failures != 0 OR not_before != 0)"
)
#: The counter of dead letters purged to keep them within max_dead_letter_bytes.
PURGED_COUNTER = "dead_letters_purged"


def apply_migrations(conn: sqlite3.Connection, version: int) -> None:
    """Bring a file from ``version`` to SCHEMA_VERSION (inside the caller's transaction)."""
    while version < SCHEMA_VERSION:
        # Statements end at a ";" that completes one (a trigger's body holds several).
        statement = ""
        for part in MIGRATIONS[version].split(";"):
            statement = statement + part + ";"
            if sqlite3.complete_statement(statement):
                if statement.strip(" \n;"):
                    conn.execute(statement)
                statement = ""
        version += 1
        conn.execute(f"PRAGMA user_version={version}")


def stamp_application_id(conn: sqlite3.Connection, app_id: int = 0) -> None:
    """Give the file a random application_id, once (inside the caller's transaction).

    It identifies this very file: a -wal whose page 1 carries another id belongs to another
    database (see ``Recovery.diagnose``).
    """
    if not conn.execute("PRAGMA application_id").fetchone()[0]:
        value = app_id if 0 < app_id <= 0x7FFFFFFF else (uuid.uuid4().int & 0x7FFFFFFF) or 1
        conn.execute(f"PRAGMA application_id={value}")


def check_version(path: Path, version: int, tables: int) -> None:
    """Refuse a file of a newer schema version, or a version-0 file with tables of its own."""
    if version > SCHEMA_VERSION:
        raise QueueVersionError(
            f"the queue {path} has schema version {version}, newer than this "
            f"durable-analytics knows ({SCHEMA_VERSION}); upgrade durable-analytics, or "
            "point queue_path at another file"
        )
    if version == 0 and tables:
        # A version-0 file must be empty (ours, just created); anything else is foreign.
        raise QueueCorrupt(
            f"{path} is an SQLite database but not a durable-analytics queue "
            "(it has tables of its own); point queue_path at another file"
        )


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the file to SCHEMA_VERSION in one transaction, unless it is there already."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version == SCHEMA_VERSION:
        return
    check_version(path, version, 0)
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[
            0
        ]
        check_version(path, version, int(tables) if version == 0 else 0)
        apply_migrations(conn, version)
        stamp_application_id(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def destination_in(conn: sqlite3.Connection, host: str, write_key: str) -> int:
    """The id of a destination, created if new (inside the caller's write transaction)."""
    row = conn.execute(
        "SELECT id FROM destinations WHERE host = ? AND write_key = ?", (host, write_key)
    ).fetchone()
    if row is not None:
        return int(row[0])
    cur = conn.execute(
        "INSERT INTO destinations (host, write_key) VALUES (?, ?)", (host, write_key)
    )
    return int(cur.lastrowid or 0)
