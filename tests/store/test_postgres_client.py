"""Choosing the PostgreSQL queue (queue_url, the module setting, --queue, the environment)
and the outbox through the Client's calls, delivered to a real Collector."""

from __future__ import annotations

import random
from collections.abc import Iterator

import psycopg
import pytest
from click.testing import CliRunner
from conftest import WRITE_KEY

import durable_analytics
from durable_analytics import Client, Staged, Track
from durable_analytics._config import Config
from durable_analytics.cli import cli
from durable_analytics.exceptions import ConfigError
from durable_analytics.testing import Collector


@pytest.fixture
def url(pg_dsn: str, pg_schema: str) -> str:
    return f"{pg_dsn}&schema={pg_schema}"


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(WRITE_KEY) as c:
        yield c


@pytest.fixture
def app(pg_dsn: str, pg_schema: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """The application's own connection, with an orders table of its own."""
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(f'CREATE TABLE "{pg_schema}_orders" (id serial PRIMARY KEY, note text)')
        conn.commit()
        yield conn


def test_a_client_with_queue_url_delivers_through_postgresql(
    url: str, collector: Collector
) -> None:
    with Client(WRITE_KEY, host=collector.url, queue_url=url, on_exit="none") as client:
        assert type(client.queue).__name__ == "PostgresQueue"
        for i in range(30):
            assert client.track(user_id="u", event="Ordered", properties={"i": i})[0]
        assert client.flush(timeout=30).pending == 0
    assert len(collector.message_ids()) == 30


def test_a_url_in_queue_path_or_the_environment_selects_postgresql(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Config.build(WRITE_KEY, queue_path=url).queue_url == url
    monkeypatch.setenv("DURABLE_ANALYTICS_QUEUE", url)
    from_env = Config.build(WRITE_KEY)
    assert from_env.queue_url == url
    assert "postgresql" not in str(from_env.queue_path)  # no file named after the URL
    with pytest.raises(ConfigError, match="not both"):
        Config.build(WRITE_KEY, queue_path="/tmp/q.sqlite3", queue_url=url)
    with pytest.raises(ConfigError, match="postgresql://"):
        Config.build(WRITE_KEY, queue_url="mysql://nope")


def test_the_password_of_the_queue_url_is_never_shown() -> None:
    config = Config.build(WRITE_KEY, queue_url="postgresql://app:s3cret-pw@db:5432/app")
    assert "s3cret" not in repr(config)
    assert config.queue_name == "postgresql://app:***@db:5432/app"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://app@db/app?schema=q&password=s3cret-pw",
            "postgresql://app@db/app?schema=q&password=***",
        ),
        (
            "postgresql://app:s3cret-pw@db/app?sslpassword=s3cret-key&sslmode=require",
            "postgresql://app:***@db/app?sslpassword=***&sslmode=require",
        ),
    ],
)
def test_a_password_given_as_a_url_parameter_is_never_shown_either(url: str, shown: str) -> None:
    """libpq takes ``?password=`` too: it was shown in ``repr(Client)``, ``status``, the
    Prometheus labels and the queue-full warning (only ``user:password@`` was masked)."""
    config = Config.build(WRITE_KEY, queue_url=url)
    assert config.queue_name == shown
    assert "s3cret" not in repr(config)
    client = Client(WRITE_KEY, queue_url=url, send=False)
    assert "s3cret" not in repr(client)


def test_the_module_level_queue_url_setting(
    url: str, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable_analytics, "write_key", WRITE_KEY)
    monkeypatch.setattr(durable_analytics, "host", collector.url)
    monkeypatch.setattr(durable_analytics, "queue_url", url)
    monkeypatch.setattr(durable_analytics, "default_client", None)
    try:
        assert durable_analytics.track("u", "Signed Up")[0]
        client = durable_analytics.default_client
        assert client is not None
        assert type(client.queue).__name__ == "PostgresQueue"
        assert durable_analytics.flush(timeout=30).pending == 0
    finally:
        client = durable_analytics.default_client
        if client is not None:
            client.close(0)
            client._exited = True  # its exit handler would find the test server gone
    assert len(collector.message_ids()) == 1


def test_the_cli_works_on_a_queue_url(url: str, collector: Collector) -> None:
    client = Client(WRITE_KEY, host=collector.url, queue_url=url, flusher="none", on_exit="none")
    for i in range(5):
        client.track(user_id="u", event="Ordered", properties={"i": i})
    runner = CliRunner(env={"DURABLE_ANALYTICS_QUEUE": None})
    status = runner.invoke(cli, ["status", "--queue", url], catch_exceptions=False)
    assert status.exit_code == 0, status.output
    assert "5 messages" in status.output
    assert "dead rows" in status.output  # the PostgreSQL table's health line
    drained = CliRunner(env={"DURABLE_ANALYTICS_QUEUE": url}).invoke(
        cli, ["drain"], catch_exceptions=False
    )
    assert drained.exit_code == 0, drained.output
    assert len(collector.message_ids()) == 5


def test_calls_given_a_connection_are_staged_in_the_callers_transaction(
    url: str, pg_schema: str, collector: Collector, app: psycopg.Connection[tuple[object, ...]]
) -> None:
    client = Client(WRITE_KEY, host=collector.url, queue_url=url, on_exit="none")
    with app.transaction():
        app.execute(f'INSERT INTO "{pg_schema}_orders" (note) VALUES (%s)', ("a",))
        result = client.track("u", "Order Completed", connection=app)
        typed = client.enqueue(Track(user_id="u", event="Shipped"), connection=app)
        assert isinstance(result, Staged)
        assert isinstance(typed, Staged)
        assert result[0] is True
        assert client.queue.pending() == 0  # not committed: invisible to every flusher
    assert client.flush(timeout=30).pending == 0
    client.close(0)
    assert set(collector.message_ids()) == {result[1]["messageId"], typed[1]["messageId"]}


def test_connection_needs_a_postgresql_queue(
    tmp_path: object, queue_path: object, app: psycopg.Connection[tuple[object, ...]]
) -> None:
    client = Client(WRITE_KEY, queue_path=queue_path, flusher="none", on_exit="none")
    with pytest.raises(ConfigError, match="needs a PostgreSQL queue"):
        client.track("u", "Order Completed", connection=app)
    assert client.queue.pending() == 0


def test_of_1000_client_transactions_half_rolled_back_exactly_the_committed_half_arrives(
    url: str, pg_schema: str, collector: Collector, app: psycopg.Connection[tuple[object, ...]]
) -> None:
    rng = random.Random(3)
    outcomes = [True] * 500 + [False] * 500
    rng.shuffle(outcomes)
    committed = set()
    with Client(WRITE_KEY, host=collector.url, queue_url=url, on_exit="none") as client:
        for n, commit in enumerate(outcomes):
            with app.transaction() as tx:
                app.execute(f'INSERT INTO "{pg_schema}_orders" (note) VALUES (%s)', (str(n),))
                _, message = client.track("u", "Order Completed", {"n": n}, connection=app)
                if not commit:
                    raise psycopg.Rollback(tx)
                committed.add(message["messageId"])
        assert client.flush(timeout=60).pending == 0
    received = collector.message_ids()
    assert len(committed) == 500
    assert set(received) == committed
    assert all(count == 1 for count in received.values())
