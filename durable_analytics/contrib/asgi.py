"""Close the client when an ASGI server shuts down (FastAPI, Starlette, Django, Quart...).

uvicorn re-raises SIGTERM once its graceful shutdown is over, so the process dies of the
signal and the client's exit handler never runs: what was queued stays on disk. Closing the
client in the lifespan shutdown delivers it first (within ``shutdown_timeout``). Either wrap
the application::

    from durable_analytics.contrib.asgi import AnalyticsLifespan
    app = AnalyticsLifespan(app, client)          # any ASGI app, Django's included

or add it as Starlette/FastAPI middleware (``app.add_middleware(AnalyticsLifespan,
client=client)``), or close it from your own lifespan::

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with closing(client):
            yield

The application's own lifespan runs unchanged; an application that does not speak the
lifespan protocol (Django) gets it answered for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from durable_analytics import Client, FlushResult

__all__ = ["AnalyticsLifespan", "aclose", "closing"]

log = logging.getLogger("durable_analytics.contrib")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def aclose(client: Client, timeout: float | None = None) -> FlushResult:
    """``client.close(timeout)`` in a worker thread, so the event loop keeps running."""
    call = functools.partial(client.close, timeout)
    try:
        import anyio.to_thread  # Starlette's, and works under trio as well
    except ImportError:
        return await asyncio.to_thread(call)
    return await anyio.to_thread.run_sync(call)


@contextlib.asynccontextmanager
async def closing(client: Client, timeout: float | None = None) -> AsyncIterator[Client]:
    """An async context manager that closes ``client`` on the way out (see ``aclose``)."""
    try:
        yield client
    finally:
        await aclose(client, timeout)


class AnalyticsLifespan:
    """ASGI middleware: closes ``client`` when the server's lifespan shutdown arrives.

    Everything but the ``lifespan`` scope passes straight through. The client is closed after
    the application's own shutdown (so events tracked there are delivered too) and before the
    server is told shutdown is complete. ``timeout`` defaults to the client's
    ``shutdown_timeout``.
    """

    def __init__(self, app: ASGIApp, client: Client, *, timeout: float | None = None) -> None:
        self.app = app
        self.client = client
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        received: list[str] = []
        answered: list[str] = []
        closed: list[bool] = []

        async def close_once() -> None:
            if not closed:
                closed.append(True)
                await self._close()

        async def receive_wrapper() -> Message:
            message = await receive()
            received.append(message["type"])
            return message

        async def send_wrapper(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await close_once()
            answered.append(message["type"])
            await send(message)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except Exception:
            if answered:
                raise  # the application speaks lifespan and failed: the server reports it
            # It does not speak lifespan (Django raises for any scope but http/websocket):
            # answer for it, so the client still closes on shutdown.
            log.debug("the ASGI application does not handle lifespan; answering for it")
            if "lifespan.startup" not in received:
                await receive()
            await send({"type": "lifespan.startup.complete"})
            if "lifespan.shutdown" not in received:
                await receive()
            await close_once()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if "lifespan.shutdown" in received:
            await close_once()  # it returned without confirming shutdown

    async def _close(self) -> None:
        try:
            result = await aclose(self.client, self.timeout)
        except Exception:
            log.exception("closing the analytics client failed; its messages stay queued")
            return
        if result.pending:
            log.warning(
                "%d %s queued in %s at shutdown, for the next run or `durable-analytics drain`",
                result.pending,
                "message stays" if result.pending == 1 else "messages stay",
                self.client.config.queue_name,
            )
