"""The fleet-wide in-flight window of each destination, stored on the PostgreSQL queue.

Each destination's row keeps an AIMD window: ``window_limit`` (at most ``window_max``, this
queue's ``fleet_max_in_flight``), halved by ``congested`` once per ``window_epoch`` (a
request leased before the last halving does not halve again) and grown by one by every
``ack``. The slots in use are the destination's live leases, one row each in ``leases``:
entered by ``lease``, removed when a settlement (``ack``, ``release``, ``retry_later``,
``dead_letter``) leaves none of the lease's messages under it, when its holder is taken
over, or by ``reclaim_expired`` once expired; an expired row no longer counts even before.
The count is never kept as a number that could drift: it is counted from those rows, so a
holder that crashed cannot keep a slot past its takeover or its ``lease_timeout``.

Two holders never both take the last slot: ``lease`` first chooses the destination and
takes its transaction-level advisory lock (``CHOOSE``), then counts and leases in a
statement of its own, whose snapshot sees every lease committed before the lock was
granted (the pattern of ``_caps.py``'s counted appends).
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

from durable_analytics._store.base import Lease
from durable_analytics.exceptions import QueueError

from . import _sql as q
from ._caps import Runner
from ._conn import Connection
from ._schema import Sql

__all__ = ["StoredWindow", "window_class"]

log = logging.getLogger("durable_analytics.queue")

# Halve the window, once per epoch; never below one slot.
CONGESTED = """
UPDATE {s}.destinations
SET window_limit = greatest(1, least(coalesce(window_limit, %(max)s),
                                     coalesce(window_max, %(max)s)) / 2),
    window_epoch = window_epoch + 1
WHERE id = %(dest)s AND window_epoch = %(epoch)s
"""

WINDOW = """
SELECT least(floor(coalesce(d.window_limit, %(max)s)), coalesce(d.window_max, %(max)s))::int,
    (SELECT count(*) FROM {s}.leases l WHERE l.dest = d.id AND l.expires >= now())
FROM {s}.destinations d WHERE d.id = %(dest)s
"""


def window_class(schema: str) -> int:
    """The first key of every window lock of the queue in ``schema``."""
    return zlib.crc32(f"durable-analytics-window:{schema}".encode()) & ((1 << 31) - 1)


class StoredWindow:
    """The ``InFlightWindow`` of a PostgreSQL queue: one per destination, for the fleet."""

    def __init__(self, run: Runner, sql: Sql, *, max_in_flight: int) -> None:
        self._tx = run
        self._sql = sql
        #: The most leases of one destination live at once, fleet-wide.
        self.max_in_flight = max_in_flight
        self.key_class = window_class(sql.schema)

    def choose(self, conn: Connection, params: dict[str, Any]) -> int | None:
        """In the lease's transaction: the destination to lease from, its window locked.

        None when no destination has ready messages and room in its window. The lock is
        held until the transaction ends; the caller's next statement counts again.
        """
        params["max"] = self.max_in_flight
        params["cls"] = self.key_class
        row = conn.execute(self._sql(q.CHOOSE), params).fetchone()
        return None if row is None else int(row[0])

    def congested(self, lease: Lease) -> None:
        """Halve the destination's window for every holder (once per round trip)."""
        params = {
            "dest": lease.destination.id,
            "epoch": lease.window_epoch,
            "max": self.max_in_flight,
        }
        try:
            self._tx(lambda c: c.execute(self._sql(CONGESTED), params))
        except QueueError:
            log.warning("could not halve the stored in-flight window", exc_info=True)

    def state(self, dest_id: int) -> tuple[int, int]:
        """``(window, live leases)`` of a destination now."""
        params = {"dest": dest_id, "max": self.max_in_flight}
        row = self._tx(lambda c: c.execute(self._sql(WINDOW), params).fetchone())
        if row is None:
            return self.max_in_flight, 0
        return int(row[0]), int(row[1])

    def limit(self, dest_id: int) -> int | None:
        """The destination's window now (live leases of it never exceed this)."""
        return self.state(dest_id)[0]

    def live(self, dest_id: int) -> int:
        """How many leases of the destination are live now (the slots in use)."""
        return self.state(dest_id)[1]
