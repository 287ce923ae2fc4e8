"""The warning a queue gives when its size cap drops its oldest messages to make room."""

from __future__ import annotations

import logging
import math
import time

__all__ = ["DropWarnings"]

log = logging.getLogger("durable_analytics.queue")

#: At most one warning per queue per this many seconds; the next one carries the count since.
WARN_EVERY = 60.0


class DropWarnings:
    """Rate-limited WARNING for ``overflow="drop_oldest"`` drops of one queue (thread-safe
    enough: a lost count under a race only shortens one line's figure)."""

    def __init__(self, where: str, max_queue_bytes: int, max_queue_size: int | None = None) -> None:
        self._where = where
        self._cap = f"max_queue_bytes={max_queue_bytes}"
        if max_queue_size is not None:
            self._cap += f", max_queue_size={max_queue_size}"
        self._count = 0
        self._warned_at = -math.inf

    def dropped_oldest(self, count: int, *, max_queue_size: int | None = None) -> None:
        """``count`` stored messages were deleted to make room for new ones.

        ``max_queue_size``: the count cap made the room (the warning names it), not the
        bytes cap.
        """
        if count <= 0:
            return
        self._count += count
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY:
            return
        since = "" if self._warned_at == -math.inf else " since the last warning"
        self._warned_at = now
        total, self._count = self._count, 0
        cap = self._cap if max_queue_size is None else f"max_queue_size={max_queue_size}"
        log.warning(
            "the queue %s is full (%s): dropped the %d oldest undelivered "
            "message%s%s to make room (overflow='drop_oldest'). Is delivery failing?",
            self._where,
            cap,
            total,
            "" if total == 1 else "s",
            since,
        )
