"""`durable-analytics drain` throughput beside the Collector's own ceiling; the progress bar's cost.

Run:  python benchmarks/bench_drain.py [--messages 100000] [--rounds 3] [--json results.json]
Quick: python benchmarks/bench_drain.py --messages 10000 --rounds 1

The Collector (durable_analytics.testing) runs in a child process with a GIL of its own,
pinned to one CPU while the clients run on another (``--no-pin`` to let them share), so
a client's own CPU cost does not slow the server down, as with a real remote server. Every
measurement below talks to that one server over 127.0.0.1:

- ceiling: a bare HTTP load generator, ``--concurrency`` threads each with one kept-alive
  ``http.client`` connection, POSTing pre-built 20-message bodies as fast as the Collector
  answers (no queue, no JSON work on the client side). Also the same with 2 generator
  processes, in case one Python process is itself the limit; the higher is the ceiling.
- drain: a queue file filled with ``--messages`` track messages (~300 bytes of properties
  each) is drained by the code behind ``durable-analytics drain`` (``_drain.drain_queue``:
  lease 20 → POST → ack, ``--concurrency`` workers), without and with the progress bar
  (rendering to /dev/null at its terminal rate), and at concurrency 1, 2 and 8.
- drain (CLI process): ``python -m durable_analytics.cli drain`` as a program, start-up
  included.

Rounds are interleaved and the median round is reported. Every drain is checked: each
message arrived, none twice.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from durable_analytics import _messages
from durable_analytics._config import DEFAULT_HOST, Config
from durable_analytics._drain import drain_queue
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._transport import batch_body
from durable_analytics.cli._output import ProgressLine

WRITE_KEY = "bench-write-key"
BATCH = 20

# ~300 bytes of properties once serialized.
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

_COLLECTOR_CHILD = textwrap.dedent(
    """
    import json, sys
    from durable_analytics.testing import Collector

    collector = Collector(sys.argv[1]).start()
    print(collector.port, flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "count":
            ids = collector.message_ids()
            print(json.dumps({"requests": collector.requests, "distinct": len(ids),
                              "messages": sum(ids.values())}), flush=True)
        elif command == "reset":
            collector.reset()
            print("ok", flush=True)
    collector.stop()
    """
)


class RemoteCollector:
    """A Collector in a child process, counted and reset over its stdin/stdout."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _COLLECTOR_CHILD, WRITE_KEY],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"

    def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def count(self) -> dict[str, int]:
        result: dict[str, int] = json.loads(self._ask("count"))
        return result

    def reset(self) -> None:
        assert self._ask("reset") == "ok"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def build_bodies(count: int) -> list[bytes]:
    bodies = []
    for i in range(count):
        _, body = _messages.track(f"user-{i % 1000}", "Order Completed", PROPERTIES)
        bodies.append(body)
    return bodies


def fill_queue(directory: Path, url: str, bodies: list[bytes]) -> Queue:
    queue = Queue(directory / "queue.sqlite3")
    dest = queue.destination(url, WRITE_KEY)
    for body in bodies:
        queue.append(dest, body)
    return queue


# --------------------------------------------------------------------------- the ceiling


def _generate(port: int, bodies: list[bytes], threads: int, results: Any = None) -> int:
    """POST ``bodies`` over ``threads`` kept-alive connections; return the messages acked."""
    import base64

    auth = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    headers = {"Content-Type": "application/json", "Authorization": auth}
    sent = [0] * threads

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for body in bodies[k::threads]:
            conn.request("POST", "/v1/batch", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                sent[k] += BATCH
        conn.close()

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if results is not None:
        results.put(sum(sent))
    return sum(sent)


def ceiling(collector: RemoteCollector, bodies: list[bytes], threads: int, processes: int) -> float:
    collector.reset()
    requests = [batch_body(bodies[i : i + BATCH]) for i in range(0, len(bodies), BATCH)]
    started = time.perf_counter()
    if processes == 1:
        sent = _generate(collector.port, requests, threads)
    else:
        ctx = multiprocessing.get_context("fork")
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=_generate,
                args=(collector.port, requests[p::processes], threads, results),
            )
            for p in range(processes)
        ]
        for p in procs:
            p.start()
        sent = sum(results.get() for _ in procs)
        for p in procs:
            p.join()
    elapsed = time.perf_counter() - started
    assert sent == len(bodies), (sent, len(bodies))
    return sent / elapsed


# --------------------------------------------------------------------------- drain


#: CPU seconds the progress bar cost in the last drain_once with it: (redraws, callbacks).
last_progress_cost: dict[str, float] = {}


def drain_once(
    collector: RemoteCollector,
    bodies: list[bytes],
    concurrency: int,
    with_progress: bool,
) -> float:
    collector.reset()
    directory = Path(tempfile.mkdtemp(prefix="bench-drain-"))
    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below
    try:
        queue = fill_queue(directory, collector.url, bodies)
        progress = ProgressLine(len(bodies), devnull).start() if with_progress else None
        try:
            config = Config.build("-", host=DEFAULT_HOST, queue_path=queue.path)
            result = drain_queue(queue, config, concurrency=concurrency, progress=progress)
        finally:
            if progress is not None:
                progress.close()
        if progress is not None:
            last_progress_cost.update(
                redraw_cpu=progress.render_cpu,
                callbacks=progress.updates,
                elapsed=result.elapsed,
            )
        queue.close()
        check(collector, result.sent, len(bodies))
        return result.sent / result.elapsed
    finally:
        devnull.close()
        shutil.rmtree(directory, ignore_errors=True)


def callback_seconds() -> float:
    """CPU seconds of one progress callback (a lock and an addition), measured alone."""
    with open(os.devnull, "w") as devnull:
        progress = ProgressLine(1, devnull)
        calls = 200_000
        started = time.process_time()
        for _ in range(calls):
            progress(BATCH)
        return (time.process_time() - started) / calls


def drain_process(collector: RemoteCollector, bodies: list[bytes], concurrency: int) -> float:
    collector.reset()
    directory = Path(tempfile.mkdtemp(prefix="bench-drain-"))
    try:
        fill_queue(directory, collector.url, bodies).close()
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "durable_analytics.cli",
                "drain",
                "--queue",
                str(directory / "queue.sqlite3"),
                "--concurrency",
                str(concurrency),
            ],
            check=True,
            env=env,
            capture_output=True,
        )
        elapsed = time.perf_counter() - started
        check(collector, len(bodies), len(bodies))
        return len(bodies) / elapsed
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def check(collector: RemoteCollector, sent: int, expected: int) -> None:
    counts = collector.count()
    if not (sent == expected == counts["distinct"] == counts["messages"]):
        raise SystemExit(f"drain lost or duplicated messages: sent={sent} collector={counts}")


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--also", default="1,2,8", help="other concurrencies, once each")
    parser.add_argument(
        "--ab-pairs",
        type=int,
        default=8,
        help="back-to-back drain pairs without / with the progress bar (20,000 messages each)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the collector and the clients share all CPUs",
    )
    args = parser.parse_args()

    print(
        f"bench_drain: {args.messages:,} messages, {args.rounds} round(s), "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{datetime.now(timezone.utc):%Y-%m-%d}",
        flush=True,
    )
    bodies = build_bodies(args.messages)
    size = statistics.mean(len(b) for b in bodies)
    print(f"message size {size:.0f} bytes serialized, {BATCH}-message batches", flush=True)
    collector = RemoteCollector()
    pinned = args.pin and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
    if pinned:
        # The server on one CPU, every client (generator, drain) on another: the client's CPU
        # then does not come out of the server's, as with a real remote server.
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(collector.proc.pid, {cpus[0]})
        os.sched_setaffinity(0, {cpus[1]})
    print(
        "collector on CPU 0, clients on CPU 1"
        if pinned
        else "collector and clients share the CPUs (no pinning)",
        flush=True,
    )
    c = args.concurrency
    runs: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)
        print(f"  {name:<38} {value:>10,.0f} msg/s", flush=True)

    try:
        for r in range(args.rounds):
            print(f"round {r + 1}", flush=True)
            record(f"ceiling: load generator, {c} threads", ceiling(collector, bodies, c, 1))
            record(f"ceiling: 2 processes x {c} threads", ceiling(collector, bodies, c, 2))
            order = [False, True] if r % 2 == 0 else [True, False]
            for with_progress in order:
                name = f"drain c={c}" + (" + progress bar" if with_progress else "")
                record(name, drain_once(collector, bodies, c, with_progress))
        if args.also:
            print("other concurrencies (once each)", flush=True)
            for other in (int(x) for x in args.also.split(",") if x):
                record(f"drain c={other}", drain_once(collector, bodies, other, False))
            record(f"drain c={c} (CLI process)", drain_process(collector, bodies, c))
        ratios: list[float] = []
        if args.ab_pairs:
            print(f"progress bar A/B: {args.ab_pairs} back-to-back pairs", flush=True)
            small = bodies[: min(len(bodies), 20_000)]
            for pair in range(args.ab_pairs):
                first = pair % 2 == 0
                a = drain_once(collector, small, c, not first)
                b = drain_once(collector, small, c, first)
                plain_rate, bar_rate = (b, a) if first else (a, b)
                ratios.append(bar_rate / plain_rate)
                print(f"  pair {pair + 1}: bar / plain = {ratios[-1]:.3f}", flush=True)
        per_call = callback_seconds()
        drain_once(collector, bodies, c, True)
        cost = dict(last_progress_cost)
    finally:
        collector.close()

    median = {name: statistics.median(values) for name, values in runs.items()}
    top = max(
        median[f"ceiling: load generator, {c} threads"],
        median[f"ceiling: 2 processes x {c} threads"],
    )
    plain = median[f"drain c={c}"]
    bar = median[f"drain c={c} + progress bar"]
    overhead = (plain - bar) / plain * 100
    print("\nmedians")
    for name, value in median.items():
        print(f"  {name:<38} {value:>10,.0f} msg/s  {value / top:6.1%} of the ceiling")
    print(f"\ndrain c={c}: {plain / top:.1%} of the Collector's ceiling (target >= 50%)")
    print(f"progress bar, median of the rounds: {overhead:+.2f}% of the drain rate")
    ab = (1 - statistics.median(ratios)) * 100 if ratios else float("nan")
    if ratios:
        print(f"progress bar, median of {len(ratios)} A/B pairs: {ab:+.2f}% of the drain rate")
    cpu = cost["redraw_cpu"] + cost["callbacks"] * per_call
    cpu_share = cpu / cost["elapsed"] * 100
    print(
        f"progress bar CPU: redraws {cost['redraw_cpu'] * 1000:.1f} ms + "
        f"{cost['callbacks']:,.0f} callbacks x {per_call * 1e6:.2f} us = "
        f"{cpu_share:.3f}% of the drain's {cost['elapsed']:.2f}s (target < 2%)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "messages": args.messages,
                    "rounds": args.rounds,
                    "message_bytes": round(size),
                    "runs": runs,
                    "median": median,
                    "ceiling": top,
                    "drain_share_of_ceiling": plain / top,
                    "progress_overhead_percent_rounds": overhead,
                    "progress_overhead_percent_ab": ab,
                    "progress_ab_ratios": ratios,
                    "progress_cpu_percent": cpu_share,
                    "pinned": pinned,
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
