"""ASGI: the client is closed on lifespan shutdown, so uvicorn's SIGTERM loses nothing."""

from __future__ import annotations

import asyncio
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest

from durable_analytics import Client
from durable_analytics.contrib.asgi import AnalyticsLifespan, closing
from durable_analytics.testing import Collector
from tests.conftest import WRITE_KEY
from tests.contrib.servers import free_port, get, server, stop
from tests.reliability.oracle import queued_message_ids

EVENTS = 1000

# flush_at above the event count and an hour's flush_interval: the flusher sends nothing on
# its own, so whatever reaches the collector was delivered by the shutdown path.
APP = """
    import contextlib, os
    from fastapi import FastAPI
    from durable_analytics import Client
    from durable_analytics.contrib.asgi import AnalyticsLifespan

    client = Client(os.environ["WK"], host=os.environ["HOST"], queue_path=os.environ["QUEUE"],
                    flush_at=5000, flush_interval=3600, shutdown_timeout=20)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        client.track("server", "Server Stopped")  # the app's own shutdown still reaches us

    app = FastAPI(lifespan=lifespan)

    @app.get("/hit/{n}")
    async def hit(n: int):
        client.track(f"user-{n}", "Hit", {"n": n})
        return {"ok": True}

    if os.environ.get("MODE") == "middleware":
        app.add_middleware(AnalyticsLifespan, client=client)
    elif os.environ.get("MODE") == "wrap":
        app = AnalyticsLifespan(app, client)
"""


@pytest.mark.parametrize("mode", ["wrap", "middleware"])
def test_uvicorn_sigterm_delivers_every_event_with_the_lifespan_integration(
    tmp_path: Path, collector: Collector, mode: str
) -> None:
    """1,000 tracked events, SIGTERM: all 1,000 (and the app's shutdown event) arrive."""
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    queue = tmp_path / "q.sqlite3"
    port = free_port()
    env = {"WK": WRITE_KEY, "HOST": collector.url, "QUEUE": str(queue), "MODE": mode}
    argv = ["uvicorn", "app:app", "--port", str(port), "--log-level", "warning"]
    with server(argv, tmp_path, env, port) as proc:
        assert get(port, [f"/hit/{n}" for n in range(EVENTS)], connections=4) == [200] * EVENTS
        assert collector.requests == 0  # nothing delivered before shutdown
        code = stop(proc, signal.SIGTERM)
    assert code == -signal.SIGTERM  # uvicorn dies of the re-raised signal: no atexit
    ids = collector.message_ids()
    events = [m["event"] for m in collector.messages()]
    assert events.count("Hit") == EVENTS
    assert events.count("Server Stopped") == 1
    assert max(ids.values()) == 1  # no duplicates
    assert sum(queued_message_ids(queue).values()) == 0  # nothing left on disk


def test_uvicorn_with_two_workers_delivers_every_event_on_sigterm(
    tmp_path: Path, collector: Collector
) -> None:
    """--workers 2: the supervisor's SIGTERM reaches both workers; each closes its client."""
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    queue = tmp_path / "q.sqlite3"
    port = free_port()
    env = {"WK": WRITE_KEY, "HOST": collector.url, "QUEUE": str(queue), "MODE": "middleware"}
    argv = ["uvicorn", "app:app", "--port", str(port), "--workers", "2", "--log-level", "warning"]
    with server(argv, tmp_path, env, port) as proc:
        assert get(port, [f"/hit/{n}" for n in range(EVENTS)], connections=8) == [200] * EVENTS
        assert collector.requests == 0
        stop(proc, signal.SIGTERM)
    ids = collector.message_ids()
    events = [m["event"] for m in collector.messages()]
    assert events.count("Hit") == EVENTS
    assert events.count("Server Stopped") == 2  # one per worker: both shut down cleanly
    assert max(ids.values()) == 1
    assert sum(queued_message_ids(queue).values()) == 0


def test_uvicorn_sigterm_without_the_integration_leaves_events_on_disk(
    tmp_path: Path, collector: Collector
) -> None:
    """The control: without the integration uvicorn's SIGTERM skips the exit flush."""
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    queue = tmp_path / "q.sqlite3"
    port = free_port()
    env = {"WK": WRITE_KEY, "HOST": collector.url, "QUEUE": str(queue), "MODE": "none"}
    argv = ["uvicorn", "app:app", "--port", str(port), "--log-level", "warning"]
    events = 200
    with server(argv, tmp_path, env, port) as proc:
        assert get(port, [f"/hit/{n}" for n in range(events)]) == [200] * events
        assert stop(proc, signal.SIGTERM) == -signal.SIGTERM
    assert collector.requests == 0
    assert sum(queued_message_ids(queue).values()) == events + 1  # still safe on disk


# ---------------------------------------------------------------- the protocol, in-process


class _Lifespan:
    """Drive one lifespan exchange the way a server does; record what the app answered."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.answers: list[str] = []

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def send(self, message: Any) -> None:
        self.answers.append(message["type"])

    async def run(self, app: Any, between: Any = None) -> None:
        task = asyncio.ensure_future(app({"type": "lifespan"}, self.receive, self.send))
        await self.inbox.put({"type": "lifespan.startup"})
        while not self.answers:
            await asyncio.sleep(0.001)
        if between is not None:
            between()
        await self.inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 30)


def _client(collector: Collector, queue_path: Path) -> Client:
    return Client(
        WRITE_KEY, host=collector.url, queue_path=queue_path, flush_at=5000, flush_interval=3600
    )


def test_an_app_without_lifespan_support_gets_it_answered_and_the_client_closed(
    collector: Collector, queue_path: Path
) -> None:
    """An app that raises on the lifespan scope (as Django does) still closes the client."""

    async def http_only(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError("only http")

    client = _client(collector, queue_path)
    lifespan = _Lifespan()
    asyncio.run(lifespan.run(AnalyticsLifespan(http_only, client), lambda: client.track("u", "E")))
    assert lifespan.answers == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert collector.wait_for_messages(1)
    assert client.stats().pending == 0


def test_a_failing_app_startup_is_reported_not_swallowed(
    collector: Collector, queue_path: Path
) -> None:
    """When the app answers startup.failed and raises, the server sees both."""

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no db"})
        raise RuntimeError("no db")

    lifespan = _Lifespan()
    middleware = AnalyticsLifespan(broken, _client(collector, queue_path))
    with pytest.raises(RuntimeError, match="no db"):
        asyncio.run(lifespan.run(middleware))
    assert lifespan.answers == ["lifespan.startup.failed"]


def test_closing_closes_the_client_when_the_block_ends(
    collector: Collector, queue_path: Path
) -> None:
    """``async with closing(client)`` delivers what was tracked inside it."""
    client = _client(collector, queue_path)

    async def main() -> None:
        async with closing(client):
            client.track("u", "Inside")

    asyncio.run(main())
    assert [m["event"] for m in collector.messages()] == ["Inside"]
