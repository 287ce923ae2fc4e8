"""What delivery tells the logs: a failing destination, its recovery, and each batch at DEBUG.

A destination that starts failing gets a WARNING at once (host, status, how many messages of
the failed batch are kept on disk, when it is tried next), then at most one a minute while it
keeps failing;
an INFO line says when it delivers again. The state is per process and per (queue file,
destination), shared by every Deliverer in the process (the flusher thread, ``flush()``,
drain workers). Nothing here ever logs the write key or a message body.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LOGGER", "WARN_EVERY", "batch", "failed", "succeeded"]

#: The logger of delivery: batches, failures, recoveries, dead letters.
LOGGER = "durable_analytics.delivery"
#: At most one "still failing" warning per destination per this many seconds.
WARN_EVERY = 60.0

log = logging.getLogger(LOGGER)

# The monotonic clock the rate limit reads (a test may replace it).
_clock: Callable[[], float] = time.monotonic


@dataclass
class _Failing:
    since: float
    warned_at: float
    failures: int = 0


_lock = threading.Lock()
_failing: dict[tuple[str, int], _Failing] = {}


def _hint(status: int | None) -> str:
    if status in (401, 403):
        return "the write key is wrong or lacks access: check write_key"
    if status == 404:
        return "the URL is wrong: check host (it must not include /v1/batch)"
    if status is not None and 300 <= status < 400:
        return "the host redirects, which is not followed: set host to the final URL"
    return "the server refused the request: check host"


def _kept(count: int) -> str:
    """ "the batch's message is kept" or "the batch's 5 messages are kept", as ``count`` says."""
    if count == 1:
        return "the batch's message is kept"
    return f"the batch's {count} messages are kept"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def failed(
    key: tuple[str, int],
    host: str,
    *,
    kind: str,
    status: int | None,
    error: str,
    delay: float,
    kept: int,
) -> None:
    """A batch to ``host`` failed and its ``kept`` messages went back, backing off ``delay``.

    ``kind`` is ``"config"`` (401, 403, 404, 3xx: a setting to fix) or ``"retry"``.
    """
    now = _clock()
    with _lock:
        state = _failing.get(key)
        first = state is None
        if state is None:
            state = _failing[key] = _Failing(since=now, warned_at=now)
        state.failures += 1
        due = first or now - state.warned_at >= WARN_EVERY
        if due:
            state.warned_at = now
        failures, since = state.failures, state.since
    if not due:
        log.debug("delivery to %s failed again (%s); next try in %.1fs", host, error, delay)
        return
    pending = kept
    if kind == "config":
        log.warning(
            "%s answered HTTP %s: %s. Messages are kept (%d in this batch); next try in %.0fs.",
            host,
            status,
            _hint(status),
            pending,
            delay,
        )
    elif first:
        log.warning(
            "delivery to %s is failing: %s; %s on disk; next try in %.0fs",
            host,
            error,
            _kept(pending),
            delay,
        )
    else:
        log.warning(
            "delivery to %s still failing after %s (%d failed %s): %s; %s on disk; next try "
            "in %.0fs",
            host,
            _duration(now - since),
            failures,
            "request" if failures == 1 else "requests",
            error,
            _kept(pending),
            delay,
        )


def succeeded(key: tuple[str, int], host: str) -> None:
    """A batch to ``host`` was delivered: say so if it had been failing."""
    if key not in _failing:  # the common case: no lock taken
        return
    with _lock:
        state = _failing.pop(key, None)
    if state is not None:
        log.info(
            "delivery to %s recovered after %s (%d failed %s)",
            host,
            _duration(_clock() - state.since),
            state.failures,
            "request" if state.failures == 1 else "requests",
        )


def batch(
    host: str,
    messages: int,
    size: int,
    status: int | None,
    seconds: float,
    error: str,
) -> None:
    """One request, at DEBUG: how many messages and bytes, the answer, and how long it took."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    answer = f"HTTP {status}" if status is not None else "no answer"
    log.debug(
        "POST %s/v1/batch: %d %s, %d bytes -> %s in %.0f ms%s",
        host,
        messages,
        "message" if messages == 1 else "messages",
        size,
        answer,
        seconds * 1000,
        f" ({error})" if error else "",
    )
