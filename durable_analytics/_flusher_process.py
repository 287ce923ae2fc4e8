"""The child flusher process of ``flusher="process"``: delivers one queue for its parent.

Started by the Client on its first call as ``python -m durable_analytics._flusher_process``.
It uses its own core (and its own GIL) for the HTTP work, and ends after its parent exits:
it then delivers what it can within ``--shutdown-timeout`` and leaves the rest on disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence

from ._flusher import Deliverer, Flusher, drain
from ._queue import Queue
from ._transport import Transport

__all__ = ["main"]

log = logging.getLogger("durable_analytics")


def _parent_alive(parent: int) -> bool:
    if os.getppid() != parent:
        return False  # re-parented: the parent exited
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the flusher loop until the parent exits or SIGTERM arrives."""
    parser = argparse.ArgumentParser(prog="durable_analytics._flusher_process")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--flush-at", type=int, default=20)
    parser.add_argument("--flush-interval", type=float, default=5.0)
    parser.add_argument("--max-batch-bytes", type=int, default=500_000)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--shutdown-timeout", type=float, default=5.0)
    parser.add_argument("--lease-timeout", type=float, default=60.0)
    parser.add_argument("--gzip", action="store_true")
    parser.add_argument("--proxies", type=json.loads, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="durable-analytics flusher: %(message)s")

    queue = Queue(args.queue, lease_timeout=args.lease_timeout)

    def make() -> Deliverer:
        return Deliverer(
            queue,
            Transport(timeout=args.timeout, gzip=args.gzip, proxies=args.proxies),
            flush_at=args.flush_at,
            max_batch_bytes=args.max_batch_bytes,
            max_retries=args.max_retries,
        )

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    flusher = Flusher(make(), flush_interval=args.flush_interval, poll_interval=0.1)
    flusher.start()
    while not stop.is_set() and _parent_alive(args.parent):
        stop.wait(0.1)
    # The parent is gone (or we were asked to stop): finish the batch in flight and deliver
    # the rest, all within one shutdown_timeout.
    started = time.monotonic()
    flusher.stop(args.shutdown_timeout)
    remaining = max(0.0, args.shutdown_timeout - (time.monotonic() - started))
    if remaining > 0 and queue.pending():
        drain(queue, make, concurrency=2, timeout=remaining)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
