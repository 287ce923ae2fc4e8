"""The PostgreSQL queue's caps: ``max_queue_bytes``, ``max_queue_size`` and the dead letters.

Measuring a shared table is a scan, so each process keeps an estimate (what it measured
plus what it appended since) and measures again only as often as the cap needs:

- ``max_queue_bytes``: every 30 s below half the cap; above, every 256 KB this process
  appended or 5 s, and at most once a second near it. Processes appending at once may pass
  the cap by about what they append between two measures.
- ``max_queue_size``: the rows are counted every ``COUNT_EVERY`` appends of this process,
  and on every append once its estimate is within ``COUNT_ZONE`` of the cap. Those counted
  appends take a transaction-level advisory lock of the queue, count, apply the overflow
  policy and insert in one transaction, so two of them never both take the last place.
  Only a process whose estimate is still below the zone appends uncounted: a fleet passes
  the cap by at most ``COUNT_EVERY`` messages per appending process (and by outbox messages
  staged in transactions still open when the count ran).

Drops are counted in the ``counters`` table (``stats().dropped``); ``drop_oldest`` drops are
also told by a rate-limited WARNING (``DropWarnings``, as the other backends do).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeVar

from durable_analytics._store.drops import DropWarnings

from . import _sql as q
from ._conn import Connection
from ._schema import ROW_OVERHEAD, Sql

__all__ = ["COUNT_EVERY", "COUNT_ZONE", "Caps"]

log = logging.getLogger("durable_analytics.queue")

T = TypeVar("T")


class Runner(Protocol):
    """Runs a function in one transaction of the queue (``PostgresQueue._tx``)."""

    def __call__(self, run: Callable[[Connection], T]) -> T: ...


# Bytes a process may append on its own estimate before measuring the queue again, and
# how close to the cap every append measures (at most once a second: a measure is a scan).
_REFRESH_BYTES = 256 * 1024
_REFRESH_SECONDS = 5.0
_EXACT_ZONE = 2 * 1024 * 1024
_EXACT_EVERY = 1.0
# Below half the cap, the size is measured only this often.
_FAR_REFRESH_SECONDS = 30.0
# A message is dropped only on a measure at most this old (a drop storm measures this often).
_BEFORE_DROP = 0.1
#: max_queue_size: uncounted appends a process makes between two counts (the overshoot
#: bound per appending process), and how close to the cap every append counts.
COUNT_EVERY = 64
COUNT_ZONE = 64


class Caps:
    """This process's view of the queue's size, and the overflow policy applied to it."""

    def __init__(
        self,
        run: Runner,
        sql: Sql,
        identity: str,
        *,
        max_queue_bytes: int,
        max_queue_size: int | None,
        overflow: Literal["drop_newest", "drop_oldest"],
        max_dead_letter_bytes: int,
    ) -> None:
        self._tx = run
        self._sql = sql
        self.identity = identity
        self.max_queue_bytes = max_queue_bytes
        self.max_queue_size = max_queue_size
        self.overflow = overflow
        self.max_dead_letter_bytes = max_dead_letter_bytes
        self.drops = DropWarnings(identity, max_queue_bytes, max_queue_size)
        self.est_used = 0
        self._since_refresh = _REFRESH_BYTES  # measure on the first append
        self.measured_at = -1e9
        self.est_count = 0
        self._since_count = COUNT_EVERY  # count on the first append
        self.dead_since_check = 1
        self._dead_trimmed_at = -1e9
        self._dropped_now = 0  # oldest messages the counted transaction dropped (told later)
        # One lock per queue (schema) for the counted appends of every process.
        self._count_lock = f"durable-analytics-count:{sql.schema}"

    # ---------------------------------------------------------------- max_queue_size

    def count_due(self) -> bool:
        """Whether the next append must count the rows under the lock (``max_queue_size``)."""
        cap = self.max_queue_size
        return cap is not None and (
            self._since_count >= COUNT_EVERY or self.est_count + COUNT_ZONE >= cap
        )

    def counted(self, conn: Connection) -> bool:
        """In the caller's transaction: lock, count, and make room for one more message.

        True when one more message fits under ``max_queue_size`` (after ``drop_oldest``
        dropped what it had to); False when it is refused (counted as dropped_newest). The
        advisory lock is held until the transaction ends, so the caller's INSERT in the same
        transaction is counted by the next holder.
        """
        cap = self.max_queue_size
        if cap is None:
            return True
        conn.execute(b"SELECT pg_advisory_xact_lock(hashtext(%s))", (self._count_lock,))
        row = conn.execute(self._sql(q.COUNT_MESSAGES)).fetchone()
        count = int(row[0]) if row else 0
        self._since_count = 0
        self.est_count = count
        if count < cap:
            return True
        if self.overflow == "drop_oldest":
            extra = count + 1 - cap
            params = {"n": extra, "overhead": ROW_OVERHEAD}
            got = conn.execute(self._sql(q.DROP_OLDEST_ROWS), params).fetchone()
            dropped, freed = (int(got[0]), int(got[1])) if got else (0, 0)
            self.est_count = count - dropped
            self.est_used = max(0, self.est_used - freed)
            self._dropped_now += dropped
            if dropped >= extra:
                return True
        conn.execute(self._sql(q.COUNT_DROP), {"n": 1, "name": "dropped_newest"})
        return False

    def count_room(self) -> bool:
        """``counted`` in a transaction of its own (the outbox: the caller's own inserts)."""
        self._dropped_now = 0
        try:
            fits = self._tx(self.counted)
        except BaseException:
            self.told(committed=False)
            raise
        self.told()
        return fits

    def told(self, *, committed: bool = True) -> None:
        """Warn about the oldest messages the last counted transaction dropped, if it
        committed (a rolled back one dropped nothing)."""
        dropped, self._dropped_now = self._dropped_now, 0
        if committed:
            self.drops.dropped_oldest(dropped)

    def appended(self, size: int) -> None:
        """This process stored one more message of ``size`` bytes."""
        self.est_used += size + ROW_OVERHEAD
        self._since_refresh += size + ROW_OVERHEAD
        self.est_count += 1
        self._since_count += 1

    def removed(self, freed: int, count: int) -> None:
        """This process removed ``count`` messages worth ``freed`` bytes (acked)."""
        self.est_used = max(0, self.est_used - freed)
        self.est_count = max(0, self.est_count - count)

    # ---------------------------------------------------------------- max_queue_bytes

    def room_for(self, size: int) -> bool:
        """Whether ``max_queue_bytes`` lets ``size`` more bytes in (``drop_oldest``: made so).

        The queue's size is measured (a scan) every ``_FAR_REFRESH_SECONDS`` below half the
        cap; above, every ``_REFRESH_BYTES`` appended by this process or
        ``_REFRESH_SECONDS``, and at most every ``_EXACT_EVERY`` near the cap; in between
        each process adds what it appended. Many processes appending at once can therefore
        pass the cap by about what they append between two measures.
        """
        now = time.monotonic()
        near = self.est_used + size + _EXACT_ZONE > self.max_queue_bytes
        if self.est_used * 2 < self.max_queue_bytes:
            # Far from the cap: a measure is a scan of the whole table, and a fleet of
            # processes measuring a large backlog often would load the server for nothing.
            due = now - self.measured_at > _FAR_REFRESH_SECONDS
        else:
            due = self._since_refresh >= _REFRESH_BYTES or now - self.measured_at > _REFRESH_SECONDS
        if (due or near) and now - self.measured_at >= (_EXACT_EVERY if near else 0.0):
            self.remeasure()
        over = self.est_used + size - self.max_queue_bytes
        if over > 0 and now - self.measured_at > _BEFORE_DROP:
            self.remeasure()  # never drop on a stale estimate: others may have acked
            over = self.est_used + size - self.max_queue_bytes
        if over <= 0:
            return True
        if self.trim_dead_letters(throttle=True):
            over = self.est_used + size - self.max_queue_bytes
        if over > 0 and self.overflow == "drop_oldest":
            freed = self._drop_oldest(over)
            self.est_used -= freed
            over -= freed
        if over <= 0:
            return True
        drop = {"n": 1, "name": "dropped_newest"}
        self._tx(lambda c: c.execute(self._sql(q.COUNT_DROP), drop))
        return False

    def remeasure(self) -> None:
        """Measure the queue's size now (a scan of the messages and dead letters)."""
        params = {"overhead": ROW_OVERHEAD}
        row = self._tx(lambda c: c.execute(self._sql(q.USED), params).fetchone())
        self.est_used = int(row[0]) if row else 0
        self._since_refresh = 0
        self.measured_at = time.monotonic()

    def _drop_oldest(self, need: int) -> int:
        """Delete the oldest unleased messages worth ``need`` bytes; returns the bytes freed."""
        freed = dropped = 0
        for _ in range(64):
            row = self._tx(self._drop_some(need - freed))
            got, count = (int(row[0]), int(row[1])) if row else (0, 0)
            freed += got
            dropped += count
            if not got or freed >= need:
                break
        self.est_count = max(0, self.est_count - dropped)
        self.drops.dropped_oldest(dropped)
        return freed

    def _drop_some(self, need: int) -> Callable[[Connection], Any]:
        params = {"overhead": ROW_OVERHEAD, "need": need}
        return lambda c: c.execute(self._sql(q.DROP_OLDEST), params).fetchone()

    # ---------------------------------------------------------------- dead letters

    def bound_dead_letters(self) -> None:
        """Keep dead letters within ``max_dead_letter_bytes`` while the queue nears its cap."""
        if self.dead_since_check < max(1, self.max_dead_letter_bytes // 8):
            return
        if time.monotonic() - self.measured_at > _EXACT_EVERY:
            self.remeasure()
        if self.est_used + self.max_dead_letter_bytes < self.max_queue_bytes:
            return
        self.trim_dead_letters()

    def trim_dead_letters(self, *, throttle: bool = False) -> int:
        """Purge the oldest dead letters beyond ``max_dead_letter_bytes``; returns how many."""
        now = time.monotonic()
        if throttle and not self.dead_since_check and now - self._dead_trimmed_at < 1.0:
            return 0
        self._dead_trimmed_at = now
        self.dead_since_check = 0
        limit = self.max_dead_letter_bytes
        params = {"overhead": ROW_OVERHEAD, "limit": limit, "keep": int(limit * 0.9)}
        row = self._tx(lambda c: c.execute(self._sql(q.TRIM_DEAD), params).fetchone())
        purged = int(row[0]) if row else 0
        if purged:
            self.remeasure()
            log.warning(
                "the dead letters of %s passed max_dead_letter_bytes (%d bytes) with the queue "
                "near its cap: purged the %d oldest",
                self.identity,
                limit,
                purged,
            )
        return purged
