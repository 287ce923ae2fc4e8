"""SQLite against PostgreSQL as the queue, in the same run: appends, drains, the outbox's cost.

Run:   python benchmarks/bench_backends.py [--appends 2000] [--messages 10000] [--rounds 1]
                                           [--dsn postgresql://...] [--json results.json]

Without ``--dsn`` a private PostgreSQL cluster is started for the run (the test suite's
``tests/_postgres.py``; Unix socket, **fsync on**: commits cost what they cost on a real
server, on this machine's disk) and removed afterwards. Everything runs on the same
machine: the server shares the CPUs with the clients, and talks over a Unix socket, so a
real network adds a round trip per call that this does not show.

Measured, per round (rounds interleaved, the median reported):

- **appends/s**, the queue's own transaction per call (``append``), 1 and 4 producer
  processes: SQLite and PostgreSQL, each with ``durability`` "normal" and "full".
- **inside a caller's transaction** (PostgreSQL): an application transaction of one
  ``INSERT`` into its own table, committed, alone and with one event staged by
  ``stage(..., conn)`` (the transactional outbox), alternating in blocks of
  50 in each process; 1 and 4 processes. The ratio of the two is what the outbox costs
  the application.
- **drain msgs/s**: the queue filled with ``--messages`` messages, then 1 or 4 consumer
  processes each looping ``lease(20) → ack`` (no HTTP: the queue's own cost).

Messages are real ``track`` bodies (~600 bytes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _postgres import Cluster

from durable_analytics import _messages
from durable_analytics._store import SqliteQueue as Queue
from durable_analytics._store.postgres._queue import PostgresQueue

HOST = "https://api.segment.io"
WRITE_KEY = "bench-write-key"
PROPERTIES: dict[str, Any] = {
    "plan": "Enterprise",
    "amount": 49.99,
    "currency": "USD",
    "items": [{"sku": "abc-123", "qty": 2}, {"sku": "def-456", "qty": 1}],
    "coupon": "WINTER",
    "referrer": "https://example.com/landing?utm_source=newsletter&utm_medium=email",
    "flags": [True, False],
    "note": "x" * 90,
}
CTX = multiprocessing.get_context("fork")


def body() -> bytes:
    _, data = _messages.track("user-1", "Order Completed", PROPERTIES)
    return data


def open_queue(spec: dict[str, Any]) -> Any:
    if spec["kind"] == "sqlite":
        return Queue(spec["path"], durability=spec["durability"])
    return PostgresQueue(spec["dsn"], schema=spec["schema"], durability=spec["durability"])


# --------------------------------------------------------------------------- workers


def _producer(spec: dict[str, Any], n: int, go: Any, out: Any) -> None:
    queue = open_queue(spec)
    dest = queue.destination(HOST, WRITE_KEY)
    data = body()
    go.wait()
    started = time.perf_counter()
    for _ in range(n):
        queue.append(dest, data)
    out.put((started, time.perf_counter(), n))


def _ab_producer(spec: dict[str, Any], n: int, go: Any, out: Any) -> None:
    """Application transactions alternating, 50 at a time, without and with an event."""
    import psycopg

    queue = open_queue(spec)
    dest = queue.destination(HOST, WRITE_KEY)
    data = body()
    conn = psycopg.connect(spec["dsn"])
    spent = {"app": 0.0, "outbox": 0.0}
    done = {"app": 0, "outbox": 0}
    go.wait()
    for block in range(max(2, n // 50)):
        mode = "app" if block % 2 == 0 else "outbox"
        started = time.perf_counter()
        for i in range(50):
            with conn.transaction():
                conn.execute("INSERT INTO bench_orders (note) VALUES (%s)", (f"order {i}",))
                if mode == "outbox":
                    queue.stage(dest, data, conn)
        spent[mode] += time.perf_counter() - started
        done[mode] += 50
    out.put((spent, done))


def _consumer(spec: dict[str, Any], go: Any, out: Any) -> None:
    queue = open_queue(spec)
    go.wait()
    started = time.perf_counter()
    done = 0
    while True:
        lease = queue.lease(20, 500_000)
        if lease is None:
            break
        done += queue.ack(lease)
    out.put((started, time.perf_counter(), done))


def run_processes(target: Callable[..., None], args: tuple[Any, ...], procs: int) -> float:
    """Start ``procs`` workers at once; the aggregate rate (units per second)."""
    go = CTX.Event()
    out = CTX.Queue()
    workers = [CTX.Process(target=target, args=(*args, go, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    time.sleep(0.5)  # every worker opened its queue and waits
    go.set()
    results = [out.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    begin = min(r[0] for r in results)
    end = max(r[1] for r in results)
    return sum(r[2] for r in results) / (end - begin)


def run_ab(spec: dict[str, Any], n: int, procs: int) -> dict[str, float]:
    """Aggregate transactions/s without (``app``) and with (``outbox``) an event."""
    go = CTX.Event()
    out = CTX.Queue()
    workers = [CTX.Process(target=_ab_producer, args=(spec, n, go, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    go.set()
    results = [out.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    return {
        mode: sum(done[mode] / spent[mode] for spent, done in results) for mode in ("app", "outbox")
    }


# --------------------------------------------------------------------------- measurements


def fresh(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The spec with a new, empty queue (a new file or a new schema)."""
    new = dict(spec)
    if spec["kind"] == "sqlite":
        directory = Path(tempfile.mkdtemp(dir=workdir))
        directory.chmod(0o700)
        new["path"] = directory / "queue.sqlite3"
    else:
        new["schema"] = f"bench_{uuid.uuid4().hex[:10]}"
    open_queue(new).close()
    return new


def fill(spec: dict[str, Any], messages: int) -> None:
    queue = open_queue({**spec, "durability": "normal"})
    dest = queue.destination(HOST, WRITE_KEY)
    data = body()
    if spec["kind"] == "sqlite":
        for _ in range(messages):
            queue.append(dest, data)
        return
    import psycopg

    # Bulk-load through the outbox path: one transaction, the same rows append writes.
    with psycopg.connect(spec["dsn"]) as conn, conn.transaction():
        for _ in range(messages):
            queue.stage(dest, data, conn)


def one_round(dsn: str, workdir: Path, appends: int, messages: int) -> dict[str, float]:
    result: dict[str, float] = {}
    for durability in ("normal", "full"):
        for kind in ("sqlite", "postgres"):
            base = {"kind": kind, "dsn": dsn, "durability": durability}
            for procs in (1, 4):
                spec = fresh(base, workdir)
                rate = run_processes(_producer, (spec, appends // procs), procs)
                result[f"append {kind} {durability} x{procs}"] = rate
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_orders (id bigserial PRIMARY KEY, note text)"
        )
    for procs in (1, 4):
        spec = fresh({"kind": "postgres", "dsn": dsn, "durability": "full"}, workdir)
        for mode, rate in run_ab(spec, appends // procs, procs).items():
            result[f"app transaction, {mode} x{procs}"] = rate
    for kind in ("sqlite", "postgres"):
        for procs in (1, 4):
            spec = fresh({"kind": kind, "dsn": dsn, "durability": "full"}, workdir)
            fill(spec, messages)
            result[f"drain {kind} x{procs}"] = run_processes(_consumer, (spec,), procs)
    return result


def report(rounds: list[dict[str, float]]) -> dict[str, Any]:
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    lines = ["| measurement | median /s | ratio |", "|---|---:|---|"]

    def ratio(key: str, against: str, label: str) -> str:
        return f"{median[key] / median[against]:.2f}x of {label}"

    for durability in ("normal", "full"):
        for procs in (1, 4):
            s = f"append sqlite {durability} x{procs}"
            p = f"append postgres {durability} x{procs}"
            lines.append(f"| {s} | {median[s]:,.0f} | 1 |")
            lines.append(f"| {p} | {median[p]:,.0f} | {ratio(p, s, 'SQLite')} |")
    for procs in (1, 4):
        a = f"app transaction, app x{procs}"
        o = f"app transaction, outbox x{procs}"
        lines.append(f"| {a} (tx/s) | {median[a]:,.0f} | 1 |")
        lines.append(f"| {o} (tx/s) | {median[o]:,.0f} | {ratio(o, a, 'without the event')} |")
    for procs in (1, 4):
        s = f"drain sqlite x{procs}"
        p = f"drain postgres x{procs}"
        lines.append(f"| {s} (msgs/s) | {median[s]:,.0f} | 1 |")
        lines.append(f"| {p} (msgs/s) | {median[p]:,.0f} | {ratio(p, s, 'SQLite')} |")
    return {"median": median, "rounds": rounds, "table": "\n".join(lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--appends", type=int, default=2000, help="appends per configuration")
    parser.add_argument("--messages", type=int, default=10000, help="messages per drain")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dsn", help="an existing server (default: start a private one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    cluster = None
    dsn = args.dsn
    if dsn is None:
        cluster = Cluster(fsync="on", full_page_writes="on")
        cluster.start()
        dsn = cluster.dsn
    try:
        with tempfile.TemporaryDirectory() as workdir:
            rounds = []
            for n in range(args.rounds):
                print(f"round {n + 1}/{args.rounds}", file=sys.stderr)
                rounds.append(one_round(dsn, Path(workdir), args.appends, args.messages))
    finally:
        if cluster is not None:
            cluster.stop()
    out = report(rounds)
    print(out["table"])
    if args.json:
        import psycopg

        out["environment"] = {
            "date": datetime.now(timezone.utc).date().isoformat(),
            "python": platform.python_version(),
            "psycopg": psycopg.__version__,
            "machine": platform.machine(),
            "cpus": multiprocessing.cpu_count(),
            "appends": args.appends,
            "messages": args.messages,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
