"""Closing clients from framework shutdown hooks, within one shared time budget."""

from __future__ import annotations

import logging
import time

from durable_analytics import Client, FlushResult
from durable_analytics._client_processes import live_clients

__all__ = ["close_clients"]

log = logging.getLogger("durable_analytics.contrib")


def close_clients(clients: list[Client] | None = None, timeout: float | None = None) -> FlushResult:
    """Close ``clients`` (default: every live client of this process), never raising.

    ``timeout`` bounds the whole call (default: the largest ``shutdown_timeout`` among them);
    what is not delivered by then stays on disk for the next process or a drain. Returns the
    summed ``FlushResult``.
    """
    targets = list(live_clients) if clients is None else list(clients)
    if timeout is None:
        timeout = max((c.config.shutdown_timeout for c in targets), default=0.0)
    deadline = time.monotonic() + timeout
    sent = pending = dead = 0
    for client in targets:
        try:
            result = client.close(max(0.0, deadline - time.monotonic()))
        except Exception:
            # A shutdown hook must not fail the server's shutdown; the messages stay queued.
            log.exception("closing %r failed; its messages stay queued", client)
            continue
        sent += result.sent
        pending += result.pending
        dead += result.dead_lettered
    return FlushResult(sent, pending, dead)
