"""The transactional outbox: a message staged on the caller's connection exists iff it commits.

Counted at a real ``testing.Collector``: of 1,000 application transactions, half rolled
back, exactly the committed half is delivered, each once.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import psycopg
import pytest
from conftest import WRITE_KEY

from durable_analytics._config import Config
from durable_analytics._drain import drain_queue
from durable_analytics._store.postgres._queue import PostgresQueue
from durable_analytics.exceptions import ConfigError
from durable_analytics.testing import Collector


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


def test_of_1000_transactions_half_rolled_back_exactly_the_committed_half_is_delivered(
    pg_dsn: str, pg_schema: str, app: psycopg.Connection[tuple[object, ...]]
) -> None:
    rng = random.Random(7)
    with Collector(WRITE_KEY) as collector:
        q = PostgresQueue(pg_dsn, schema=pg_schema)
        dest = q.destination(collector.url, WRITE_KEY)
        committed: set[str] = set()
        outcomes = [True] * 500 + [False] * 500
        rng.shuffle(outcomes)
        for n, commit in enumerate(outcomes):
            with app.transaction() as tx:
                app.execute(f'INSERT INTO "{pg_schema}_orders" (note) VALUES (%s)', (str(n),))
                q.stage(dest, body(f"order-{n}"), app)
                if commit:
                    committed.add(f"order-{n}")
                else:
                    raise psycopg.Rollback(tx)  # psycopg rolls the block back, silently
        result = drain_queue(q, Config.build(WRITE_KEY), timeout=60)
        assert result.left == 0
    received = collector.message_ids()
    orders = app.execute(f'SELECT count(*) FROM "{pg_schema}_orders"').fetchone()
    assert orders == (500,)
    assert set(received) == committed
    assert len(committed) == 500
    assert all(count == 1 for count in received.values())
