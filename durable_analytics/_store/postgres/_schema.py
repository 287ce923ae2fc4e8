"""The PostgreSQL queue's tables, their versioned migrations, and the SQL that uses them.

Every table lives in the queue's own schema (``durable_analytics`` unless configured). The
version is a row of ``meta``; migrations run in one transaction under an advisory lock, so
processes opening a fresh database at once create it exactly once, and a schema written by
a newer durable-analytics is refused.

Table settings are chosen for a queue, whose rows are inserted, updated once or twice
(lease, release) and deleted within seconds: ``fillfactor`` leaves room on each page so a
lease's UPDATE stays on its page (a HOT update, no index entry), and autovacuum runs after a
fixed number of dead rows rather than a fraction of the table (a queue's table is small
when healthy, so a fraction would mean almost never). ``docs/POSTGRESQL.md`` explains them.
"""

from __future__ import annotations

import uuid
from typing import Any

from durable_analytics.exceptions import QueueVersionError

from ._conn import Connection

__all__ = ["SCHEMA_VERSION", "Sql", "migrate"]

SCHEMA_VERSION = 3

# How many bytes a row costs beyond its body, for the size cap.
ROW_OVERHEAD = 48

_V1 = """
CREATE TABLE {s}.destinations (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    host text NOT NULL,
    write_key text NOT NULL,
    not_before timestamptz,
    failures integer NOT NULL DEFAULT 0,
    last_error text,
    last_error_at timestamptz,
    UNIQUE (host, write_key)
) WITH (fillfactor = 50);
CREATE TABLE {s}.messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dest bigint NOT NULL,
    body bytea NOT NULL,
    size integer NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    not_before timestamptz,
    lease_token uuid,
    lease_expires timestamptz
) WITH (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0
);
CREATE INDEX messages_dest_id ON {s}.messages (dest, id);
CREATE TABLE {s}.dead_letters (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dest bigint NOT NULL,
    body bytea NOT NULL,
    size integer NOT NULL,
    enqueued_at timestamptz NOT NULL,
    dead_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL,
    status integer,
    reason text NOT NULL,
    excerpt text NOT NULL DEFAULT ''
);
CREATE TABLE {s}.counters (name text PRIMARY KEY, value bigint NOT NULL DEFAULT 0);
INSERT INTO {s}.counters (name) VALUES ('dropped_newest'), ('dropped_oldest'),
    ('dead_letters_purged');
"""

# Version 2: who holds a lease. Each leasing process registers a row of ``holders`` and
# holds a session advisory lock keyed by its id for as long as it lives (``_holders.py``);
# a lease names its holder, so a lease whose holder's lock is gone is taken over at once.
# A column without a default: adding it rewrites nothing.
_V2 = """
ALTER TABLE {s}.messages ADD COLUMN lease_holder bigint;
CREATE TABLE {s}.holders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    since timestamptz NOT NULL DEFAULT now()
);
"""

# Version 3: the fleet-wide in-flight window (``_window.py``). Each destination keeps its
# AIMD window (``window_limit``, halved once per ``window_epoch``, grown by acks up to
# ``window_max``), and ``leases`` holds one row per lease, so the live leases of a
# destination are counted from rows that expire, or go with their holder: a crash cannot
# leak a slot. Leases live at migration time are entered, so they count at once.
_V3 = """
ALTER TABLE {s}.destinations
    ADD COLUMN window_limit double precision,
    ADD COLUMN window_max integer,
    ADD COLUMN window_epoch bigint NOT NULL DEFAULT 0;
CREATE TABLE {s}.leases (
    token uuid PRIMARY KEY,
    dest bigint NOT NULL,
    holder bigint,
    expires timestamptz NOT NULL
) WITH (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 10000
);
CREATE INDEX leases_dest ON {s}.leases (dest, expires);
INSERT INTO {s}.leases (token, dest, holder, expires)
SELECT lease_token, min(dest), min(lease_holder), max(lease_expires) FROM {s}.messages
WHERE lease_token IS NOT NULL AND lease_expires >= now()
GROUP BY lease_token;
"""

# Migrations from version N to N + 1.
_MIGRATIONS: dict[int, str] = {0: _V1, 1: _V2, 2: _V3}


# What the statements use as "now": the server's clock, unless the transaction set
# durable_analytics.now (only a test clock does: PostgresQueue(clock=...)).
NOW = (
    "coalesce(to_timestamp(nullif(current_setting('durable_analytics.now', true), '')"
    "::float8), now())"
)


class Sql:
    """The queue's statements with its schema filled in, as bytes ready for psycopg."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.quoted = f'"{schema}"'
        self._cache: dict[str, bytes] = {}

    def __call__(self, template: str) -> bytes:
        """``template`` with ``{s}`` replaced by the quoted schema name and ``now()`` by NOW."""
        done = self._cache.get(template)
        if done is None:
            done = template.replace("{s}", self.quoted).replace("now()", NOW).encode()
            self._cache[template] = done
        return done


def _version(conn: Connection, sql: Sql) -> tuple[int, str | None]:
    """The schema's version (0: no queue there yet) and its instance id."""
    found = conn.execute("SELECT to_regclass(%s)", [f"{sql.quoted}.meta"]).fetchone()
    if found is None or found[0] is None:
        return 0, None
    rows: dict[str, Any] = dict(conn.execute(sql("SELECT key, value FROM {s}.meta")).fetchall())
    return int(rows.get("version", 0)), rows.get("instance")


def _refuse_newer(version: int, identity: str) -> None:
    if version > SCHEMA_VERSION:
        raise QueueVersionError(
            f"the PostgreSQL queue {identity} has schema version {version}, newer than this "
            f"durable-analytics knows ({SCHEMA_VERSION}): upgrade durable-analytics"
        )


def migrate(conn: Connection, sql: Sql, identity: str) -> str:
    """Create or upgrade the queue's tables; returns the queue's instance id.

    The instance id is a random value stored once: an outbox connection proves it writes
    to this very queue by reading the same id (see ``PostgresQueue.append``).
    """
    version, instance = _version(conn, sql)
    _refuse_newer(version, identity)
    if version == SCHEMA_VERSION and instance:
        return instance
    with conn.transaction():
        # One creator at a time; the lock ends with the transaction.
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('durable-analytics:' || %s))", [sql.schema]
        )
        conn.execute(sql("CREATE SCHEMA IF NOT EXISTS {s}"))
        conn.execute(sql("CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text)"))
        version, instance = _version(conn, sql)
        _refuse_newer(version, identity)
        while version < SCHEMA_VERSION:
            conn.execute(sql(_MIGRATIONS[version]))
            version += 1
        if instance is None:
            instance = uuid.uuid4().hex
            conn.execute(
                sql("INSERT INTO {s}.meta (key, value) VALUES ('instance', %s)"), [instance]
            )
        conn.execute(
            sql(
                "INSERT INTO {s}.meta (key, value) VALUES ('version', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ),
            [str(version)],
        )
    return instance
