"""The ``durable-analytics`` command: drain, status, worker, dead letters, enqueue, collector, demo.

A thin layer of click over the library, one module per command group, and never the other
way round: nothing in the package imports this package. Delivery is the library's
``_drain.drain_queue`` (``drain``, ``demo``) and a ``Flusher`` over ``make_deliverer``
(``worker``); inspection is ``QueueBackend.stats()`` and the dead-letter calls (``status``,
``dead_letters``); enqueueing is a ``Client(flusher="none")`` with commands generated from
``_calls.CALLS`` (``enqueue``); ``collector`` and ``demo`` run ``testing.Collector``.
The group itself, its errors and exit codes live in ``_app``.

Every error is one line on stderr, ``durable-analytics: error: ...``, and one of the exit
codes below (a traceback only with ``-v``):

    0    done (drain: nothing deliverable is left)
    1    some messages could not be sent (server down, refused, timeout, the queue stayed
         locked by another process), or another failure
    2    usage or configuration error: a bad option, bad JSON, a missing field or write key
    3    the queue file is missing (drain, status, dead-letters), unreadable or corrupt
    130  interrupted
"""

from __future__ import annotations

# Importing a command module registers its commands on the group.
from . import collector, dead_letters, demo, drain, enqueue, status, worker
from ._app import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_QUEUE,
    EXIT_UNDELIVERED,
    EXIT_USAGE,
    cli,
    main,
)

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_QUEUE",
    "EXIT_UNDELIVERED",
    "EXIT_USAGE",
    "cli",
    "main",
]

_COMMAND_MODULES = (collector, dead_letters, demo, drain, enqueue, status, worker)
