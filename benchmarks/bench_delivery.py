"""Delivery at real-network speed, side by side with segment-analytics-python 2.4.0.

    python benchmarks/bench_delivery.py --json benchmarks/results/delivery.json
    python benchmarks/bench_delivery.py --sweep 1,4,8,16,32     # choose max_in_flight
    python benchmarks/bench_delivery.py --only loopback --rounds 5   # median of 5 rounds

Every client runs in its own child process, at its defaults (the peer with a large
``max_queue_size`` so it drops nothing); the ``durable_analytics.testing.Collector`` runs in
this process and holds every answer ``--delay`` seconds (50 ms: a round trip to a real
ingest API from a server). Times are wall clock from the child's first ``track()`` until
the collector holds every message (each counted once, by messageId):

- ``flush``: N tracks, then ``flush()``;
- ``exit``: N tracks, then the script just ends (durable-analytics only): the time is
  until the process has exited, and the messages counted are those at the collector then;
- ``steady``: ``--steady-rate`` calls a second for ``--steady-seconds`` (a web process's
  stream), then ``flush()``: the most that waited to be sent at once (sampled every 0.25 s)
  and how long the final ``flush()`` took;
- ``storm``: the collector answers every other request 429 with ``Retry-After: 1``;
  everything must arrive, no request may come in while a Retry-After runs (50 ms grace
  for requests already on their way), and the child traces its in-flight window.

The machine these run on is shared: numbers are noisy, compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from durable_analytics.testing import Collector

WRITE_KEY = "bench-key"

CHILD = r"""
import json, sys, time
lib, scenario, n, host, queue_dir, extra = sys.argv[1:7]
n = int(n)
settings = json.loads(extra)
rate = settings.pop("_rate", None)
props = {"plan": "Enterprise", "amount": 42, "tags": ["a", "b", "c"]}
if lib == "segment":
    from segment.analytics import Client
    client = Client("bench-key", host=host, max_queue_size=10_000_000, **settings)
else:
    from durable_analytics import Client
    client = Client("bench-key", host=host, queue_path=queue_dir + "/q.sqlite3", **settings)
sends = []
if lib == "durable" and scenario == "storm":
    # The client's own account of every request: wall time before the request was made
    # and after its answer was read, the status, the Retry-After it read, and its
    # messageIds (to match the collector's record of the same request).
    from durable_analytics._transport.http import HTTPTransport
    _send = HTTPTransport.send
    def send(self, destination, bodies, **kw):
        started = time.time()
        outcome = _send(self, destination, bodies, **kw)
        ids = ",".join(json.loads(b).get("messageId") for b in bodies)
        sends.append((started, time.time(), outcome.status, outcome.retry_after, ids))
        return outcome
    HTTPTransport.send = send
print(json.dumps({"t0": time.time()}), flush=True)
backlog = []
if scenario == "steady":
    # A web process's steady stream: ``rate`` calls a second, the backlog (what waits to
    # be sent: ours on disk, the peer's in memory) sampled every 0.25 s.
    waiting = client.queue.pending if lib == "durable" else client.queue.qsize
    start = time.monotonic()
    i = 0
    next_sample = 0.25
    while i < n:
        now = time.monotonic() - start
        due = min(n, int(now * rate) + 1)
        while i < due:
            client.track(user_id=f"user-{i % 100}", event="Bench Event", properties=props)
            i += 1
        if now >= next_sample:
            backlog.append(waiting())
            next_sample += 0.25
        time.sleep(0.001)
else:
    for i in range(n):
        client.track(user_id=f"user-{i % 100}", event="Bench Event", properties=props)
t_tracked = time.time()
if scenario in ("flush", "storm", "steady"):
    if lib == "segment":
        client.flush()
    else:
        client.flush(timeout=300 if scenario == "storm" else None)
out = {"t_tracked": t_tracked, "t_flushed": time.time(), "backlog": backlog}
if lib == "durable" and scenario == "storm":
    from durable_analytics import _pipeline
    out["windows"] = {
        h: {"peak": w.peak, "history": [(round(t, 3), v) for t, v in w.history]}
        for h, w in _pipeline.windows().items()
    }
    out["sends"] = sends
print(json.dumps(out), flush=True)
if lib == "segment":
    client.shutdown()
"""


def run(
    collector: Collector,
    lib: str,
    scenario: str,
    n: int,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One child: its timings, and what the collector held when it was done."""
    collector.reset()
    if scenario == "storm":
        collector.rate_limit(0.5, "1")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                lib,
                scenario,
                str(n),
                collector.url,
                tmp,
                json.dumps(settings or {}),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        t0 = json.loads(proc.stdout.readline())["t0"]
        result: dict[str, Any] = {"lib": lib, "scenario": scenario, "messages": n}
        if scenario == "exit":
            proc.wait(timeout=300)
            t_exit = time.time()
            result["at_exit"] = len(collector.message_ids())
            result["seconds"] = t_exit - t0
            tail = proc.stdout.read()
            done = json.loads(tail.splitlines()[0])
        else:
            if not collector.wait_for_messages(n, timeout=300):
                raise SystemExit(f"{lib} {scenario}: only {len(collector.message_ids())} of {n}")
            result["seconds"] = time.time() - t0
            done = json.loads(proc.stdout.readline())
            proc.wait(timeout=60)
        result["track_seconds"] = done["t_tracked"] - t0
        ids = collector.message_ids()
        result["received"] = len(ids)
        result["duplicates"] = sum(c - 1 for c in ids.values())
        result["requests"] = collector.requests
        result["peak_concurrency"] = collector.peak_concurrency
        result["msg_per_s"] = n / result["seconds"]
        if scenario == "steady":
            result["backlog"] = done["backlog"]
            result["max_backlog"] = max(done["backlog"], default=0)
            result["flush_seconds"] = done["t_flushed"] - done["t_tracked"]
        if "windows" in done:
            result["windows"] = done["windows"]
            result["inside_retry_after"] = collector.requests_inside_retry_after()
            result["rate_limited"] = len(collector.retry_after_windows)
            result.update(storm_check(collector, done["sends"]))
    return result


def storm_check(collector: Collector, sends: list[list[Any]]) -> dict[str, Any]:
    """The client's own account of the Retry-After rule, beside the collector's.

    ``client_inside_retry_after`` counts requests the client *started* after it had read a
    429 whose Retry-After was still running, by the client's clock (the start is taken
    before the request is built): a real breach of the rule. Each request the collector
    counted inside a window is matched to the client's record of it (same messageIds)
    and listed with when the client started it relative to the window: a request the
    collector stamped inside a window but the client started before it read the 429, or
    after its Retry-After ended, is an artefact of the collector's stamps (its threads
    share a GIL under load), not a breach.
    """
    windows = [(read, read + ra) for _, read, status, ra, _ in sends if status == 429 and ra]
    client_inside = [s for s in sends if any(a < s[0] < b for a, b in windows)]
    detail = []
    for batch in collector.batches:
        at = batch.received_at
        covering = [(a, b) for a, b in collector.retry_after_windows if a + 0.05 < at < b]
        if not covering:
            continue
        ids = ",".join(m.get("messageId", "") for m in batch.messages)
        starts = [s[0] for s in sends if s[4] == ids and s[0] <= at]
        started = max(starts, default=None)
        a, b = covering[0]
        detail.append(
            {
                "collector_stamp_after_429_left": round(at - a, 4),
                "retry_after_ends_after_429_left": round(b - a, 4),
                "client_started_after_429_left": (
                    None if started is None else round(started - a, 4)
                ),
                "client_counts_it_inside": started is not None
                and any(x < started < y for x, y in windows),
            }
        )
    return {"client_inside_retry_after": len(client_inside), "collector_inside_detail": detail}


def show(r: dict[str, Any]) -> None:
    extra = ""
    if "at_exit" in r:
        extra = f", at the collector when the process exited: {r['at_exit']:,}"
    if "max_backlog" in r:
        extra = (
            f", waiting at most {r['max_backlog']:,} (sampled every 0.25 s), "
            f"flush() at the end {r['flush_seconds']:.2f} s"
        )
    if "inside_retry_after" in r:
        peaks = {h: w["peak"] for h, w in r["windows"].items()}
        extra = (
            f", 429s: {r['rate_limited']}, requests inside a Retry-After: "
            f"{r['inside_retry_after']} by the collector's stamps, "
            f"{r['client_inside_retry_after']} by the client's own clock, "
            f"window peak {peaks}"
        )
    label = {"upload_size": "/20", "flusher": "/process"}
    tag = "".join(v for k, v in label.items() if k in r.get("settings", {}))
    print(
        f"  {r['lib'] + tag:<16} {r['scenario']:<6} "
        f"{r['messages']:>6,} msgs  {r['seconds']:6.2f} s  "
        f"{r['msg_per_s']:8,.0f} msg/s  tracks {r['track_seconds']:.2f} s  "
        f"requests {r['requests']:,}  peak in flight {r['peak_concurrency']}  "
        f"duplicates {r['duplicates']}{extra}",
        flush=True,
    )


def _loopback_round(collector: Collector, n: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One round of the loopback comparison: its four rows, and their ratios."""
    # Both at 20-message batches (the comparison): the peer with upload_size=20, as
    # many requests as ours.
    ours = run(collector, "durable", "flush", n)
    peer20 = run(collector, "segment", "flush", n, {"upload_size": 20})
    peer20["settings"] = {"upload_size": 20}
    # Each at its defaults: the peer sends 100-message batches (a fifth of the requests), we
    # send 20-message ones.
    peer = run(collector, "segment", "flush", n)
    # Ours with the delivery in a child process (``flusher="process"``): on loopback the run
    # is CPU-bound, and the flusher thread shares the caller's GIL; a child process delivers
    # on the other core while ``flush()`` does too.
    proc = run(collector, "durable", "flush", n, {"flusher": "process"})
    proc["settings"] = {"flusher": "process"}
    ratios = {
        "flush_loopback_vs_peer_20": peer20["seconds"] / ours["seconds"],
        "flush_loopback_vs_peer_defaults": peer["seconds"] / ours["seconds"],
        "flush_loopback_process_vs_peer_20": peer20["seconds"] / proc["seconds"],
    }
    return [ours, proc, peer20, peer], ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--exit-messages", type=int, default=5_000)
    parser.add_argument("--loopback-messages", type=int, default=20_000)
    parser.add_argument("--storm-messages", type=int, default=400)
    parser.add_argument("--steady-rate", type=int, default=2_000)
    parser.add_argument("--steady-seconds", type=float, default=10.0)
    parser.add_argument(
        "--only", default=None, help="comma list of scenarios: flush,exit,storm,steady,loopback"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="loopback: run its four clients this many times, alternated, and report each "
        "round and the median of each ratio",
    )
    parser.add_argument("--sweep", default=None, help="max_in_flight values, e.g. 1,4,8,16")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    results: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    with Collector(WRITE_KEY, delay=args.delay) as collector:
        if args.sweep:
            for window in [int(v) for v in args.sweep.split(",")]:
                r = run(collector, "durable", "flush", args.messages, {"max_in_flight": window})
                r["max_in_flight"] = window
                print(f"max_in_flight={window}", end="")
                show(r)
                results.append(r)
        else:
            only = set((args.only or "flush,exit,storm,steady,loopback").split(","))
            if only & {"flush", "exit", "storm", "steady"}:
                print(f"{args.delay * 1000:g} ms per request:")
            if "flush" in only:
                ours = run(collector, "durable", "flush", args.messages)
                peer = run(collector, "segment", "flush", args.messages)
                for r in (ours, peer):
                    show(r)
                ratios["flush_50ms_vs_peer"] = peer["seconds"] / ours["seconds"]
                results += [ours, peer]

            if "exit" in only:
                exit_ours = run(collector, "durable", "exit", args.exit_messages)
                exit_peer = run(collector, "segment", "flush", args.exit_messages)
                for r in (exit_ours, exit_peer):
                    show(r)
                ratios["exit_50ms_vs_peer_flush"] = exit_peer["seconds"] / exit_ours["seconds"]
                ratios["exit_50ms_delivered_share"] = exit_ours["at_exit"] / args.exit_messages
                results += [exit_ours, exit_peer]

            if "storm" in only:
                storm = run(collector, "durable", "storm", args.storm_messages)
                show(storm)
                results.append(storm)

            if "steady" in only:
                n = int(args.steady_rate * args.steady_seconds)
                pace = {"_rate": args.steady_rate}
                steady_ours = run(collector, "durable", "steady", n, pace)
                steady_peer = run(collector, "segment", "steady", n, pace)
                for r in (steady_ours, steady_peer):
                    show(r)
                ratios["steady_backlog_peer_over_ours"] = steady_peer["max_backlog"] / max(
                    1, steady_ours["max_backlog"]
                )
                results += [steady_ours, steady_peer]

            if "loopback" in only:
                collector.set_delay(0.0)
                print("loopback, no delay:")
                by_round = []
                for number in range(1, max(1, args.rounds) + 1):
                    if args.rounds > 1:
                        print(f" round {number}:")
                    lo_rows, lo_ratios = _loopback_round(collector, args.loopback_messages)
                    for r in lo_rows:
                        r["round"] = number
                        show(r)
                    results += lo_rows
                    by_round.append(lo_ratios)
                for name in by_round[0]:
                    # One round moves by a third on this shared machine: the median of
                    # alternated rounds is the figure to quote.
                    ratios[name] = statistics.median(r[name] for r in by_round)
                if args.rounds > 1:
                    for name in by_round[0]:
                        each = ", ".join(f"{r[name]:.2f}" for r in by_round)
                        print(f"  {name} by round: {each}")
            print("ratios (peer time / our time; >1 means faster):")
            for name, value in ratios.items():
                print(f"  {name}: {value:.2f}")
    if args.json:
        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "cpus": os.cpu_count(),
            "delay": args.delay,
            "command": " ".join(["python", "benchmarks/bench_delivery.py", *sys.argv[1:]]),
        }
        args.json.write_text(
            json.dumps({"meta": meta, "ratios": ratios, "results": results}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
