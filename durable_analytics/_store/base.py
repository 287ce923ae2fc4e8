"""The storage seam: the records every queue backend shares and the ``QueueBackend`` Protocol.

Factored out of the SQLite queue so that delivery, the client and the CLI depend on an
interface, not on one storage, and so that backends import their records from one place
without import loops. The seam's place in the whole: docs/ARCHITECTURE.md, "The storage seam".

The contract a backend keeps (``tests/store/test_contract.py`` checks every point of it
against every backend):

- **At-least-once.** ``append`` returns only once the message is stored as durably as the
  backend promises. A message leaves the queue only through ``ack`` (delivered),
  ``dead_letter`` (rejected) or the size cap (counted as dropped); a lease that is never
  settled expires and its messages are leased again.
- **Fenced by token.** ``lease`` hands out a batch under a fresh token. ``ack``,
  ``release``, ``retry_later``, ``extend`` and ``dead_letter`` act only on the ids the lease
  named and still holds; once it expired or was taken over they change no message
  (``retry_later`` still records the destination's backoff: the failure was real).
- **Oldest first, never empty.** A lease takes the oldest ready messages of one destination,
  up to a message count and a byte budget (each message costs its size plus
  ``per_message_overhead``); the first message is always taken, however large, so a batch
  is never empty and an oversized message cannot block the queue.
- **Backoff is shared.** A destination's backoff (``retry_later`` / ``set_backoff``) holds
  every holder back until its time; a successful ``ack`` clears it in the same step. A
  backoff further away than ``MAX_BACKOFF_SECONDS`` plus a margin can only come from a wall
  clock that jumped back, and is ignored.
- **Ack then lease.** ``ack_and_lease`` is ``ack`` of everything the lease holds followed by
  ``lease``, with the same answers: a backend may make it one step (SQLite: one transaction,
  so a delivery loop commits once per batch), never a different outcome.
- **Windowed where stored.** A backend whose ``window`` keeps a window per destination
  (PostgreSQL) never has more live leases of a destination than that window, even with
  many holders leasing at once; a lease settled, expired or taken over frees its slot.
- **Bounded.** ``max_queue_bytes`` caps what the backend holds, and ``max_queue_size``
  (when set) the number of messages not yet acknowledged, leased ones included; past a cap
  ``drop_newest`` refuses the new message (``append`` returns 0) and ``drop_oldest`` drops
  the oldest unleased ones, both counted in ``QueueStats.dropped``. Dead letters take at most
  ``max_dead_letter_bytes`` once the queue is near its cap; the oldest beyond are purged.

A new backend implements every method of ``QueueBackend`` with those rules, adds one branch
to ``open_queue`` (``durable_analytics/_store/__init__.py``) and one parameter to the
``backend`` fixture of ``tests/store/conftest.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .window import InFlightWindow

__all__ = [
    "CLOCK_JUMP_MARGIN",
    "MAX_BACKOFF_SECONDS",
    "DeadLetter",
    "DeadLetterMark",
    "Destination",
    "DestinationStats",
    "Lease",
    "QueueBackend",
    "QueueSizes",
    "QueueStats",
    "iso_utc",
]

#: The longest backoff the flusher ever sets; a ``not_before`` further away than this
#: (plus a margin) can only come from a wall clock that jumped back, and is ignored.
MAX_BACKOFF_SECONDS = 600.0
#: The margin added to ``MAX_BACKOFF_SECONDS`` before a time counts as a clock jump.
CLOCK_JUMP_MARGIN = 60.0


@dataclass(frozen=True)
class DeadLetterMark:
    """Where the dead letters stood when a flush began (``QueueBackend.dead_letter_mark``).

    ``id``: the newest dead letter's id then (0: none). ``at``: the queue's clock then (for
    PostgreSQL the server's, as its ``enqueued_at`` is), so that only messages queued by
    then count (``dead_lettered_since``), not those queued during the flush.
    """

    id: int
    at: float


@dataclass(frozen=True)
class Destination:
    """Where a message goes: a host and a write key (never shown in full)."""

    id: int
    host: str
    write_key: str = field(repr=False)

    @property
    def redacted_key(self) -> str:
        """The write key's first 4 characters."""
        return (self.write_key[:4] + "…") if len(self.write_key) > 4 else "…"


@dataclass(frozen=True)
class Lease:
    """A batch taken from the queue by one holder until acked, released or expired."""

    token: str
    destination: Destination
    ids: tuple[int, ...]
    bodies: tuple[bytes, ...] = field(repr=False)
    attempts: int
    expires_monotonic: float
    #: Consecutive failed deliveries of the destination when the lease was taken.
    failures: int = 0
    #: How many times the destination's stored window was halved when the lease was taken
    #: (``InFlightWindow.congested`` halves once per round trip by it).
    window_epoch: int = 0

    @property
    def size(self) -> int:
        """The serialized size of the batch's messages, without the envelope."""
        return sum(len(b) for b in self.bodies)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class DestinationStats:
    """Pending messages and health of one destination."""

    host: str
    write_key: str
    pending: int
    leased: int
    backoff_until: str | None
    failures: int
    last_error: str | None
    #: The destination's in-flight window stored in the queue for every process
    #: (PostgreSQL), or None where each process keeps its own.
    window: int | None = None
    #: Its slots in use: the destination's live leases (None with ``window``).
    live_leases: int | None = None


@dataclass(frozen=True)
class QueueStats:
    """What is in the queue; ``durable-analytics status --json`` prints the same names.

    ``pending`` counts every message not yet delivered, leased or not (those waiting in
    producers' spools too, in the total and in each destination's); ``leased`` those
    under a live lease. ``bytes`` is the size of the pending messages as stored (spooled
    ones included). ``last_error`` is ``{"message", "at", "host"}`` of the most recent
    failure of a destination that still fails, or None once every destination delivers
    again (each destination's own ``last_error`` keeps its last error after that, as
    history). ``wal_bytes`` is the SQLite ``-wal`` file's size.
    """

    pending: int
    leased: int
    dead_letters: int
    bytes: int
    oldest_age_seconds: float | None
    dropped: int
    last_error: dict[str, str] | None
    destinations: list[DestinationStats]
    #: The size of the SQLite queue's ``-wal`` file (0 for other backends): normally a few
    #: MB at most; more means a reader holds an old snapshot open and no checkpoint can
    #: give the space back (it then counts against ``max_queue_bytes``).
    wal_bytes: int = 0
    #: Messages stored in the spools of SQLite queue's producers and not yet moved into the
    #: file (counted in ``pending`` too; see ``docs/ARCHITECTURE.md``, "Spools").
    spooled: int = 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the same names as the fields."""
        return asdict(self)


@dataclass(frozen=True)
class DeadLetter:
    """A message the server rejected, kept for inspection, requeue or purge."""

    id: int
    host: str
    write_key: str
    type: str
    event: str | None
    message_id: str | None
    status: int | None
    reason: str
    excerpt: str
    attempts: int
    enqueued_at: float
    dead_at: float
    body: bytes = field(repr=False)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> DeadLetter:
        """Build one from a stored row, as every backend stores it.

        ``row`` is (id, host, write_key, status, reason, excerpt, attempts, enqueued_at,
        dead_at, body). The key is redacted here; a body that is not a JSON object (it was
        rejected for a reason) still lists, with empty message fields.
        """
        row_id, host, key, status, reason, excerpt, attempts, enq, dead_at, body = row
        raw = bytes(body)
        try:
            msg = json.loads(raw)
        except ValueError:
            msg = {}
        if not isinstance(msg, dict):
            msg = {}
        return cls(
            id=int(row_id),
            host=host,
            write_key=Destination(0, host, key).redacted_key,
            type=str(msg.get("type", "")),
            event=msg.get("event") or msg.get("name"),
            message_id=msg.get("messageId"),
            status=status,
            reason=reason,
            excerpt=excerpt,
            attempts=int(attempts),
            enqueued_at=float(enq),
            dead_at=float(dead_at),
            body=raw,
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the body decoded as the message object)."""
        out = asdict(self)
        out["body"] = json.loads(self.body)
        return out


class QueueSizes:
    """``qsize()`` and ``empty()`` from a backend's ``pending()``: ``queue.Queue``'s names,
    which segment-analytics-python's ``client.queue`` answers to."""

    if TYPE_CHECKING:

        def pending(
            self, *, up_to_id: int | None = None, destination: int | None = None
        ) -> int: ...

    def qsize(self) -> int:
        """``pending()``: every message not yet delivered, leased ones included."""
        return self.pending()

    def empty(self) -> bool:
        """Whether no message waits for delivery (``qsize() == 0``)."""
        return self.pending() == 0


def iso_utc(ts: float | None) -> str | None:
    """A wall-clock time as ISO 8601 UTC to the second (how stats show times), or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


class QueueBackend(Protocol):
    """What delivery, the client and the CLI need from a queue (see the module docstring).

    Times are wall-clock seconds (``time.time()``) unless a name says monotonic. Every
    method is safe to call from any thread; failures raise ``QueueError`` subclasses.
    """

    #: Where the queue lives, for messages and for keys of per-queue state.
    path: Path
    #: Seconds a lease stays live without ``extend``.
    lease_timeout: float

    @property
    def window(self) -> InFlightWindow:
        """Where the destinations' in-flight windows live (``window.py``): each process,
        or this queue for every process sharing it (then ``lease`` refuses a full window)."""
        ...

    def destination(self, host: str, write_key: str) -> int:
        """The id of the (host, write key) destination, created on first use."""
        ...

    def append(self, dest_id: int, body: bytes, enqueued_at: float | None = None) -> int:
        """Store one serialized message; its id once stored, 0 when the size cap dropped it."""
        ...

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
        """Take the oldest ready messages of one destination, or None when none are ready."""
        ...

    def extend(self, lease: Lease, *, whole: bool = False) -> bool:
        """Push the lease's expiry ``lease_timeout`` from now; False if it was lost already.

        ``whole``: False also when only some of its messages are still under it (a backend
        that leases messages one by one lets another holder take part of an expired lease;
        what is left is extended all the same).
        """
        ...

    def ack(self, lease: Lease, ids: Iterable[int] | None = None) -> int:
        """Delete delivered messages and clear the destination's backoff; returns how many."""
        ...

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
        """``ack(lease)`` (all it holds), then ``lease(...)``; both answers.

        The delivery loop's step from one batch to the next. The effect is the two calls in
        that order; a backend may run them as one step (one transaction).
        """
        ...

    def release(
        self,
        lease: Lease,
        not_before: float | None = None,
        *,
        ids: Iterable[int] | None = None,
        count_attempt: bool = True,
    ) -> int:
        """Return leased messages to the queue, not to be leased again before ``not_before``."""
        ...

    def retry_later(self, lease: Lease, delay: Callable[[int], float], error: str) -> float:
        """Back the destination off and hand the batch back, in one step; returns the time.

        ``delay(failures)`` gets the destination's consecutive failures counting this one
        and returns seconds to wait; it runs inside the backend's transaction, so it must
        be quick and must not call the queue.
        """
        ...

    def dead_letter(
        self,
        lease: Lease,
        ids: Iterable[int],
        *,
        status: int | None,
        reason: str,
        excerpt: str = "",
    ) -> int:
        """Move leased messages to the dead letters; returns how many."""
        ...

    def set_backoff(self, dest_id: int, until: float, error: str | None = None) -> None:
        """Hold every holder back from leasing ``dest_id`` until ``until``."""
        ...

    def clear_backoff(self, dest_id: int | None, *, messages: bool = False) -> None:
        """Forget the destination's failures and backoff (a successful delivery does this).

        ``dest_id=None`` does it for every destination. ``messages=True`` also clears the
        retry time of each of their queued messages, so all of it is ready at once
        (``drain --ignore-backoff``).
        """
        ...

    def backoff(self, dest_id: int) -> tuple[float, int]:
        """``(not_before, consecutive failures)`` of a destination."""
        ...

    def next_ready_at(
        self, *, up_to_id: int | None = None, destination: int | None = None
    ) -> float | None:
        """The earliest time at which some pending message (of ``destination``) may be leased."""
        ...

    def ready_summary(self, limit: int, now: float | None = None) -> tuple[int, float | None]:
        """How many of the oldest ``limit`` messages are ready to lease, and the oldest's time."""
        ...

    def reclaim_expired(self) -> int:
        """Free the messages of dead or expired leases now; returns how many leases ended."""
        ...

    def pending(self, *, up_to_id: int | None = None, destination: int | None = None) -> int:
        """How many messages are not yet delivered (leased or not)."""
        ...

    def qsize(self) -> int:
        """``pending()``: every message not yet delivered. The name is ``queue.Queue``'s,
        which ``client.queue`` is in segment-analytics-python (there it omits the batch in
        flight; here a leased message still counts)."""
        ...

    def empty(self) -> bool:
        """Whether no message waits for delivery (``qsize() == 0``)."""
        ...

    def unleased(
        self, destination: int, *, up_to_id: int, after_id: int = 0, limit: int = 100
    ) -> list[tuple[int, bytes]]:
        """Up to ``limit`` messages of ``destination`` with ids in ``(after_id, up_to_id]``
        that no lease names, oldest first, as ``(id, body)``; changes nothing.

        What ``flush()`` reports to ``on_error`` as kept when its destination backs off after
        a failure of its own: messages it did not send and no other holder is sending. Not
        a lease: another holder may lease them right after.
        """
        ...

    def holds_others(self, destinations: Collection[int]) -> bool:
        """Whether a message of a destination not in ``destinations`` is pending.

        Leased or not, as ``pending`` counts them, but answered with a look per destination
        instead of a count of the backlog: the flusher asks it while ``flush()`` delivers
        one destination, on queues that may hold millions of messages.
        """
        ...

    def max_id(self) -> int:
        """The id of the newest message (0 when empty)."""
        ...

    def held_back(self, destination: int | None = None) -> dict[str, int]:
        """Where the calls not in the queue yet end (of ``destination``), for
        ``held_back_left``: a SQLite queue's producers' spools (calls that met a busy file,
        or that no room under ``max_queue_bytes`` keeps out). Empty where every call goes
        straight into the queue."""
        ...

    def held_back_left(self, marks: dict[str, int], destination: int | None = None) -> int:
        """How many of the calls that ``held_back`` returned ``marks`` for are still not in
        the queue (whoever moved the others in)."""
        ...

    def live_leases(self) -> int:
        """How many leases are held right now (by anyone)."""
        ...

    def stats(self) -> QueueStats:
        """Counts and health of the queue."""
        ...

    def dead_letters(self, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        """The dead letters (all, or those with ``ids``), oldest first."""
        ...

    def dead_letter_mark(self) -> DeadLetterMark:
        """Where the dead letters stand now, for ``dead_lettered_since``."""
        ...

    def dead_lettered_since(self, mark: DeadLetterMark, destination: int | None = None) -> int:
        """How many dead letters (of ``destination``) are newer than ``mark`` and of messages
        queued by then: what any process dead-lettered of them since (a flush counts those
        of its destination, whoever dead-lettered them)."""
        ...

    def requeue_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Put dead letters (all, or ``ids``) back in the queue; returns how many."""
        ...

    def purge_dead_letters(self, ids: Sequence[int] | None = None) -> int:
        """Delete dead letters (all, or ``ids``) for good; returns how many."""
        ...

    def bounded(self, seconds: float | None) -> AbstractContextManager[None]:
        """Inside the block, no wait of this queue (any thread) lasts past ``seconds`` from now.

        For the calls that have a deadline (flush, close and exit, drain): a wait for a lock
        that another holder keeps (a process stopped inside a write transaction) raises
        ``QueueBusy`` when the deadline comes instead of lasting the backend's own busy
        timeout. ``None`` sets no bound. Nothing stored is affected by a wait given up.
        """
        ...

    def close(self) -> None:
        """Release what this caller holds (connections, files); no new ones are opened after."""
        ...
