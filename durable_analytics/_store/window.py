"""Where a destination's in-flight window lives: in each process, or in the queue's store.

Every process keeps its own AIMD window per destination (``_pipeline.Window``: at most its
``max_in_flight`` requests outstanding, halved on 429/5xx, grown by one per success). A
queue shared by processes on many hosts (PostgreSQL) also keeps one window per destination
for all of them: its ``lease`` refuses a destination whose live leases reached the window,
a success (``ack``) grows it by one up to its max, and ``congested`` halves it, so one 429
slows every process of every host. Delivery asks the queue's ``window`` and never tests
which backend it has (docs/ARCHITECTURE.md, "Pipelining and congestion").
"""

from __future__ import annotations

from typing import Protocol

from .base import Lease

__all__ = ["PROCESS_WINDOW", "InFlightWindow", "ProcessWindow"]


class InFlightWindow(Protocol):
    """Where the in-flight window of a queue's destinations lives (``QueueBackend.window``)."""

    def congested(self, lease: Lease) -> None:
        """The server answered ``lease``'s request with 429, 5xx or not at all: halve.

        Once per round trip: a request leased before the last halving does not halve the
        window again. Never raises (a lost signal only leaves the window wider a while).
        """
        ...

    def limit(self, dest_id: int) -> int | None:
        """The destination's window now, for every process sharing the queue.

        ``None`` when the window lives in each process only (``_pipeline.Window``).
        """
        ...


class ProcessWindow:
    """The window lives in each process: the queue keeps none (SQLite, memory).

    Each process's ``_pipeline.Window`` already halved on the answer and grows on its own
    successes; processes on one host sharing an SQLite queue keep a window each (at most
    ``max_in_flight`` requests per process) and share the stored backoff.
    """

    def congested(self, lease: Lease) -> None:
        """Nothing to do here: the process's own window took the signal."""

    def limit(self, dest_id: int) -> int | None:
        """None: no window is shared beyond this process."""
        return None


#: The one ``ProcessWindow`` (it keeps no state).
PROCESS_WINDOW = ProcessWindow()
