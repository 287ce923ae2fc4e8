"""What bench_enqueue and bench_latency share: the write key, the event, a Collector child.

A helper module, not a benchmark: the scripts import it from their own folder (Python puts a
script's folder first on ``sys.path``, in their child processes too).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

WRITE_KEY = "bench-write-key"
#: The properties of every benchmarked ``track()``: about 300 bytes once serialized.
PROPS: dict[str, Any] = {
    "plan": "Enterprise",
    "amount": 49.99,
    "currency": "USD",
    "items": [{"sku": "abc-123", "qty": 2}, {"sku": "def-456", "qty": 1}],
    "coupon": "WINTER",
    "referrer": "https://example.com/landing?utm_source=newsletter",
    "flags": [True, False],
    "note": "x" * 60,
}


def pin_or_kill(proc: subprocess.Popen[Any], cpus: set[int] | None) -> None:
    """Run the just-started ``proc`` only on ``cpus`` (None: leave it); kill it if that fails."""
    if not cpus:
        return
    try:
        os.sched_setaffinity(proc.pid, cpus)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@contextlib.contextmanager
def remote_collector(cpus: set[int] | None = None) -> Iterator[str]:
    """A Collector in its own process (its request handling does not share our GIL); its URL.

    With ``cpus``, the Collector runs only on those CPUs (Linux's ``sched_setaffinity``).
    """
    code = (
        "import sys; from durable_analytics.testing import Collector; "
        f"c = Collector({WRITE_KEY!r}); c.start(); print(c.port, flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    # Popen returns as soon as the child has exec'd, milliseconds before the new
    # interpreter's startup reaches code that starts a thread, so its threads inherit the CPUs
    # set here (a preexec_fn could deadlock in a parent with threads).
    pin_or_kill(proc, cpus)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()
