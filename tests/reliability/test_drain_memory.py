"""Drain memory does not grow with --concurrency: each lease reads only its own batch's bodies.

Before, every lease re-read the bodies of all the messages other workers held, inside the
write transaction: ``drain --concurrency 64`` on 24 KB messages took 630 MB of RSS against
51 MB at 4. The bound asserted is the issue's (~100 MB between the two), generous against
the 64 x 500 KB of batches legitimately in flight.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import WRITE_KEY, run_python

from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics.testing import Collector

MESSAGES = 1_500
SIZE = 24 * 1024

DRAIN = """
import json, resource, sys
from durable_analytics._config import Config
from durable_analytics._drain import drain_queue
from durable_analytics._store.sqlite import SqliteQueue
queue = SqliteQueue(sys.argv[1])
result = drain_queue(queue, Config.for_delivery(), concurrency=int(sys.argv[2]), timeout=240)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"sent": result.sent, "rss_kb": peak}))
"""


def _fill(path: Path, url: str) -> None:
    queue = Queue(path)
    dest = queue.destination(url, WRITE_KEY)
    pad = "x" * (SIZE - 200)
    for i in range(MESSAGES):
        body = json.dumps(
            {
                "type": "track",
                "event": "E",
                "userId": "u",
                "messageId": f"m-{i}",
                "properties": {"pad": pad},
            },
            separators=(",", ":"),
        ).encode()
        queue.append(dest, body)
    queue.close()


def test_drain_memory_at_concurrency_64_stays_within_100_mb_of_concurrency_4(
    tmp_path: Path,
) -> None:
    """1,500 messages of 24 KB drained with 4 and with 64 workers: every message arrives
    once each time, and the peak RSS at 64 is at most ~100 MB above the one at 4."""
    rss: dict[int, int] = {}
    for concurrency in (4, 64):
        with Collector(WRITE_KEY) as collector:
            path = tmp_path / f"q{concurrency}.sqlite3"
            _fill(path, collector.url)
            done = run_python(DRAIN, str(path), str(concurrency), timeout=300)
            assert done.returncode == 0, done.stderr
            out = json.loads(done.stdout.strip().splitlines()[-1])
            assert out["sent"] == MESSAGES
            ids = collector.message_ids()
            assert len(ids) == MESSAGES
            assert all(n == 1 for n in ids.values())
            rss[concurrency] = int(out["rss_kb"]) * 1024
    assert rss[64] - rss[4] <= 100 * 1024 * 1024, rss
