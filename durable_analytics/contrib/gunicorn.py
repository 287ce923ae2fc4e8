"""gunicorn server hooks: close this worker's clients when it exits.

In ``gunicorn.conf.py``::

    from durable_analytics.contrib.gunicorn import worker_exit  # noqa: F401

gunicorn calls ``worker_exit`` in the worker after a graceful stop (SIGTERM, SIGHUP, a
``max_requests`` recycle): every client of the worker delivers what it queued, within its
``shutdown_timeout`` (keep that under gunicorn's ``graceful_timeout``, 30 s by default, or the
arbiter kills the worker first; what is not delivered stays on disk). No ``post_fork`` hook
is needed: a client built before the fork (``--preload``) resets itself in each worker and
starts the worker's own flusher on its first call.
"""

from __future__ import annotations

from typing import Any

from durable_analytics.contrib._close import close_clients

__all__ = ["worker_exit"]


def worker_exit(server: Any, worker: Any) -> None:
    """The ``worker_exit`` hook: close every client of the exiting worker."""
    result = close_clients()
    log = getattr(server, "log", None)
    if log is not None and (result.sent or result.pending):
        log.info(
            "durable-analytics: worker %s delivered %d %s at exit; %d pending in the queue",
            getattr(worker, "pid", "?"),
            result.sent,
            "message" if result.sent == 1 else "messages",
            result.pending,
        )
