"""Independent destinations: one destination's backlog must not slow down another's.

Run:  python benchmarks/bench_destinations.py [--backlog 1000000] [--json results.json]

One queue file holds destination A's backlog (``--backlog`` messages, A backing off as if
its server were down) and 1,000 fresh messages of destination B. Measured in one run:

1. **B's drain** (``drain_queue``, 4 workers, into a local Collector) beside the same 1,000
   messages drained from a queue that holds nothing else. Target: within 2x.
2. **A producer's append latency** (p50 / p99 / max of 5,000 ``track()`` calls to B, the
   flusher thread running) beside the same on an empty queue. Target: p99 within 2x.
3. **An idle client's CPU**: a Client whose destination is A (backing off) with its flusher
   thread polling, measured over ``--idle-seconds``. Target: < 1 % of a core.
4. **Round-robin**: A healthy but slow (every request answered after 50 ms) with 2,000
   messages queued before B's 20 fresh ones; how long until B has all 20, beside B alone.

The backlog is written with one multi-row transaction (the same rows ``append`` writes) so
that the run stays short. The machine is shared: read the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import durable_analytics
from durable_analytics._config import Config
from durable_analytics._drain import drain_queue
from durable_analytics._store.sqlite import SqliteQueue, bydest
from durable_analytics.testing import Collector, Reply

KEY = "bench-write-key"
PROPS: dict[str, Any] = {"plan": "Enterprise", "amount": 49.99, "note": "x" * 200}


def _body(i: int, tag: str) -> bytes:
    return json.dumps(
        {
            "type": "track",
            "event": "Bench",
            "userId": "u",
            "messageId": f"{tag}-{i}",
            "timestamp": "2026-11-30T00:00:00.000+00:00",
            "properties": PROPS,
        },
        separators=(",", ":"),
    ).encode()


def _fill(queue: SqliteQueue, dest: int, n: int, tag: str) -> None:
    """Store ``n`` messages of ``dest`` in bulk (the rows append writes)."""
    conn = sqlite3.connect(str(queue.path), isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    now = time.time()
    for start in range(0, n, 10_000):
        rows = []
        for i in range(start, min(n, start + 10_000)):
            b = _body(i, tag)
            rows.append((dest, b, len(b), now))
        conn.executemany(
            "INSERT INTO messages (dest, body, size, enqueued_at) VALUES (?, ?, ?, ?)", rows
        )
    conn.execute("COMMIT")
    # A flusher running while the backlog built up would have folded it into the index by
    # destination as it went (a lease or a poll at a time); do the same here, in one go.
    conn.execute("BEGIN IMMEDIATE")
    while bydest.catch_up(conn, 50_000):
        pass
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _catch_up_rate(workdir: Path, n: int) -> float:
    """Messages per second folded into the index by destination, when nobody leased while
    ``n`` messages were appended (the first leases and polls then do it, 10,000 at a time)."""
    queue = SqliteQueue(workdir / "catch-up.sqlite3")
    dest = queue.destination("http://127.0.0.1:9", KEY)
    conn = sqlite3.connect(str(queue.path), isolation_level=None)
    now = time.time()
    rows = [(dest, _body(i, "c"), len(_body(i, "c")), now) for i in range(n)]
    conn.executemany(
        "INSERT INTO messages (dest, body, size, enqueued_at) VALUES (?, ?, ?, ?)", rows
    )
    started = time.perf_counter()
    while True:
        conn.execute("BEGIN IMMEDIATE")
        done = bydest.catch_up(conn)
        conn.execute("COMMIT")
        if not done:
            break
    elapsed = time.perf_counter() - started
    conn.close()
    queue.close()
    return n / elapsed


def _drain_b(path: Path) -> float:
    queue = SqliteQueue(path)
    config = Config.for_delivery()
    started = time.perf_counter()
    result = drain_queue(queue, config, concurrency=4, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.sent >= 1000, result
    queue.close()
    return elapsed


def _append_latency(path: Path, host: str) -> dict[str, float]:
    client = durable_analytics.Client(KEY, host=host, queue_path=path, on_exit="none")
    client.track("u", "Warm Up")
    samples = []
    clock = time.perf_counter_ns
    for _ in range(5000):
        t = clock()
        client.track("u", "Bench", PROPS)
        samples.append(clock() - t)
    client.close(timeout=0)
    samples.sort()
    return {
        "p50": samples[len(samples) // 2] / 1e6,
        "p99": samples[int(len(samples) * 0.99)] / 1e6,
        "max": samples[-1] / 1e6,
    }


def _idle_cpu(path: Path, host: str, seconds: float) -> float:
    """CPU share of a process whose only work is a Client idling behind A's backoff."""
    code = (
        "import sys, time, durable_analytics\n"
        "c = durable_analytics.Client(sys.argv[1], host=sys.argv[2], queue_path=sys.argv[3],"
        " on_exit='none')\n"
        "c.track('u', 'Start the flusher')\n"  # queued behind A's backlog, backing off
        "time.sleep(1.0)\n"
        "cpu0, wall0 = time.process_time(), time.perf_counter()\n"
        "time.sleep(float(sys.argv[4]))\n"
        "print((time.process_time() - cpu0) / (time.perf_counter() - wall0), flush=True)\n"
        "import os; os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, KEY, host, str(path), str(seconds)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _round_robin(workdir: Path, with_backlog: bool) -> float:
    slow = Collector(KEY).start()
    fast = Collector(KEY).start()
    try:
        slow.set_default(Reply(delay=0.05))
        path = workdir / f"rr-{with_backlog}.sqlite3"
        queue = SqliteQueue(path)
        a = queue.destination(slow.url, KEY)
        b = queue.destination(fast.url, KEY)
        if with_backlog:
            _fill(queue, a, 2000, "slow")
        # B's 20 fresh messages arrive after A's backlog; the flusher thread of a Client
        # (destination B) delivers the whole file, as a shared flusher does.
        client = durable_analytics.Client(
            KEY, host=fast.url, queue_path=path, on_exit="none", flush_interval=0.05
        )
        started = time.perf_counter()
        for i in range(20):
            client.track("u", "Fresh", {"i": i})
        ok = fast.wait_for_messages(20, timeout=120)
        elapsed = time.perf_counter() - started
        assert ok, "B's messages did not arrive"
        client.close(timeout=0)
        queue.close()
        del a, b
        return elapsed
    finally:
        slow.stop()
        fast.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-destinations-"))
    out: dict[str, Any] = {
        "backlog": args.backlog,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }
    try:
        with Collector(KEY) as b_server:
            down = "http://127.0.0.1:9"  # A: nothing listens, and A backs off anyway
            # B alone.
            alone = workdir / "alone.sqlite3"
            q = SqliteQueue(alone)
            _fill(q, q.destination(b_server.url, KEY), 1000, "b")
            q.close()
            # A's backlog, backing off, then B's 1,000.
            shared = workdir / "shared.sqlite3"
            q = SqliteQueue(shared)
            a = q.destination(down, KEY)
            b = q.destination(b_server.url, KEY)
            started = time.perf_counter()
            _fill(q, a, args.backlog, "a")
            out["fill_seconds"] = time.perf_counter() - started
            q.set_backoff(a, time.time() + 500, "bench: A is down")  # within the clock-jump horizon
            _fill(q, b, 1000, "b")
            q.close()
            out["drain_b_alone_s"] = _drain_b(alone)
            out["drain_b_behind_backlog_s"] = _drain_b(shared)
            empty = workdir / "empty.sqlite3"
            out["append_empty_ms"] = _append_latency(empty, b_server.url)
            out["append_behind_backlog_ms"] = _append_latency(shared, b_server.url)
            out["idle_cpu_share"] = _idle_cpu(shared, down, args.idle_seconds)
        out["index_catch_up_messages_per_s"] = _catch_up_rate(workdir, 100_000)
        out["round_robin_b_alone_s"] = _round_robin(workdir, False)
        out["round_robin_b_behind_slow_a_s"] = _round_robin(workdir, True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratios = {
        "B drain behind backlog / alone (target <= 2)": out["drain_b_behind_backlog_s"]
        / out["drain_b_alone_s"],
        "append p99 behind backlog / empty (target <= 2)": out["append_behind_backlog_ms"]["p99"]
        / out["append_empty_ms"]["p99"],
        "idle client CPU, % of a core (target < 1)": out["idle_cpu_share"] * 100,
        "B's 20 behind slow A / alone": out["round_robin_b_behind_slow_a_s"]
        / out["round_robin_b_alone_s"],
    }
    out["ratios"] = ratios
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    os._exit(0)  # a flusher thread waiting out A's backoff need not be joined


if __name__ == "__main__":
    main()
