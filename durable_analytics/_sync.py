"""``sync_mode``: deliver a call's message before the call returns, or raise ``APIError``.

What segment-analytics-python's ``sync_mode`` promises, on a durable queue: the message is
stored first, then delivered (with the quick retries of ``max_retries``) before the call
returns. When that fails the call raises ``APIError`` and the message stays queued, to be
retried with a backoff like any other; only a message the server rejected as bad data
(400, 413, 422) is not, since it was moved to the dead letters.
"""

from __future__ import annotations

import logging

from ._delivery import Deliverer
from ._drain import deliver_until
from ._store import QueueBackend
from ._transport.base import Outcome
from .exceptions import (
    APIError,
    ConfigurationRejected,
    DurableAnalyticsError,
    MessageRejected,
    RetryableError,
)

__all__ = ["deliver_now"]

log = logging.getLogger("durable_analytics.client")

_TYPES: dict[str, type[APIError]] = {
    "retry": RetryableError,
    "config": ConfigurationRejected,
    "reject": MessageRejected,
}


def deliver_now(
    queue: QueueBackend, deliverer: Deliverer, destination: int, row_id: int, deadline: float
) -> None:
    """Deliver ``destination``'s messages up to ``row_id``; ``APIError`` if it is not sent.

    ``deadline`` is a ``time.monotonic()`` value. Queue problems are logged, not raised: the
    message was stored and a later delivery will take it.
    """
    try:
        # A failure leaves the rest queued in backoff: not waited for here.
        # One message, bounded by its deadline: it takes no delivery slot (``slots.py``), so
        # many sync_mode processes never wait for each other's deliveries.
        result = deliver_until(
            queue,
            deliverer,
            destination=destination,
            up_to_id=row_id,
            deadline=deadline,
            take_turns=False,
        )
        pending = queue.pending(up_to_id=row_id, destination=destination) > queue.pending(
            up_to_id=row_id - 1, destination=destination
        )
    except DurableAnalyticsError:
        log.exception("sync_mode delivery failed; the message stays queued")
        return
    failure = result.failure
    if pending:
        raise api_error(failure, "the message stays queued and is retried")
    if failure is not None and failure.kind == "reject" and result.dead_lettered:
        raise api_error(failure, "the message was moved to the dead letters")


def api_error(failure: Outcome | None, fate: str) -> APIError:
    """The ``APIError`` for a failed delivery (``failure`` None: nothing was sent).

    The subclass ``on_error`` would get for the same failure; ``code`` and ``message`` are
    the server's, as segment's ``APIError`` has them.
    """
    if failure is None:
        # Nothing was sent: an earlier failure's backoff is still running (or time ran out).
        return RetryableError(
            "not sent: delivery to this host is backing off after a failure "
            f"(stats().last_error says which); {fate}",
            code="backoff",
        )
    return _TYPES.get(failure.kind, APIError)(
        f"{failure.error or 'delivery failed'}; {fate}",
        status=failure.status,
        excerpt=failure.excerpt,
    )
