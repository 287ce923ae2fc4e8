"""track() calls per second: durable-analytics beside segment-analytics-python and raw SQLite.

Run:  python benchmarks/bench_enqueue.py [--calls 30000] [--rounds 3] [--json results.json]

Every variant runs in this one process (the 4-process variant spawns children), rounds
interleaved, and the median round is reported, with ratios, because the machine is shared
and noisy. Variants:

- durable-analytics, durability "normal" and "full", flusher "none" and "thread" (the thread
  delivering to a local Collector while the caller tracks);
- segment-analytics-python 2.4.0's in-memory track() with its consumer running against the
  same Collector (max_queue_size large enough never to drop);
- raw sqlite3 INSERT + COMMIT of a same-size row, WAL + synchronous NORMAL / FULL: the
  physical limit of a durable append here;
- 8 threads calling track() on one client; 4 processes on one queue file (calls/s summed,
  messages lost, "database is locked" errors seen).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _shared import PROPS, WRITE_KEY, remote_collector

import durable_analytics
from durable_analytics._store.sqlite import SqliteQueue


def _fresh_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-enqueue-"))


def bench_durable(calls: int, durability: str, flusher: str, url: str | None) -> float:
    path = _fresh_dir() / "queue.sqlite3"
    host = url if url is not None else "http://127.0.0.1:9"
    client = durable_analytics.Client(
        WRITE_KEY,
        host=host,
        queue_path=path,
        durability=durability,
        flusher=flusher,
        on_exit="none",
    )
    client.track("warm-up", "Warm Up", PROPS)
    track = client.track
    started = time.perf_counter()
    for _ in range(calls):
        track("user-1", "Signed Up", PROPS)
    elapsed = time.perf_counter() - started
    client.close(timeout=0)
    return calls / elapsed


def bench_segment(calls: int, url: str) -> float:
    from segment.analytics import Client as SegmentClient

    client = SegmentClient(WRITE_KEY, host=url, max_queue_size=calls * 2, upload_interval=0.5)
    client.track("warm-up", "Warm Up", PROPS)
    track = client.track
    started = time.perf_counter()
    for _ in range(calls):
        track("user-1", "Signed Up", PROPS)
    elapsed = time.perf_counter() - started
    for consumer in client.consumers or []:
        consumer.pause()
    return calls / elapsed


def bench_raw(calls: int, synchronous: str) -> float:
    path = _fresh_dir() / "raw.sqlite3"
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    _, row = durable_analytics._messages.track("user-1", "Signed Up", PROPS)
    insert = conn.execute
    started = time.perf_counter()
    for _ in range(calls):
        insert("INSERT INTO q (body) VALUES (?)", (row,))
    elapsed = time.perf_counter() - started
    conn.close()
    return calls / elapsed


def bench_threads(calls: int, threads: int, make: Callable[[], Callable[..., Any]]) -> float:
    track = make()
    per_thread = calls // threads
    barrier = threading.Barrier(threads + 1)

    def run() -> None:
        barrier.wait()
        for _ in range(per_thread):
            track("user-1", "Signed Up", PROPS)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    return per_thread * threads / (time.perf_counter() - started)


def _producer(path: str, calls: int, index: int, out: Any) -> None:
    client = durable_analytics.Client(
        WRITE_KEY, host="http://127.0.0.1:9", queue_path=path, flusher="none", on_exit="none"
    )
    errors = 0
    stored = 0
    started = time.perf_counter()
    for i in range(calls):
        try:
            ok, _ = client.track("user-1", "Signed Up", {**PROPS, "p": index, "i": i})
            stored += ok
        except Exception as exc:  # counted and reported
            errors += 1
            if "locked" in str(exc):
                errors += 1_000_000
    out.put((stored, errors, time.perf_counter() - started))


def bench_processes(calls: int, processes: int) -> dict[str, Any]:
    path = str(_fresh_dir() / "queue.sqlite3")
    durable_analytics.Client(WRITE_KEY, queue_path=path, flusher="none", on_exit="none")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    per = calls // processes
    procs = [ctx.Process(target=_producer, args=(path, per, i, out)) for i in range(processes)]
    started = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - started
    stored = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    # Calls that met another process's write lock committed to their process's spool; the
    # producers had no flusher, so move those into the file first, as any deliverer would.
    SqliteQueue(path).move_spools(scan_now=True)
    conn = sqlite3.connect(path)
    in_queue = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    conn.close()
    slowest = max(r[2] for r in results)
    return {
        "calls_per_s": stored / slowest,
        "wall_s": wall,
        "returned_true": stored,
        "in_queue": in_queue,
        "lost": stored - in_queue,
        "errors": errors % 1_000_000,
        "locked_errors": errors // 1_000_000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30_000)
    parser.add_argument("--full-calls", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    results: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)
        print(f"  {name:44s} {value:10,.0f} calls/s", flush=True)

    segment_clients: list[Any] = []
    with remote_collector() as url:
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            record("raw sqlite WAL/NORMAL", bench_raw(args.calls, "NORMAL"))
            record(
                "durable normal, flusher none", bench_durable(args.calls, "normal", "none", None)
            )
            record("segment 2.4.0 (consumer running)", bench_segment(args.calls, url))
            record(
                "durable normal, flusher thread",
                bench_durable(args.calls, "normal", "thread", url),
            )
            record("raw sqlite WAL/FULL", bench_raw(args.full_calls, "FULL"))
            record(
                "durable full, flusher none",
                bench_durable(args.full_calls, "full", "none", None),
            )
            record(
                "durable normal, flusher process",
                bench_durable(args.calls, "normal", "process", url),
            )
            record(
                "durable full, flusher thread",
                bench_durable(args.full_calls, "full", "thread", url),
            )

            def durable_client() -> Callable[..., Any]:
                client = durable_analytics.Client(
                    WRITE_KEY,
                    host=url,
                    queue_path=_fresh_dir() / "q.sqlite3",
                    flusher="none",
                    on_exit="none",
                )
                return client.track

            def segment_client() -> Callable[..., Any]:
                from segment.analytics import Client as SegmentClient

                client = SegmentClient(WRITE_KEY, host=url, max_queue_size=10**7)
                # Stopped after the run (below), so it does not compete with later variants.
                segment_clients.append(client)
                return client.track

            record(
                "8 threads: durable normal, flusher none",
                bench_threads(args.calls, 8, durable_client),
            )
            record("8 threads: segment 2.4.0", bench_threads(args.calls, 8, segment_client))
            for client in segment_clients:
                for consumer in client.consumers or []:
                    consumer.pause()
            segment_clients.clear()
        procs = bench_processes(args.calls * 2, 4)
        print(f"  4 processes on one file: {procs}", flush=True)

    med = {name: statistics.median(values) for name, values in results.items()}
    seg = med["segment 2.4.0 (consumer running)"]
    print("\nmedian of rounds, with ratios:")
    peer = "segment 2.4.0 (consumer running)"
    rows = [
        ("durable normal, flusher none", peer, "raw sqlite WAL/NORMAL"),
        ("durable normal, flusher thread", peer, "raw sqlite WAL/NORMAL"),
        ("durable normal, flusher process", peer, "raw sqlite WAL/NORMAL"),
        ("durable full, flusher none", peer, "raw sqlite WAL/FULL"),
        ("durable full, flusher thread", peer, "raw sqlite WAL/FULL"),
        (
            "8 threads: durable normal, flusher none",
            "8 threads: segment 2.4.0",
            "raw sqlite WAL/NORMAL",
        ),
    ]
    for name, peer, raw in rows:
        print(
            f"  {name:44s} {med[name]:10,.0f}/s  {med[name] / med[peer]:5.2f}x peer  "
            f"{med[name] / med[raw]:5.2f}x raw"
        )
    print(f"  segment 2.4.0 (consumer running)             {seg:10,.0f}/s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "python": sys.version.split()[0],
                    "sqlite": sqlite3.sqlite_version,
                    "machine": platform.machine(),
                    "cpus": os.cpu_count(),
                    "median": med,
                    "rounds": results,
                    "processes": procs,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
