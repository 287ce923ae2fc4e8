"""The dead letters of the in-memory queue, and their share of the cap."""

from __future__ import annotations

import json
from collections.abc import Sequence

from durable_analytics._store.base import DeadLetter, Destination

from .records import ROW_OVERHEAD, Dead, Dest, Message

__all__ = ["DeadLetterShelf"]


class DeadLetterShelf:
    """Dead letters by id (oldest first), with their size as counted against the cap."""

    def __init__(self) -> None:
        self.rows: dict[int, Dead] = {}
        self.bytes = 0  # each with ROW_OVERHEAD, as the cap counts them
        self.purged = 0
        self._next_id = 1

    def add(self, msg: Message, now: float, status: int | None, reason: str, excerpt: str) -> int:
        """Shelve ``msg`` as rejected; returns the bytes it now takes."""
        self.rows[self._next_id] = Dead(
            msg.dest,
            msg.body,
            msg.enqueued_at,
            now,
            msg.attempts + 1,
            status,
            reason[:500],
            excerpt[:2000],
        )
        self._next_id += 1
        cost = len(msg.body) + ROW_OVERHEAD
        self.bytes += cost
        return cost

    def pop(self, dead_id: int) -> Dead:
        dead = self.rows.pop(dead_id)
        self.bytes -= len(dead.body) + ROW_OVERHEAD
        return dead

    def trim(self, limit: int) -> int:
        """Purge the oldest beyond ``limit`` bytes, down to 90 % of it; the bytes freed."""
        if self.bytes <= limit:
            return 0
        before = self.bytes
        target = int(limit * 0.9)
        for dead_id in list(self.rows):
            if self.bytes <= target:
                break
            self.pop(dead_id)
            self.purged += 1
        return before - self.bytes

    def chosen(self, ids: Sequence[int] | None) -> list[int]:
        """The ids of the dead letters named (all when None), oldest first."""
        return list(self.rows) if ids is None else sorted(set(ids) & set(self.rows))

    def select(self, ids: Sequence[int] | None, dests: dict[int, Dest]) -> list[DeadLetter]:
        """The dead letters (all, or ``ids``) as records, oldest first."""
        out = []
        for dead_id in self.chosen(ids):
            dead = self.rows[dead_id]
            dest = dests.get(dead.dest) or Dest("", "")
            try:
                msg = json.loads(dead.body)
            except ValueError:
                msg = {}
            if not isinstance(msg, dict):
                msg = {}
            out.append(
                DeadLetter(
                    id=dead_id,
                    host=dest.host,
                    write_key=Destination(0, dest.host, dest.write_key).redacted_key,
                    type=str(msg.get("type", "")),
                    event=msg.get("event") or msg.get("name"),
                    message_id=msg.get("messageId"),
                    status=dead.status,
                    reason=dead.reason,
                    excerpt=dead.excerpt,
                    attempts=dead.attempts,
                    enqueued_at=dead.enqueued_at,
                    dead_at=dead.dead_at,
                    body=dead.body,
                )
            )
        return out
