"""The transactional outbox at the queue: a message staged on the caller's connection exists
iff the caller commits (the 1,000-transaction count through the Client's calls is in
test_postgres_client.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
from conftest import WRITE_KEY

from durable_analytics._store.postgres._queue import PostgresQueue
from durable_analytics.exceptions import ConfigError


def body(name: str) -> bytes:
    message = {"type": "track", "event": "Order Completed", "userId": "u", "messageId": name}
    return json.dumps(message, separators=(",", ":")).encode()


@pytest.fixture
def app(pg_dsn: str, pg_schema: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """The application's own connection, with an orders table of its own."""
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(f'CREATE TABLE "{pg_schema}_orders" (id serial PRIMARY KEY, note text)')
        conn.commit()
        yield conn


def test_a_staged_message_is_invisible_until_commit_and_gone_on_rollback(
    pg_dsn: str, pg_schema: str, app: psycopg.Connection[tuple[object, ...]]
) -> None:
    q = PostgresQueue(pg_dsn, schema=pg_schema)
    dest = q.destination("https://h.test", WRITE_KEY)

    def order_that_fails() -> None:
        with app.transaction():
            app.execute(f'INSERT INTO "{pg_schema}_orders" (note) VALUES (%s)', ("lost",))
            assert q.stage(dest, body("rolled-back"), app) > 0
            raise ZeroDivisionError  # the application fails after staging

    with pytest.raises(ZeroDivisionError):
        order_that_fails()
    assert q.pending() == 0

    with app.transaction():
        app.execute(f'INSERT INTO "{pg_schema}_orders" (note) VALUES (%s)', ("kept",))
        q.stage(dest, body("committed"), app)
        assert q.pending() == 0  # not committed yet: no flusher can see it
        assert q.lease(10, 1 << 20) is None
    assert q.bodies() == [body("committed")]


def test_a_connection_to_another_database_is_refused_and_its_transaction_left_usable(
    pg_dsn: str, pg_schema: str
) -> None:
    q = PostgresQueue(pg_dsn, schema=pg_schema)
    dest = q.destination("https://h.test", WRITE_KEY)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS other_app")
        admin.execute("CREATE DATABASE other_app")
    other_dsn = pg_dsn.replace("/postgres?", "/other_app?")
    with psycopg.connect(other_dsn) as other:
        other.execute("CREATE TABLE t (x int)")
        with pytest.raises(ConfigError, match="database holding the queue"):
            q.stage(dest, body("nowhere"), other)
        other.execute("INSERT INTO t VALUES (1)")  # the caller's transaction still works
        other.commit()
    # Same server, same database, but another queue's schema: refused as well.
    elsewhere = PostgresQueue(pg_dsn, schema=pg_schema + "_b")
    with psycopg.connect(pg_dsn) as same_db:
        same_db.execute("SELECT 1")
        elsewhere_dest = elsewhere.destination("https://h.test", WRITE_KEY)
        assert elsewhere.stage(elsewhere_dest, body("ok"), same_db) > 0
        same_db.commit()
    with pytest.raises(ConfigError):
        q.stage(dest, body("not a connection"), object())  # type: ignore[arg-type]
    assert q.pending() == 0
