"""track() calls per second of this checkout beside other git revisions, in one run.

Run:  python benchmarks/bench_versions.py [--ref main] [--ref f4ca74b] [--calls 20000]
          [--rounds 3] [--json results.json]

A change to the queue's schema or its lease path is judged by what it costs the caller's
append. Each revision's ``durable_analytics`` package is taken with ``git archive`` into a
temporary directory; every round runs each revision once, one after the other in fresh
processes (``PYTHONPATH`` selects the package), so the revisions share the machine's load
as evenly as a shared machine allows. Measured per revision: calls/s of one thread calling
the storage seam's ``append`` alone (a stored body: what a schema change costs, without the
call's validation and serialization around it), and of ``track()`` with ``flusher="none"``
and with the flusher thread delivering to a Collector in another process; the median round
and the ratio to this checkout are reported. The machine is shared: read the ratios of one
run, not the absolute rates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KEY = "bench-write-key"

_CHILD = r"""
import os, sys, time, tempfile
import durable_analytics
calls, flusher, host = int(sys.argv[1]), sys.argv[2], sys.argv[3]
props = {"plan": "Enterprise", "amount": 49.99, "note": "x" * 200}
path = os.path.join(tempfile.mkdtemp(), "q.sqlite3")
if flusher == "append":  # the storage call alone: QueueBackend.append of a stored body
    from durable_analytics._store.sqlite import SqliteQueue
    q = SqliteQueue(path)
    dest = q.destination(host, sys.argv[4])
    body = b'{"type":"track","event":"Bench","properties":{"note":"' + b"x" * 400 + b'"}}'
    for _ in range(200):
        q.append(dest, body)
    started = time.perf_counter()
    for _ in range(calls):
        q.append(dest, body)
    print(calls / (time.perf_counter() - started), flush=True)
    os._exit(0)
c = durable_analytics.Client(sys.argv[4], host=host, queue_path=path, flusher=flusher,
                             on_exit="none")
for _ in range(200):
    c.track("u", "Warm Up", props)
started = time.perf_counter()
for _ in range(calls):
    c.track("u", "Bench", props)
elapsed = time.perf_counter() - started
print(calls / elapsed, flush=True)
os._exit(0)
"""

#: "append": SqliteQueue.append alone; "none" / "thread": track() with that flusher.
_MODES = ("append", "none", "thread")

_COLLECTOR = (
    "import sys; from durable_analytics.testing import Collector; "
    "c = Collector(sys.argv[1]); c.start(); print(c.port, flush=True); sys.stdin.read()"
)


def _package(ref: str, into: Path) -> Path:
    """The ``durable_analytics`` package of ``ref``, extracted under ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "durable_analytics"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _run(src: Path, calls: int, flusher: str, host: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(calls), flusher, host, KEY],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", action="append", help="git revision (repeatable; default main)")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    refs = args.ref or ["main"]
    work = Path(tempfile.mkdtemp(prefix="bench-versions-"))
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    sources = {f"this checkout ({head})": REPO}
    for n, ref in enumerate(refs):
        sources[ref] = _package(ref, work / f"ref{n}")
    collector = subprocess.Popen(
        [sys.executable, "-c", _COLLECTOR, KEY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert collector.stdout is not None
    host = f"http://127.0.0.1:{collector.stdout.readline().strip()}"
    rates: dict[str, dict[str, list[float]]] = {
        name: {mode: [] for mode in _MODES} for name in sources
    }
    try:
        for _ in range(args.rounds):
            for flusher in _MODES:
                for name, src in sources.items():
                    rates[name][flusher].append(_run(src, args.calls, flusher, host))
    finally:
        collector.kill()
        collector.wait()
        shutil.rmtree(work, ignore_errors=True)
    mine = next(iter(sources))
    out: dict[str, Any] = {
        "calls": args.calls,
        "rounds": args.rounds,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "load_average": os.getloadavg(),
        "calls_per_second": rates,
        "median": {
            name: {f: statistics.median(v) for f, v in by.items()} for name, by in rates.items()
        },
    }
    out["ratio_to_this_checkout"] = {
        name: {f: out["median"][name][f] / out["median"][mine][f] for f in _MODES}
        for name in sources
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
