"""The PostgreSQL queue's reads and dead-letter moves: counts, stats, health, dead letters.

``QueueReads`` is a base of ``PostgresQueue``: what an operator's ``status`` and
``dead-letters`` commands and the tests ask of a queue, apart from the delivery path. Each
method is one short transaction of the queue's (``PostgresQueue._tx``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from durable_analytics._store.base import DeadLetter, DeadLetterMark, QueueSizes, QueueStats
from durable_analytics.exceptions import QueueError

from . import _inspect
from . import _sql as q
from ._conn import Connection, Target
from ._schema import Sql

__all__ = ["QueueReads"]

T = TypeVar("T")


class QueueReads(QueueSizes):
    """Reads of the queue and moves of its dead letters (see the module docstring)."""

    _sql: Sql
    identity: str
    target: Target

    if TYPE_CHECKING:
        # Provided by ``PostgresQueue``: one transaction with the queue's settings.
        def _tx(
            self,
            run: Callable[[Connection], T],
            *,
            snapshot: bool = False,
            now: float | None = None,
        ) -> T: ...

    def dead_letters_purged(self) -> int:
        """How many dead letters were purged to keep them within ``max_dead_letter_bytes``."""
        return self._counter("dead_letters_purged")

    def _counter(self, name: str) -> int:
        row = self._tx(lambda c: c.execute(self._sql(q.COUNTER), (name,))).fetchone()
        return int(row[0]) if row else 0

    # ---------------------------------------------------------------- inspection

    def pending(self, *, up_to_id: int | None = None, destination: int | None = None) -> int:
        """How many messages are not yet delivered (leased or not)."""
        params = {"top": up_to_id if up_to_id is not None else (1 << 62), "dest": destination}
        row = self._tx(lambda c: c.execute(self._sql(q.PENDING), params)).fetchone()
        return int(row[0]) if row else 0

    def unleased(
        self, destination: int, *, up_to_id: int, after_id: int = 0, limit: int = 100
    ) -> list[tuple[int, bytes]]:
        """Up to ``limit`` messages of ``destination`` in ``(after_id, up_to_id]`` that no
        live lease holds, oldest first."""
        params = {"dest": destination, "after": after_id, "top": up_to_id, "limit": limit}
        rows = self._tx(lambda c: c.execute(self._sql(q.UNLEASED), params)).fetchall()
        return [(int(r[0]), bytes(r[1])) for r in rows]

    def holds_others(self, destinations: Collection[int]) -> bool:
        """Whether a message of a destination not in ``destinations`` is pending: one
        index seek per destination the messages hold (``messages (dest, id)``), not a
        count."""
        params = {"dests": sorted(destinations)}
        row = self._tx(lambda c: c.execute(self._sql(q.HOLDS_OTHERS), params)).fetchone()
        return bool(row[0]) if row else False

    def max_id(self) -> int:
        """The id of the newest message (0 when empty)."""
        row = self._tx(lambda c: c.execute(self._sql(q.MAX_ID))).fetchone()
        return int(row[0]) if row else 0

    def held_back(self, destination: int | None = None) -> dict[str, int]:
        """Nothing: every call commits straight into the table."""
        return {}

    def held_back_left(self, marks: dict[str, int], destination: int | None = None) -> int:
        """0: nothing is ever held back."""
        return 0

    def live_leases(self) -> int:
        """How many leases are held right now (by anyone, on any host)."""
        row = self._tx(lambda c: c.execute(self._sql(q.LIVE_LEASES))).fetchone()
        return int(row[0]) if row else 0

    def bodies(self) -> list[bytes]:
        """Every pending message body, oldest first (for tests and tools)."""
        rows = self._tx(lambda c: c.execute(self._sql(q.BODIES))).fetchall()
        return [bytes(r[0]) for r in rows]

    def stats(self) -> QueueStats:
        """Counts and health of the queue, from one snapshot (see ``QueueStats``)."""
        return _inspect.stats(self._tx, self._sql, self.identity)

    def table_health(self) -> dict[str, Any]:
        """Dead rows, size and vacuum times of the message table, and the oldest snapshot.

        A queue's table fills with dead rows (each message leaves one per lease and one per
        delete) that only VACUUM reclaims, and VACUUM cannot reclaim past the oldest open
        snapshot of the whole server (a long transaction, ``pg_dump``, an idle-in-transaction
        session). ``status`` shows these numbers; ``docs/POSTGRESQL.md`` says what to do.
        """
        return _inspect.table_health(self._tx, self.target.schema)

    # ---------------------------------------------------------------- dead letters

    def dead_letters(self, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        """The dead letters (all, or those with ``ids``), oldest first."""
        params = {"all": ids is None, "ids": list(ids or ())}
        rows = self._tx(lambda c: c.execute(self._sql(q.DEAD_LETTERS), params)).fetchall()
        return [DeadLetter.from_row(row) for row in rows]

    def dead_letter_mark(self) -> DeadLetterMark:
        """Where the dead letters stand now (the newest's id, the server's clock)."""
        row = self._tx(lambda c: c.execute(self._sql(q.DEAD_LETTER_MARK))).fetchone()
        if row is None:  # an aggregate always answers one row
            raise QueueError("PostgreSQL answered no row to the dead-letter mark")
        return DeadLetterMark(int(row[0]), float(row[1]))

    def dead_lettered_since(self, mark: DeadLetterMark, destination: int | None = None) -> int:
        """How many dead letters (of ``destination``) are newer than ``mark`` and of messages
        queued by then.

        An identity is taken before its transaction commits, so a dead letter whose move
        committed after the mark was read may carry an id below it and not count here.
        """
        params = {"mark": mark.id, "at": mark.at, "dest": destination}
        row = self._tx(lambda c: c.execute(self._sql(q.DEAD_LETTERED_SINCE), params)).fetchone()
        return int(row[0]) if row else 0

    def requeue_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Put dead letters (all, or ``ids``) back in the queue; returns how many."""
        return self._move_dead(ids, q.REQUEUE_DEAD)

    def purge_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Delete dead letters (all, or ``ids``) for good; returns how many."""
        return self._move_dead(ids, q.PURGE_DEAD)

    def _move_dead(self, ids: Sequence[int] | None, statement: str) -> int:
        if ids is not None and not ids:
            return 0
        params = {"all": ids is None, "ids": list(ids or ())}
        row = self._tx(lambda c: c.execute(self._sql(statement), params)).fetchone()
        return int(row[0]) if row else 0
