"""Many processes on one queue file: calls, and closes at once (a worker pool's shutdown).

    python benchmarks/bench_processes.py                       # 20 processes, both scenarios
    python benchmarks/bench_processes.py --processes 40 --only close

Every process is a fresh interpreter with a default ``Client`` (journal, flusher thread) on
one shared queue file, against one ``testing.Collector`` in this process. They start, make
one call each (so that each holds a journal), then wait for a start file:

- ``close``: each makes ``--calls`` calls as fast as it can, then ``close()`` (the
  default ``shutdown_timeout``, 5 s) right away: what a pool shut down at once does. The
  count at the collector is taken once every process has exited: what is not there waits
  on disk for the next process (not lost).
- ``steady``: each calls ``--rate`` times a second for ``--seconds``, then ``close()``.

Reported: calls made, messages at the collector when all had exited, duplicates, the
slowest call, the slowest ``close()``, and what the closes left pending. There is no peer
column: an in-memory client has no queue shared between processes. The machine these run
on is shared (2 vCPUs): compare rows of one run.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from durable_analytics.testing import Collector

CHILD = r"""
import json, os, sys, time
host, path, scenario, calls, rate, seconds, go = sys.argv[1:8]
calls, rate, seconds = int(calls), int(rate), float(seconds)
from durable_analytics import Client
client = Client("bench-key", host=host, queue_path=path)
client.track(user_id="warm", event="Warm")
open(go + ".ready." + str(os.getpid()), "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
worst = 0.0
made = 0
start = time.monotonic()
while True:
    if scenario == "close":
        if made >= calls:
            break
        due = calls
    else:
        now = time.monotonic() - start
        if now >= seconds:
            break
        due = int(now * rate)
    while made < due:
        t = time.perf_counter()
        client.track(user_id=f"u{os.getpid()}", event="Bench Event", properties={"i": made})
        worst = max(worst, time.perf_counter() - t)
        made += 1
    if scenario == "steady":
        time.sleep(0.002)
t = time.monotonic()
result = client.close()
print(json.dumps({"made": made, "worst": worst, "close": time.monotonic() - t,
                  "pending": result.pending}), flush=True)
"""


def run(scenario: str, processes: int, calls: int, rate: int, seconds: float) -> dict[str, Any]:
    """One scenario: its counts and times."""
    with Collector() as collector, tempfile.TemporaryDirectory() as tmp:
        path, go = str(Path(tmp) / "q.sqlite3"), Path(tmp) / "go"
        args = [collector.url, path, scenario, str(calls), str(rate), str(seconds), str(go)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, text=True
            )
            for _ in range(processes)
        ]
        # Every process started and made its first call (or the wait ran out).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(Path(tmp).glob("go.ready.*"))) < processes:
            time.sleep(0.1)
        started = time.monotonic()
        go.touch()
        outs = [json.loads(p.communicate(timeout=600)[0].splitlines()[-1]) for p in procs]
        wall = time.monotonic() - started
        # The warm-up calls are not counted.
        ids = collections.Counter(
            m["messageId"] for m in collector.messages() if m.get("event") == "Bench Event"
        )
    return {
        "scenario": scenario,
        "processes": processes,
        "calls": sum(o["made"] for o in outs),
        "received": len(ids),
        "duplicates": sum(c - 1 for c in ids.values()),
        "worst_call_s": max(o["worst"] for o in outs),
        "slowest_close_s": max(o["close"] for o in outs),
        "pending_at_close": max(o["pending"] for o in outs),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=20)
    parser.add_argument("--calls", type=int, default=300, help="calls per process (close)")
    parser.add_argument("--rate", type=int, default=100, help="calls a second (steady)")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long (steady)")
    parser.add_argument("--only", default="close,steady")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = []
    for scenario in args.only.split(","):
        r = run(scenario, args.processes, args.calls, args.rate, args.seconds)
        results.append(r)
        print(
            f"{r['scenario']:6s} {r['processes']} processes: {r['calls']:,} calls, "
            f"{r['received']:,} at the collector when all had exited, "
            f"{r['duplicates']} duplicates; slowest call {r['worst_call_s'] * 1e3:.0f} ms, "
            f"slowest close() {r['slowest_close_s']:.2f} s (pending at a close: "
            f"{r['pending_at_close']:,}), {r['wall_s']:.1f} s in all",
            flush=True,
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
