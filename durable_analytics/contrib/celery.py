"""Celery: close the client in every pool child and in the worker when they shut down.

In the module that defines the Celery app::

    from durable_analytics.contrib.celery import connect
    connect()              # every client of the process; or connect(client)

A prefork pool child ends with ``os._exit()``, which skips the client's exit handler, so
what a child queued would wait on disk for the next run or a drain. ``connect`` closes the
clients on ``worker_process_shutdown`` (each child, at pool shutdown and on a
``max_tasks_per_child`` recycle) and on ``worker_shutdown`` (the worker itself: solo and
thread pools run tasks there). Each child gets its own flusher without help: a client
inherited through the fork resets itself and starts one on its first call.
"""

from __future__ import annotations

from typing import Any

from durable_analytics import Client
from durable_analytics.contrib._close import close_clients

__all__ = ["connect"]


def connect(client: Client | None = None, *, timeout: float | None = None) -> None:
    """Connect the shutdown signals for ``client`` (default: every client of the process).

    ``timeout`` bounds each close (default: ``shutdown_timeout``); what is not delivered
    by then stays on disk. Calling it again replaces the earlier connection.
    """
    from celery import signals

    def close(**_: Any) -> None:
        close_clients(None if client is None else [client], timeout)

    # Strong references: a closure connected weakly would be collected at once.
    for signal in (signals.worker_process_shutdown, signals.worker_shutdown):
        uid = f"durable_analytics:{signal.name}"
        signal.disconnect(dispatch_uid=uid)
        signal.connect(close, weak=False, dispatch_uid=uid)
