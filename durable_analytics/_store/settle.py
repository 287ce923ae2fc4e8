"""How far past a caller's deadline settling a batch the server took may still wait.

``QueueBackend.bounded`` ends every wait of the queue at a flush's, exit's or drain's
deadline. An ack that gives up there loses nothing (the messages stay queued), but the
server has the batch: it is sent again by whoever delivers next, a duplicate without a
fault. With many processes closing at once (40 forked workers on 2 cores, each waiting its
turn at the write lock), the 50 ms every wait keeps past a deadline was not enough, and
1,278 messages went twice. Inside ``settling`` a thread's waits last up to ``SETTLE_GRACE``
past the deadline, once, however many waits it makes: the deadline plus the grace is
absolute, so a caller is held at most that much longer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["SETTLE_GRACE", "settle_grace", "settling"]

#: How long past a bounded deadline a thread that settles a delivered batch may wait.
SETTLE_GRACE = 0.5

_local = threading.local()


@contextlib.contextmanager
def settling() -> Iterator[None]:
    """Inside the block, this thread's queue waits may end ``SETTLE_GRACE`` past the
    deadline of ``QueueBackend.bounded`` (the ack of a batch the server took)."""
    depth = getattr(_local, "depth", 0)
    try:
        _local.depth = depth + 1
        yield
    finally:
        _local.depth = depth


def settle_grace() -> float:
    """``SETTLE_GRACE`` inside ``settling`` on this thread, else 0."""
    return SETTLE_GRACE if getattr(_local, "depth", 0) else 0.0
