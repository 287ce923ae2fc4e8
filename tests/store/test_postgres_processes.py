"""Real processes on one PostgreSQL queue, killed with SIGKILL; a Collector counts messages.

Producers print each message index once ``append`` returned (committed); drains deliver to
a real ``testing.Collector``. Whatever was committed must arrive (lost 0), and a message may
arrive twice only because a drain died holding its batch (at most one batch per kill).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import WRITE_KEY, start_python

from durable_analytics.testing import Collector

PRODUCERS = 4
PER_PRODUCER = 600
BATCH = 20  # the Deliverer's default flush_at: one lease holds at most this many

PRODUCER = """
import json, sys, time
from durable_analytics._store.postgres._queue import PostgresQueue
url, schema, host, key, who, count = sys.argv[1:7]
q = PostgresQueue(url, schema=schema)
dest = q.destination(host, key)
for i in range(int(count)):
    body = json.dumps({"type": "track", "event": "e", "userId": "u",
                       "messageId": f"{who}-{i}", "timestamp": "2026-01-01T00:00:00.000Z"},
                      separators=(",", ":")).encode()
    q.append(dest, body)
    print(i, flush=True)
    time.sleep(0.004)  # spread the appends over a few seconds of kills
"""

DRAIN = """
import sys, time
from durable_analytics._config import Config
from durable_analytics._drain import drain_queue
from durable_analytics._store.postgres._queue import PostgresQueue
url, schema, lease_timeout, forever = sys.argv[1:5]
q = PostgresQueue(url, schema=schema, lease_timeout=float(lease_timeout))
config = Config.build("unused: each message goes to its stored destination")
while True:
    result = drain_queue(q, config, concurrency=1, timeout=30)
    if forever != "1":
        print(result.left, flush=True)
        break
    time.sleep(0.05)
"""


def committed_indexes(proc: subprocess.Popen[str]) -> list[int]:
    out, _ = proc.communicate(timeout=30)
    return [int(line) for line in out.split()]


@pytest.mark.timeout(240)
def test_producers_and_drains_killed_at_random_lose_nothing_and_resend_at_most_a_batch_per_kill(
    pg_dsn: str, pg_schema: str
) -> None:
    rng = random.Random(12)
    lease_timeout = "3"
    with Collector(WRITE_KEY) as collector:
        producers = {
            f"p{n}": start_python(
                PRODUCER, pg_dsn, pg_schema, collector.url, WRITE_KEY, f"p{n}", str(PER_PRODUCER)
            )
            for n in range(PRODUCERS)
        }
        drains = [start_python(DRAIN, pg_dsn, pg_schema, lease_timeout, "1") for _ in range(2)]
        drain_kills = producer_kills = 0
        started = time.monotonic()
        try:
            # Kill something every 0.2-0.6 s while the producers run: a producer (not
            # restarted) or a drain (replaced by a fresh one).
            while any(p.poll() is None for p in producers.values()):
                time.sleep(rng.uniform(0.2, 0.6))
                alive_producers = [p for p in producers.values() if p.poll() is None]
                # Two producers die once well under way (not while importing), one at a time.
                warm = time.monotonic() - started > 1.0
                if alive_producers and warm and producer_kills < 2 and rng.random() < 0.5:
                    rng.choice(alive_producers).send_signal(signal.SIGKILL)
                    producer_kills += 1
                else:
                    victim = rng.randrange(len(drains))
                    drains[victim].send_signal(signal.SIGKILL)
                    drains[victim].wait()
                    drain_kills += 1
                    drains[victim] = start_python(DRAIN, pg_dsn, pg_schema, lease_timeout, "1")
        finally:
            for drain in drains:  # the last ones die as abruptly, mid-batch or not
                drain.send_signal(signal.SIGKILL)
                drain.wait()
        drain_kills += len(drains)
        committed = {
            f"{who}-{i}" for who, proc in producers.items() for i in committed_indexes(proc)
        }
        # A clean drain, which waits out the dead drains' leases, delivers what is left.
        final = start_python(DRAIN, pg_dsn, pg_schema, lease_timeout, "0")
        out, err = final.communicate(timeout=120)
        assert final.returncode == 0, err
        assert out.split() == ["0"]

    received = collector.message_ids()
    lost = committed - set(received)
    duplicates = sum(n - 1 for n in received.values())
    summary = {
        "committed": len(committed),
        "received": len(received),
        "lost": len(lost),
        "duplicates": duplicates,
        "drain_kills": drain_kills,
        "producer_kills": producer_kills,
    }
    print(json.dumps(summary), file=sys.stderr)
    assert producer_kills + drain_kills > 2
    assert len(committed) >= PER_PRODUCER * (PRODUCERS - producer_kills)
    assert lost == set(), summary
    assert duplicates <= BATCH * drain_kills, summary
    # Nothing arrived that no producer made.
    assert {k.split("-")[0] for k in received} <= set(producers)
