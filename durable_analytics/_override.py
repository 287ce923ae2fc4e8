"""A drain to another endpoint than the stored one: ``drain --host`` / ``--write-key``.

An override is a new endpoint or a new credential, not the stored destination, so

- the backoff the stored destination earned does not hold it back (``drain_queue``
  clears the stored backoffs first, as ``--ignore-backoff`` does), and
- what the override meets is its own: each lease names the override's host and key (so
  logs, errors and the in-flight window name the endpoint actually tried), and a failure
  stores no backoff, failure count or last error on the stored destination. The drain
  backs off in memory instead and ends, leaving the messages queued and ready for their
  stored destination, whose state says nothing about a host it never was.

Acks, dead letters and releases reach the queue unchanged: the messages are the stored
destination's, wherever this drain sent them.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from ._store import Lease, QueueBackend
from ._store.base import DeadLetter, DeadLetterMark, Destination, QueueStats
from ._store.window import InFlightWindow

__all__ = ["OverrideQueue"]


class OverrideQueue:
    """``queue`` as a drain with ``host`` and/or ``write_key`` overrides sees it.

    Leases name the override (a None part keeps the stored value); ``retry_later`` keeps
    the failure in this object (``backoff_until``, ``failures``) and only hands the batch
    back, counting the attempt; so does ``release`` with a ``not_before``. While that
    backoff runs nothing is leased, and ``next_ready_at`` says when it ends, so a drain
    that does not wait for backoffs ends.
    """

    def __init__(
        self, queue: QueueBackend, *, host: str | None = None, write_key: str | None = None
    ) -> None:
        self.inner = queue
        self.host = host
        self.write_key = write_key
        self.path: Path = queue.path
        self.lease_timeout: float = queue.lease_timeout
        self._lock = threading.Lock()
        #: Consecutive failures of the override endpoint in this drain.
        self.failures = 0
        #: Until when (wall clock) this drain holds back after its last failure.
        self.backoff_until = 0.0

    def __repr__(self) -> str:
        return f"OverrideQueue({self.inner!r}, host={self.host!r})"

    def _rename(self, lease: Lease) -> Lease:
        stored = lease.destination
        target = Destination(
            stored.id, self.host or stored.host, self.write_key or stored.write_key
        )
        return dataclasses.replace(lease, destination=target, failures=self.failures)

    @property
    def window(self) -> InFlightWindow:
        """The wrapped queue's window store."""
        return self.inner.window

    def lease(
        self,
        max_messages: int,
        max_bytes: int,
        *,
        destination: int | None = None,
        up_to_id: int | None = None,
        now: float | None = None,
        per_message_overhead: int = 1,
    ) -> Lease | None:
        """The wrapped queue's lease, naming the override; None while it backs off."""
        if self.backoff_until > (time.time() if now is None else now):
            return None
        lease = self.inner.lease(
            max_messages,
            max_bytes,
            destination=destination,
            up_to_id=up_to_id,
            now=now,
            per_message_overhead=per_message_overhead,
        )
        return None if lease is None else self._rename(lease)

    def retry_later(self, lease: Lease, delay: Callable[[int], float], error: str) -> float:
        """Back this drain off (in memory) and hand the batch back, counting the attempt."""
        with self._lock:
            self.failures += 1
            until = time.time() + delay(self.failures)
            self.backoff_until = max(self.backoff_until, until)
        self.inner.release(lease, None)
        return until

    def next_ready_at(
        self, *, up_to_id: int | None = None, destination: int | None = None
    ) -> float | None:
        """The wrapped queue's answer, but not before this drain's own backoff ends."""
        ready = self.inner.next_ready_at(up_to_id=up_to_id, destination=destination)
        if ready is None:
            return None
        return max(ready, self.backoff_until)

    # Everything else is the wrapped queue's.

    def destination(self, host: str, write_key: str) -> int:
        """The wrapped queue's destination id."""
        return self.inner.destination(host, write_key)

    def append(self, dest_id: int, body: bytes, enqueued_at: float | None = None) -> int:
        """Store a message in the wrapped queue."""
        return self.inner.append(dest_id, body, enqueued_at)

    def extend(self, lease: Lease, *, whole: bool = False) -> bool:
        """Extend the lease in the wrapped queue."""
        return self.inner.extend(lease, whole=whole)

    def ack(self, lease: Lease, ids: Iterable[int] | None = None) -> int:
        """Delete the delivered messages (and clear their stored destination's backoff)."""
        return self.inner.ack(lease, ids)

    def ack_and_lease(
        self,
        lease: Lease,
        max_messages: int,
        max_bytes: int,
        *,
        destination: int | None = None,
        up_to_id: int | None = None,
        now: float | None = None,
        per_message_overhead: int = 1,
    ) -> tuple[int, Lease | None]:
        """``ack`` then this drain's ``lease`` (which honours its own backoff)."""
        deleted = self.ack(lease)
        return deleted, self.lease(
            max_messages,
            max_bytes,
            destination=destination,
            up_to_id=up_to_id,
            now=now,
            per_message_overhead=per_message_overhead,
        )

    def release(
        self,
        lease: Lease,
        not_before: float | None = None,
        *,
        ids: Iterable[int] | None = None,
        count_attempt: bool = True,
    ) -> int:
        """Hand messages back to the wrapped queue, ready at once for their stored
        destination; a ``not_before`` (the override's Retry-After) holds this drain only."""
        if not_before is not None:
            with self._lock:
                self.backoff_until = max(self.backoff_until, not_before)
        return self.inner.release(lease, None, ids=ids, count_attempt=count_attempt)

    def dead_letter(
        self,
        lease: Lease,
        ids: Iterable[int],
        *,
        status: int | None,
        reason: str,
        excerpt: str = "",
    ) -> int:
        """Dead-letter messages the override's server rejected."""
        return self.inner.dead_letter(lease, ids, status=status, reason=reason, excerpt=excerpt)

    def set_backoff(self, dest_id: int, until: float, error: str | None = None) -> None:
        """The wrapped queue's stored backoff."""
        self.inner.set_backoff(dest_id, until, error)

    def clear_backoff(self, dest_id: int | None, *, messages: bool = False) -> None:
        """Clear stored backoffs in the wrapped queue."""
        self.inner.clear_backoff(dest_id, messages=messages)

    def backoff(self, dest_id: int) -> tuple[float, int]:
        """The wrapped queue's stored backoff of ``dest_id``."""
        return self.inner.backoff(dest_id)

    def ready_summary(self, limit: int, now: float | None = None) -> tuple[int, float | None]:
        """The wrapped queue's summary."""
        return self.inner.ready_summary(limit, now)

    def reclaim_expired(self) -> int:
        """Reclaim expired leases in the wrapped queue."""
        return self.inner.reclaim_expired()

    def pending(self, *, up_to_id: int | None = None, destination: int | None = None) -> int:
        """The wrapped queue's pending count."""
        return self.inner.pending(up_to_id=up_to_id, destination=destination)

    def qsize(self) -> int:
        """The wrapped queue's ``qsize()``."""
        return self.inner.qsize()

    def empty(self) -> bool:
        """The wrapped queue's ``empty()``."""
        return self.inner.empty()

    def dead_letter_mark(self) -> DeadLetterMark:
        """The wrapped queue's dead-letter mark."""
        return self.inner.dead_letter_mark()

    def dead_lettered_since(self, mark: DeadLetterMark, destination: int | None = None) -> int:
        """The wrapped queue's dead letters newer than ``mark``."""
        return self.inner.dead_lettered_since(mark, destination)

    def unleased(
        self, destination: int, *, up_to_id: int, after_id: int = 0, limit: int = 100
    ) -> list[tuple[int, bytes]]:
        """The wrapped queue's unleased messages of ``destination``."""
        return self.inner.unleased(destination, up_to_id=up_to_id, after_id=after_id, limit=limit)

    def holds_others(self, destinations: Collection[int]) -> bool:
        """Whether the wrapped queue holds messages of other destinations."""
        return self.inner.holds_others(destinations)

    def max_id(self) -> int:
        """The wrapped queue's newest id."""
        return self.inner.max_id()

    def held_back(self, destination: int | None = None) -> dict[str, int]:
        """The wrapped queue's held-back marks."""
        return self.inner.held_back(destination)

    def held_back_left(self, marks: dict[str, int], destination: int | None = None) -> int:
        """The wrapped queue's count of held-back calls left."""
        return self.inner.held_back_left(marks, destination)

    def live_leases(self) -> int:
        """The wrapped queue's live leases."""
        return self.inner.live_leases()

    def stats(self) -> QueueStats:
        """The wrapped queue's stats."""
        return self.inner.stats()

    def dead_letters(self, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        """The wrapped queue's dead letters."""
        return self.inner.dead_letters(ids)

    def requeue_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Requeue dead letters in the wrapped queue."""
        return self.inner.requeue_dead_letters(ids)

    def purge_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Purge dead letters in the wrapped queue."""
        return self.inner.purge_dead_letters(ids)

    def bounded(self, seconds: float | None) -> AbstractContextManager[None]:
        """The wrapped queue's bound on waits."""
        return self.inner.bounded(seconds)

    def close(self) -> None:
        """Close the wrapped queue."""
        self.inner.close()
