"""What delivery tells the user: the ``on_error`` calls and the errors they carry.

``Deliverer`` settles each answer in the queue; what it then reports goes through here: a
rejected message (``MessageRejected``, after its move to the dead letters), and a batch
kept for later (``RetryableError``, or ``ConfigurationRejected`` for a write key or host
the server refuses). ``report`` calls ``on_error`` with the batch's messages, never from
two delivery threads at once, and under a caller's deadline waits for it only until then.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from . import _delivery_log
from ._bounded_call import call_within
from ._config import OnError
from ._transport import Outcome
from .exceptions import ConfigurationRejected, DeliveryError, MessageRejected, RetryableError

__all__ = [
    "REPORT_GRACE",
    "ReportGate",
    "Reported",
    "kept_error",
    "message_id",
    "rejected_error",
    "report",
    "report_until",
]

log = logging.getLogger(_delivery_log.LOGGER)

#: A deadline that has (nearly) passed still gives ``on_error`` this long to return.
REPORT_GRACE = 0.1


def report_until(deadline: float | None) -> float | None:
    """Until when ``on_error`` is waited for, under a caller's ``deadline`` (None: no bound)."""
    return None if deadline is None else max(deadline, time.monotonic() + REPORT_GRACE)


class ReportGate:
    """Lets one ``on_error`` call run at a time: one gate per Client, shared by its
    deliverers (the flusher thread's and the one ``flush()``, ``close()``, exit and
    ``sync_mode`` use), so their reports never overlap.

    A report asked for from inside ``on_error``, on its thread, runs at once: waiting for
    the gate, which that very callback holds, would wait for itself. (A ``flush()`` called
    there delivers nothing, see ``Client.flush``; this keeps any other path from hanging.)
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: The thread running ``on_error`` under the gate (None: none is).
        self.owner: int | None = None
        #: Held by a ``flush()`` while it reports what it did not send: two flushes of one
        #: client at once report each message once (the second finds it in its record).
        self.unsent = threading.Lock()
        self._records: list[Reported] = []
        self._records_lock = threading.Lock()

    def running_here(self) -> bool:
        """Whether this thread is inside an ``on_error`` call of this gate."""
        return self.owner == threading.get_ident()

    def claim(self, ids: Iterable[int]) -> set[int]:
        """Record ``ids`` as reported in every ``recording`` block running now; the ones
        none of those blocks had recorded yet, which the caller is to report (all of them
        when no block runs).

        Asked before the report, and for a failed batch before it goes back to the queue:
        a flush reading its unsent rest meanwhile would otherwise find it unleased and
        report it too. Checking and recording in one step makes two deliverers of this gate
        (two flushes at once, or a flush beside the flusher thread) report each message
        once between them, however their reads, leases and failures interleave: one that
        reports a batch unsent while the other then leases it, sends it and fails, or the
        other way round.
        """
        with self._records_lock:
            wanted = set(ids)
            records = self._records
            if not records:
                return wanted
            fresh = {i for i in wanted if not any(i in record.ids for record in records)}
            for record in records:
                record.ids.update(wanted)
            return fresh

    def note(self, exc: DeliveryError, dest_id: int, ids: Sequence[int]) -> None:
        """Record, in every ``recording`` block running now, a report of ``ids`` (messages
        of the destination ``dest_id``)."""
        with self._records_lock:
            for record in self._records:
                record.add(exc, dest_id, ids)

    @contextlib.contextmanager
    def recording(self) -> Iterator[Reported]:
        """Record what any deliverer of this gate reports while the block runs, and what
        was reported in the blocks already running when it began (two flushes at once
        report a message once between them; one after the other, each reports it)."""
        record = Reported()
        try:
            with self._records_lock:
                for running in self._records:
                    record.ids.update(running.ids)
                self._records.append(record)
            yield record
        finally:
            with self._records_lock:
                # By identity: records with equal contents are different blocks.
                self._records = [r for r in self._records if r is not record]


@dataclass(eq=False)
class Reported:
    """What a gate's deliverers reported to ``on_error`` during a ``recording`` block: the
    ids of the messages, and by destination the last error that kept a batch in the queue
    (none: every failure was a rejection, or there was none). By destination: the flusher
    thread also delivers the other destinations of a shared queue file, whose failures say
    nothing of this client's."""

    ids: set[int] = field(default_factory=set)
    kept: dict[int, DeliveryError] = field(default_factory=dict)

    def add(self, exc: DeliveryError, dest_id: int, ids: Iterable[int]) -> None:
        self.ids.update(ids)
        if not isinstance(exc, MessageRejected):
            self.kept[dest_id] = exc


def report(
    on_error: OnError | None,
    gate: ReportGate,
    exc: DeliveryError,
    bodies: Sequence[bytes],
    until: float | None = None,
) -> None:
    """Call ``on_error`` with ``exc`` and the messages ``bodies`` (parsed), through ``gate``.

    With ``until`` (a flush, an exit, ``sync_mode``), wait for it only until then: a
    callback that blocks must not hold the caller past its deadline. What it raises is
    logged, never passed on.
    """
    if on_error is None:
        return
    messages = []
    for body in bodies:
        try:
            messages.append(json.loads(body))
        except ValueError:
            continue

    if gate.running_here():
        # Asked from inside the callback (its own flush() failed): the outer call waits.
        try:
            on_error(exc, messages)
        except Exception:
            log.exception("on_error raised; ignoring it")
        return

    def call() -> None:
        with gate.lock:
            gate.owner = threading.get_ident()
            try:
                on_error(exc, messages)
            finally:
                gate.owner = None

    try:
        if until is None:
            call()
        else:
            call_within(until - time.monotonic(), call, "on_error")
    except TimeoutError:
        log.warning("on_error has not returned by the deadline; not waiting for it")
    except Exception:
        log.exception("on_error raised; ignoring it")


def rejected_error(outcome: Outcome) -> MessageRejected:
    """The error reported for a message the server rejected (now a dead letter)."""
    return MessageRejected(
        f"the server rejected a message with HTTP {outcome.status}; it was moved to the "
        "dead letters",
        status=outcome.status,
        excerpt=outcome.excerpt,
    )


def kept_error(outcome: Outcome, delay: float) -> DeliveryError:
    """The error reported for a batch kept in the queue, retried in ``delay`` seconds."""
    if outcome.kind == "config":
        return ConfigurationRejected(
            f"{outcome.error}; the messages are kept: check the write key and host",
            status=outcome.status,
            excerpt=outcome.excerpt,
        )
    return RetryableError(
        f"{outcome.error}; the messages are kept and retried in {delay:.0f}s",
        status=outcome.status,
        excerpt=outcome.excerpt,
    )


def message_id(body: bytes) -> str:
    """The messageId of a stored body, quoted for a log line (never the body itself).

    It is user data: JSON-quoted (line breaks and control characters escaped, so it cannot
    forge a log line) and cut to 100 characters.
    """
    try:
        value = json.loads(body).get("messageId")
    except (ValueError, AttributeError):
        return "?"
    return "?" if value is None else json.dumps(str(value)[:100])
