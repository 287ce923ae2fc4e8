"""The in-memory reference backend: the ``QueueBackend`` contract with nothing on disk.

It proves the storage seam (the contract suite runs against it and SQLite alike) and serves
where durability is not wanted: tests, and ``queue_path=":memory:"``. Messages live as long
as the object, in this process only: nothing survives the process, and no other process can
see them, so the flusher must be a thread (``flusher="thread"`` or ``"none"``).

Everything happens under one lock, so each call is one atomic step, as a transaction is in
SQLite. A lease expires ``lease_timeout`` after it was taken (or extended) on the monotonic
clock (``clock``, injectable for tests); its holder is never "gone" before that, since every
holder is a thread of this process.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal

from durable_analytics._store.base import (
    CLOCK_JUMP_MARGIN,
    MAX_BACKOFF_SECONDS,
    DeadLetter,
    DeadLetterMark,
    Destination,
    Lease,
    QueueSizes,
    QueueStats,
)
from durable_analytics._store.drops import DropWarnings
from durable_analytics._store.window import PROCESS_WINDOW, InFlightWindow
from durable_analytics.exceptions import QueueError

from . import views
from .dead_letters import DeadLetterShelf
from .records import ROW_OVERHEAD, Dest, LeaseRecord, Message

__all__ = ["MEMORY_PATH", "MemoryQueue"]

#: The ``queue_path`` that selects this backend.
MEMORY_PATH = ":memory:"


class MemoryQueue(QueueSizes):
    """A ``QueueBackend`` held in this process's memory (see the module docstring).

    ``clock`` is the monotonic clock leases expire by (default ``time.monotonic``, looked
    up at each call so ``freezegun`` moves it too); wall-clock times (backoff, ``now``)
    come from ``time.time``.
    """

    #: Each process keeps its own in-flight window (``_pipeline.Window``).
    window: InFlightWindow = PROCESS_WINDOW

    def __init__(
        self,
        *,
        max_queue_bytes: int = 1 << 30,
        overflow: Literal["drop_newest", "drop_oldest"] = "drop_newest",
        lease_timeout: float = 60.0,
        max_dead_letter_bytes: int | None = None,
        clock: Callable[[], float] | None = None,
        max_queue_size: int | None = None,
    ) -> None:
        self.path = Path(MEMORY_PATH)
        self.max_queue_bytes = max_queue_bytes
        self.max_queue_size = max_queue_size
        self.overflow = overflow
        self.lease_timeout = lease_timeout
        self.max_dead_letter_bytes = (
            max_queue_bytes // 10 if max_dead_letter_bytes is None else max_dead_letter_bytes
        )
        self._clock = clock
        self._lock = threading.RLock()
        self._closed = False
        self._dests: dict[int, Dest] = {}
        self._dest_ids: dict[tuple[str, str], int] = {}
        self._messages: dict[int, Message] = {}  # ids only grow: insertion order is id order
        self._leases: dict[str, LeaseRecord] = {}
        self._dead = DeadLetterShelf()
        self._next_id = 1
        self._used = 0  # messages and dead letters, each with ROW_OVERHEAD
        self._dropped_newest = 0
        self._dropped_oldest = 0
        self._drops = DropWarnings(":memory:", max_queue_bytes)

    def __repr__(self) -> str:
        return f"MemoryQueue(max_queue_bytes={self.max_queue_bytes}, overflow={self.overflow!r})"

    # ---------------------------------------------------------------- plumbing

    def _mono(self) -> float:
        return (self._clock or time.monotonic)()

    def _check_open(self) -> None:
        if self._closed:
            raise QueueError("the in-memory queue is closed")

    def _leased(self) -> set[int]:
        """Every message id named by a lease record, live or not yet reclaimed."""
        return {i for rec in self._leases.values() for i in rec.ids}

    def _reclaim(self) -> int:
        now = self._mono()
        dead = [t for t, rec in self._leases.items() if now > rec.mono_expires]
        for token in dead:
            del self._leases[token]
        return len(dead)

    def _held(self, lease: Lease, ids: Iterable[int] | None) -> tuple[list[int], list[int]]:
        """The ids ``lease`` still holds and those of them chosen; ([], []) once it ended.

        This is the fence: every settling call works only on these, so a stale holder
        touches nothing it no longer holds.
        """
        rec = self._leases.get(lease.token)
        if rec is None:
            return [], []
        if ids is None:
            return rec.ids, list(rec.ids)
        wanted = set(ids)
        return rec.ids, [i for i in rec.ids if i in wanted]

    def _settle(self, lease: Lease, held: list[int], done: Iterable[int]) -> None:
        gone = set(done)
        left = [i for i in held if i not in gone]
        if left:
            self._leases[lease.token].ids = left
        else:
            self._leases.pop(lease.token, None)

    def _remove(self, row_id: int) -> Message:
        msg = self._messages.pop(row_id)
        self._used -= len(msg.body) + ROW_OVERHEAD
        return msg

    # ---------------------------------------------------------------- destinations, append

    def destination(self, host: str, write_key: str) -> int:
        """The id of the (host, write key) destination, created on first use."""
        with self._lock:
            self._check_open()
            key = (host, write_key)
            found = self._dest_ids.get(key)
            if found is None:
                found = len(self._dests) + 1
                self._dests[found] = Dest(host, write_key)
                self._dest_ids[key] = found
            return found

    def append(self, dest_id: int, body: bytes, enqueued_at: float | None = None) -> int:
        """Store one serialized message; its id, or 0 when the size cap dropped it."""
        cost = len(body) + ROW_OVERHEAD
        with self._lock:
            self._check_open()
            cap = self.max_queue_size
            if cap is not None and len(self._messages) >= cap:
                # The count cap (segment's max_queue_size): the same overflow policy.
                extra = len(self._messages) + 1 - cap
                if self.overflow == "drop_newest" or self._drop_oldest_count(extra) < extra:
                    self._dropped_newest += 1
                    return 0
            over = self._used + cost - self.max_queue_bytes
            if over > 0 and self._dead.bytes > self.max_dead_letter_bytes:
                self._used -= self._dead.trim(self.max_dead_letter_bytes)
                over = self._used + cost - self.max_queue_bytes
            # drop_oldest frees the oldest unleased messages; when even that is not enough
            # the new message is refused too: the queue never grows past the cap.
            if over > 0 and (self.overflow == "drop_newest" or self._drop_oldest(over) < over):
                self._dropped_newest += 1
                return 0
            row_id = self._next_id
            self._next_id += 1
            when = time.time() if enqueued_at is None else enqueued_at
            self._messages[row_id] = Message(dest_id, bytes(body), when)
            self._used += cost
            return row_id

    def _drop_oldest_count(self, count: int) -> int:
        """Drop the ``count`` oldest unleased messages (fewer if the rest is leased)."""
        leased = self._leased()
        victims = [i for i in self._messages if i not in leased][:count]
        for row_id in victims:
            self._remove(row_id)
            self._dropped_oldest += 1
        self._drops.dropped_oldest(len(victims), max_queue_size=self.max_queue_size)
        return len(victims)

    def _drop_oldest(self, need: int) -> int:
        leased = self._leased()
        freed = dropped = 0
        for row_id in [i for i in self._messages if i not in leased]:
            if freed >= need:
                break
            freed += len(self._remove(row_id).body) + ROW_OVERHEAD
            self._dropped_oldest += 1
            dropped += 1
        self._drops.dropped_oldest(dropped)
        return freed

    # ---------------------------------------------------------------- leases

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
        """Take the oldest ready messages of one destination, or None when none are ready.

        At most ``max_messages`` and ``max_bytes`` (each message costing its size plus
        ``per_message_overhead``); the first message is always taken.
        """
        now_wall = time.time() if now is None else now
        top = up_to_id if up_to_id is not None else 1 << 62
        with self._lock:
            self._check_open()
            self._reclaim()
            chosen, ids, bodies, attempts = views.select_batch(
                self._messages,
                self._dests,
                self._leased(),
                max_messages,
                max_bytes,
                destination=destination,
                top=top,
                now=now_wall,
                per_message_overhead=per_message_overhead,
            )
            if chosen is None:
                return None
            token = uuid.uuid4().hex
            expires = self._mono() + self.lease_timeout
            self._leases[token] = LeaseRecord(chosen, list(ids), expires)
            dest = self._dests[chosen]
            return Lease(
                token,
                Destination(chosen, dest.host, dest.write_key),
                tuple(ids),
                tuple(bodies),
                attempts,
                expires,
                dest.failures,
            )

    def extend(self, lease: Lease, *, whole: bool = False) -> bool:
        """Push the lease's expiry ``lease_timeout`` from now; False if it was lost already
        (a lease is one record: held whole or not at all, so ``whole`` changes nothing)."""
        with self._lock:
            self._check_open()
            rec = self._leases.get(lease.token)
            if rec is None:
                return False
            rec.mono_expires = self._mono() + self.lease_timeout
            return True

    def ack(self, lease: Lease, ids: Iterable[int] | None = None) -> int:
        """Delete delivered messages and clear the destination's backoff; returns how many."""
        with self._lock:
            self._check_open()
            held, chosen = self._held(lease, ids)
            deleted = 0
            for row_id in chosen:
                if row_id in self._messages:
                    self._remove(row_id)
                    deleted += 1
            if held:
                self._settle(lease, held, chosen)
            self._clear_backoff(lease.destination.id)
            return deleted

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
        """``ack(lease)`` then ``lease(...)``, as one step under the queue's lock."""
        with self._lock:
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
        """Return leased messages to the queue, not to be leased again before ``not_before``."""
        with self._lock:
            self._check_open()
            return self._release(lease, not_before, ids, 1 if count_attempt else 0)

    def _release(
        self, lease: Lease, not_before: float | None, ids: Iterable[int] | None, bump: int
    ) -> int:
        held, chosen = self._held(lease, ids)
        released = 0
        for row_id in chosen:
            msg = self._messages.get(row_id)
            if msg is None:
                continue
            released += 1
            if not_before is not None or bump:
                msg.not_before = not_before
                msg.attempts += bump
        if held:
            self._settle(lease, held, chosen)
        return released

    def retry_later(self, lease: Lease, delay: Callable[[int], float], error: str) -> float:
        """Back the destination off by ``delay(failures + 1)`` and release the batch, at once."""
        with self._lock:
            self._check_open()
            dest = self._dests.get(lease.destination.id)
            now = time.time()
            until = now + delay((dest.failures if dest else 0) + 1)
            self._store_backoff(lease.destination.id, until, error, now)
            self._release(lease, until, None, 1)
            return until

    def reclaim_expired(self) -> int:
        """Free the messages of expired leases now; returns how many leases ended."""
        with self._lock:
            self._check_open()
            return self._reclaim()

    def live_leases(self) -> int:
        """How many lease records exist (expired ones count until reclaimed)."""
        with self._lock:
            self._check_open()
            return len(self._leases)

    # ---------------------------------------------------------------- backoff

    def _store_backoff(self, dest_id: int, until: float, error: str | None, now: float) -> None:
        dest = self._dests.get(dest_id)
        if dest is None:
            return
        horizon = now + MAX_BACKOFF_SECONDS + CLOCK_JUMP_MARGIN
        # A stored time beyond the horizon is a clock-jump leftover: it must not outvote.
        dest.not_before = until if dest.not_before > horizon else max(dest.not_before, until)
        dest.failures += 1
        if error is not None:
            dest.last_error = error
            dest.last_error_at = now

    def _clear_backoff(self, dest_id: int) -> None:
        dest = self._dests.get(dest_id)
        if dest is not None:
            dest.not_before = 0.0
            dest.failures = 0

    def set_backoff(self, dest_id: int, until: float, error: str | None = None) -> None:
        """Hold every holder back from leasing ``dest_id`` until ``until``."""
        with self._lock:
            self._check_open()
            self._store_backoff(dest_id, until, error, time.time())

    def clear_backoff(self, dest_id: int | None, *, messages: bool = False) -> None:
        """Forget the destination's failures and backoff (a successful delivery does this).

        ``dest_id=None`` does it for every destination. ``messages=True`` also clears the
        retry time of each of their queued messages, so all of it is ready at once
        (``drain --ignore-backoff``).
        """
        with self._lock:
            self._check_open()
            for one in list(self._dests) if dest_id is None else [dest_id]:
                self._clear_backoff(one)
            if messages:
                for msg in self._messages.values():
                    if dest_id in (None, msg.dest):
                        msg.not_before = None

    def backoff(self, dest_id: int) -> tuple[float, int]:
        """``(not_before, consecutive failures)`` of a destination."""
        with self._lock:
            self._check_open()
            dest = self._dests.get(dest_id)
            return (0.0, 0) if dest is None else (dest.not_before, dest.failures)

    def next_ready_at(
        self, *, up_to_id: int | None = None, destination: int | None = None
    ) -> float | None:
        """The earliest time at which some pending message (of ``destination``) may be leased."""
        top = up_to_id if up_to_id is not None else 1 << 62
        with self._lock:
            self._check_open()
            return views.next_ready(
                self._messages, self._dests, self._leased(), top, time.time(), destination
            )

    def ready_summary(self, limit: int, now: float | None = None) -> tuple[int, float | None]:
        """How many of the oldest ``limit`` messages are ready to lease, and the oldest's time."""
        now_wall = time.time() if now is None else now
        with self._lock:
            self._check_open()
            times = views.ready_times(self._messages, self._dests, self._leased(), limit, now_wall)
            return len(times), (min(times) if times else None)

    # ---------------------------------------------------------------- inspection

    def pending(self, *, up_to_id: int | None = None, destination: int | None = None) -> int:
        """How many messages are not yet delivered (leased or not)."""
        top = up_to_id if up_to_id is not None else 1 << 62
        with self._lock:
            self._check_open()
            return sum(
                1 for i, m in self._messages.items() if i <= top and destination in (None, m.dest)
            )

    def unleased(
        self, destination: int, *, up_to_id: int, after_id: int = 0, limit: int = 100
    ) -> list[tuple[int, bytes]]:
        """Up to ``limit`` unleased messages of ``destination`` in ``(after_id, up_to_id]``."""
        with self._lock:
            self._check_open()
            leased = self._leased()
            found: list[tuple[int, bytes]] = []
            for i, m in self._messages.items():
                if len(found) >= limit or i > up_to_id:
                    break
                if i > after_id and m.dest == destination and i not in leased:
                    found.append((i, m.body))
            return found

    def holds_others(self, destinations: Collection[int]) -> bool:
        """Whether a message of a destination not in ``destinations`` is pending."""
        ours = frozenset(destinations)
        with self._lock:
            self._check_open()
            return any(m.dest not in ours for m in self._messages.values())

    def max_id(self) -> int:
        """The id of the newest message (0 when empty)."""
        with self._lock:
            self._check_open()
            return next(reversed(self._messages), 0)

    def held_back(self, destination: int | None = None) -> dict[str, int]:
        """Nothing: every call goes straight into the queue."""
        return {}

    def held_back_left(self, marks: dict[str, int], destination: int | None = None) -> int:
        """0: nothing is ever held back."""
        return 0

    def bodies(self) -> list[bytes]:
        """Every pending message body, oldest first (for tests and tools)."""
        with self._lock:
            self._check_open()
            return [m.body for m in self._messages.values()]

    def stats(self) -> QueueStats:
        """Counts and health of the queue (see ``QueueStats``)."""
        with self._lock:
            self._check_open()
            return views.stats(
                self._messages,
                self._dests,
                self._leases,
                dead_letters=len(self._dead.rows),
                dropped=self._dropped_newest + self._dropped_oldest,
                mono=self._mono(),
                now=time.time(),
            )

    # ---------------------------------------------------------------- dead letters

    def dead_letter(
        self,
        lease: Lease,
        ids: Iterable[int],
        *,
        status: int | None,
        reason: str,
        excerpt: str = "",
    ) -> int:
        """Move leased messages to the dead letters with the status and a response excerpt."""
        wanted = list(ids)
        if not wanted:
            return 0
        now = time.time()
        with self._lock:
            self._check_open()
            held, chosen = self._held(lease, wanted)
            moved = 0
            for row_id in chosen:
                if row_id in self._messages:
                    msg = self._remove(row_id)
                    self._used += self._dead.add(msg, now, status, reason, excerpt)
                    moved += 1
            if held:
                self._settle(lease, held, chosen)
            # Dead letters count in the cap; near it, they keep to their share.
            if moved and self._used + self.max_dead_letter_bytes >= self.max_queue_bytes:
                self._used -= self._dead.trim(self.max_dead_letter_bytes)
            return moved

    def dead_letters(self, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        """The dead letters (all, or those with ``ids``), oldest first."""
        with self._lock:
            self._check_open()
            return self._dead.select(ids, self._dests)

    def dead_letter_mark(self) -> DeadLetterMark:
        """Where the dead letters stand now (the newest's id, this clock)."""
        with self._lock:
            self._check_open()
            return DeadLetterMark(max(self._dead.rows, default=0), time.time())

    def dead_lettered_since(self, mark: DeadLetterMark, destination: int | None = None) -> int:
        """How many dead letters (of ``destination``) are newer than ``mark`` and of messages
        queued by then."""
        with self._lock:
            self._check_open()
            return sum(
                1
                for dead_id, dead in self._dead.rows.items()
                if dead_id > mark.id
                and dead.enqueued_at <= mark.at
                and destination in (None, dead.dest)
            )

    def requeue_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Put dead letters (all, or ``ids``) back in the queue as new messages; how many."""
        with self._lock:
            self._check_open()
            chosen = self._dead.chosen(ids)
            for dead_id in chosen:
                dead = self._dead.pop(dead_id)
                self._messages[self._next_id] = Message(dead.dest, dead.body, dead.enqueued_at)
                self._next_id += 1
            return len(chosen)

    def purge_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Delete dead letters (all, or ``ids``) for good; returns how many."""
        with self._lock:
            self._check_open()
            chosen = self._dead.chosen(ids)
            for dead_id in chosen:
                self._used -= len(self._dead.pop(dead_id).body) + ROW_OVERHEAD
            return len(chosen)

    def dead_letters_purged(self) -> int:
        """How many dead letters were purged to keep them within ``max_dead_letter_bytes``."""
        with self._lock:
            return self._dead.purged

    def bounded(self, seconds: float | None) -> contextlib.AbstractContextManager[None]:
        """Nothing to bound: this process's own lock is only ever held for a moment."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Drop everything; later calls raise ``QueueError``."""
        with self._lock:
            self._closed = True
            self._messages.clear()
            self._leases.clear()
            self._dead.rows.clear()
