"""track() latency, one thread: durable-analytics beside segment-analytics-python 2.4.0.

Run:  python benchmarks/bench_latency.py [--calls 30000] [--rounds 1] [--json results.json]
                                        [--no-pin] [--measured-cpu N]

Every variant runs in its own fresh process, one after the other, against one Collector (in
a process of its own), and reports the per-call latency p50 / p99 / p99.9 / max of
``--calls`` ``track()`` calls made back to back from one thread:

- durable-analytics ``flusher="none"``, with a ``durable-analytics worker`` delivering from
  another process (the call only appends);
- durable-analytics with the flusher thread delivering, with ``flusher="process"``, and with
  ``durability="full"`` (flusher thread);
- segment-analytics-python 2.4.0's bare call (``send=False``) and its call with its consumer
  delivering;
- the floor of any queue that commits each call to a SQLite file: one raw ``sqlite3``
  ``INSERT`` in autocommit of a same-size serialized message (WAL, ``synchronous=NORMAL``),
  with no checkpoint at all, no other process and no Python of ours around it.

CPUs: on a machine with two CPUs or more, the measured process runs on one CPU
(``--measured-cpu``, by default the lowest this process may use) and the "server side" (the
Collector and the ``durable-analytics worker``) on the others, as bench_drain.py keeps its
Collector off its clients' CPU: the CPU a call is timed on is then not also the one
delivering to and parsing for a server that in production runs elsewhere. The measured
library's own threads and processes (the flusher thread, ``flusher="process"``, the peer's
consumer thread) share the measured CPU. ``--no-pin`` lets the scheduler place everything
(on two CPUs, three busy processes then take turns on two, and the tails measure that as
much as the call).

Targets (issue 10): ``flusher="none"`` p99.9 at most 2x the peer's bare call; the flusher
thread's p99.9 at most the peer delivering. The machine is shared: read ratios of one run.

On Linux each call's wait for a CPU is read from the scheduler's statistics
(``/proc/thread-self/schedstat``, outside the timed call), and the ``cpu-q`` columns give
the percentiles with that wait taken out: what the calls themselves waited for (locks, the
GIL, SQLite, I/O) and computed, apart from the time a loaded machine ran other processes.
``queued`` is the share of the slowest 0.1 % of calls' time that was such a wait. Left out
where the kernel counts those statistics in whole ticks (checked at the start).
"""

from __future__ import annotations

import argparse
import functools
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

from _shared import PROPS, WRITE_KEY, pin_or_kill, remote_collector

VARIANTS = [
    "durable none (worker delivering)",
    "durable thread",
    "durable process",
    "durable full (thread)",
    "segment bare (send=False)",
    "segment delivering",
    "raw sqlite3 append (floor)",
    # Not among the targets: a producer that never spools (a count cap turns spooling off),
    # so it shares the file with the worker, its transactions and its checkpoints.
    "durable none, no spool (max_queue_size)",
    # A control, not a target: the peer's bare call while a worker delivers a backlog to the
    # collector, the load that runs beside "durable none". Its tail beside ours tells what of
    # ours is the call and what is the machine running the worker and the collector.
    "segment bare beside a worker (control)",
]


def _percentiles(samples: list[int], waits: list[int] | None = None) -> dict[str, float]:
    """Milliseconds at p50, p99, p99.9 and max of nanosecond samples.

    With ``waits`` (each call's time waiting for a CPU, from the kernel's scheduler
    statistics), also ``cpu-q p99.9`` and ``cpu-q max``: the same calls with that wait taken
    out, i.e. what the call itself waited for (locks, the GIL, SQLite, I/O) and computed,
    without the time the shared machine gave its CPU to other processes.
    """
    ordered = sorted(samples)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] / 1e6

    out = {"p50": at(0.5), "p99": at(0.99), "p99.9": at(0.999), "max": ordered[-1] / 1e6}
    if waits is not None:
        own = sorted(max(0, s - w) for s, w in zip(samples, waits, strict=True))
        out["cpu-q p99"] = own[min(n - 1, int(0.99 * n))] / 1e6
        out["cpu-q p99.9"] = own[min(n - 1, int(0.999 * n))] / 1e6
        out["cpu-q max"] = own[-1] / 1e6
        out["cpu-q share of p99.9 calls"] = _queued_share(samples, waits)
    return out


def _queued_share(samples: list[int], waits: list[int]) -> float:
    """Of the slowest 0.1 % of calls, the share of their time spent waiting for a CPU."""
    slowest = sorted(range(len(samples)), key=samples.__getitem__)[-max(1, len(samples) // 1000) :]
    total = sum(samples[i] for i in slowest)
    return sum(min(waits[i], samples[i]) for i in slowest) / total if total else 0.0


def _run_queue_reader() -> Any:
    """A function returning this thread's total wait for a CPU in ns, or None: not Linux,
    or a kernel whose scheduler statistics count whole ticks (``_fine_grained``)."""
    try:
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    except OSError:
        return None
    if not _fine_grained(fd):
        return None
    # The second field: time spent on a run queue, waiting for a CPU (ns).
    return lambda: int(os.pread(fd, 128, 0).split()[1])


def _fine_grained(fd: int) -> bool:
    """Whether the scheduler's statistics resolve a fraction of a millisecond.

    Some kernels (the benchmark machine's, 2026-12-01) account a thread's time in whole
    ticks: 0.3 ms of computing reads as 0 or 4 ms. Subtracting such waits from 0.05 ms calls
    says nothing (it made ``queued`` read 50-95 % for every variant), so the ``cpu-q``
    columns are then left out. Judged by the first field (time on a CPU) over short spins.
    """
    off = 0
    for _ in range(10):
        before = int(os.pread(fd, 128, 0).split()[0])
        started = time.perf_counter_ns()
        while time.perf_counter_ns() - started < 300_000:
            pass
        spun = time.perf_counter_ns() - started
        counted = int(os.pread(fd, 128, 0).split()[0]) - before
        if not 0.5 * spun <= counted <= 2 * spun + 200_000:
            off += 1
    return off <= 2


def _timed_calls(track: Any, calls: int) -> tuple[list[int], list[int] | None]:
    clock = time.perf_counter_ns
    samples = [0] * calls
    queued = _run_queue_reader()
    if queued is None:
        for i in range(calls):
            started = clock()
            track("user-1", "Signed Up", PROPS)
            samples[i] = clock() - started
        return samples, None
    waits = [0] * calls
    for i in range(calls):
        before = queued()
        started = clock()
        track("user-1", "Signed Up", PROPS)
        samples[i] = clock() - started
        waits[i] = queued() - before
    return samples, waits


def _raw_append(path: Path) -> Any:
    """A track-shaped function that only serializes and commits one row: the storage floor.

    No checkpoint ever runs (the log only grows), so what its tail shows is the cost of the
    commit itself on this machine's disk and scheduler, not of keeping the file bounded.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    encode = json.JSONEncoder(separators=(",", ":")).encode

    def track(user_id: str, event: str, properties: dict[str, Any]) -> None:
        body = {"type": "track", "userId": user_id, "event": event, "properties": properties}
        conn.execute("INSERT INTO messages (body) VALUES (?)", (encode(body).encode(),))

    return track


def _layout(no_pin: bool, measured_cpu: int | None) -> tuple[set[int], set[int]] | None:
    """The measured process's CPUs and the server side's, or None: not pinned.

    None with ``--no-pin``, where the OS has no ``sched_setaffinity``, or with one CPU.
    """
    if no_pin:
        if measured_cpu is not None:
            raise SystemExit("--measured-cpu pins the measured process: drop --no-pin")
        return None
    if not hasattr(os, "sched_getaffinity"):
        if measured_cpu is not None:
            raise SystemExit("--measured-cpu: this OS has no sched_setaffinity to pin with")
        return None
    allowed = os.sched_getaffinity(0)
    if measured_cpu is None:
        if len(allowed) < 2:
            return None
        measured_cpu = min(allowed)
    if measured_cpu not in allowed:
        raise SystemExit(
            f"--measured-cpu {measured_cpu}: not one of the CPUs this process may use "
            f"{sorted(allowed)}"
        )
    if len(allowed) < 2:
        raise SystemExit(
            f"--measured-cpu {measured_cpu}: this process may use no other CPU for the "
            "Collector and the worker"
        )
    return {measured_cpu}, allowed - {measured_cpu}


def _server_cpus() -> set[int] | None:
    """The server side's CPUs in a child (from its parent's layout), or None: not pinned."""
    spec = os.environ.get("BENCH_SERVER_CPUS")
    return {int(cpu) for cpu in spec.split(",")} if spec else None


def _start_worker(path: Path) -> subprocess.Popen[bytes]:
    """A ``durable-analytics worker`` delivering from the queue file ``path``.

    On the server side's CPUs when pinned: the worker delivers, as a server would.
    """
    cli = shutil.which("durable-analytics") or str(
        Path(sys.executable).with_name("durable-analytics")
    )
    worker = subprocess.Popen(
        [cli, "worker", "--queue", str(path), "--poll", "0.05"], stderr=subprocess.DEVNULL
    )
    # Set right after exec, before the worker can start a thread (see _shared.remote_collector).
    pin_or_kill(worker, _server_cpus())
    return worker


def _worker_with_backlog(path: Path, messages: int, url: str) -> subprocess.Popen[bytes]:
    """A worker delivering ``messages`` queued before it started (the control's load).

    Twice the calls measured: the worker, at full speed on a backlog, is still delivering
    when the last timed call returns.
    """
    import durable_analytics

    producer = durable_analytics.Client(
        WRITE_KEY, host=url, queue_path=path, on_exit="none", flusher="none"
    )
    for _ in range(messages):
        producer.track("user-1", "Signed Up", PROPS)
    producer.close(timeout=0)
    worker = _start_worker(path)
    time.sleep(0.2)  # started, and delivering
    return worker


def run_variant(variant: str, calls: int, url: str) -> dict[str, float]:
    """Run one variant in this (fresh) process; its percentiles in ms."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    worker: subprocess.Popen[bytes] | None = None
    try:
        if variant.startswith("segment"):
            from segment.analytics import Client as SegmentClient

            if "beside a worker" in variant:
                worker = _worker_with_backlog(workdir / "queue.sqlite3", calls * 2, url)
            send = variant == "segment delivering"
            peer = SegmentClient(
                WRITE_KEY, host=url, send=send, max_queue_size=calls * 2, upload_interval=0.5
            )
            peer.track("warm-up", "Warm Up", PROPS)
            samples, waits = _timed_calls(peer.track, calls)
            for consumer in peer.consumers or []:
                consumer.pause()
            return _percentiles(samples, waits)

        if variant.startswith("raw sqlite3"):
            return _percentiles(*_timed_calls(_raw_append(workdir / "raw.sqlite3"), calls))

        import durable_analytics

        path = workdir / "queue.sqlite3"
        settings: dict[str, Any] = {"flusher": "thread", "durability": "normal"}
        if variant.startswith("durable none"):
            settings["flusher"] = "none"
            if "no spool" in variant:
                settings["max_queue_size"] = 10**9
        elif variant == "durable process":
            settings["flusher"] = "process"
        elif variant.startswith("durable full"):
            settings["durability"] = "full"
        client = durable_analytics.Client(
            WRITE_KEY, host=url, queue_path=path, on_exit="none", **settings
        )
        client.track("warm-up", "Warm Up", PROPS)
        if settings["flusher"] == "none":
            worker = _start_worker(path)
            time.sleep(0.5)
        samples, waits = _timed_calls(client.track, calls)
        client.close(timeout=0)
        return _percentiles(samples, waits)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _ratios(best: dict[str, dict[str, float]]) -> dict[str, float]:
    """The targets' ratios (and the floor's), of the variants that ran."""
    none, thread, _process, _full, bare, delivering, floor, _no_spool, control = VARIANTS
    pairs = {
        "none p99.9 / segment bare p99.9 (target <= 2)": (none, bare),
        # Both beside the same kind of load: a worker delivering to the collector.
        "none p99.9 / segment bare beside a worker p99.9 (control)": (none, control),
        "thread p99.9 / segment delivering p99.9 (target <= 1)": (thread, delivering),
        # How far the floor itself is from the peer's in-memory call, and we from the floor.
        "raw sqlite3 floor p99.9 / segment bare p99.9": (floor, bare),
        "none p99.9 / raw sqlite3 floor p99.9": (none, floor),
    }
    ratios = {
        name: best[ours]["p99.9"] / best[theirs]["p99.9"]
        for name, (ours, theirs) in pairs.items()
        if ours in best and theirs in best
    }
    # The same ratios without the time each call waited for a CPU (other processes).
    for name, ours, theirs in (
        ("cpu-q: none / segment bare", none, bare),
        ("cpu-q: thread / segment delivering", thread, delivering),
    ):
        if "cpu-q p99.9" in best.get(ours, {}) and "cpu-q p99.9" in best.get(theirs, {}):
            ratios[name] = best[ours]["cpu-q p99.9"] / best[theirs]["cpu-q p99.9"]
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the variants whose name contains TEXT (repeatable); the ratios of the "
        "variants run are printed",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the scheduler place the measured process, the Collector and the worker",
    )
    parser.add_argument(
        "--measured-cpu",
        type=int,
        metavar="N",
        help="the CPU the measured process runs on (default: the lowest allowed); the "
        "Collector and the worker run on the others",
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.calls, args.url)))
        return
    layout = _layout(args.no_pin, args.measured_cpu)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("BENCH_SERVER_CPUS", None)  # only this run's layout, never an inherited one
    if layout is not None:
        env["BENCH_SERVER_CPUS"] = ",".join(map(str, sorted(layout[1])))
    variants = [v for v in VARIANTS if not args.only or any(o in v for o in args.only)]
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    load_before = os.getloadavg()
    with remote_collector(layout[1] if layout else None) as url:
        for _ in range(args.rounds):
            for variant in variants:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        variant,
                        "--calls",
                        str(args.calls),
                        "--url",
                        url,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=env,
                    # The measured process starts on its CPU (the child's own threads and
                    # processes inherit it); the worker it starts moves to the server's.
                    preexec_fn=functools.partial(os.sched_setaffinity, 0, layout[0])
                    if layout
                    else None,
                )
                results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.calls:,} calls per variant, {args.rounds} round(s); milliseconds")
    print(
        "CPUs: measured on "
        + (
            f"{sorted(layout[0])}, Collector and worker on {sorted(layout[1])}"
            if layout
            else "any (not pinned)"
        )
    )
    print(
        f"{'variant':<34} {'p50':>7} {'p99':>7} {'p99.9':>7} {'max':>7}   "
        f"{'cpu-q p99.9':>11} {'cpu-q max':>9} {'queued':>6}"
    )
    best: dict[str, dict[str, float]] = {}
    for variant, rounds in results.items():
        # The round with the median p99.9, so one noisy round does not decide.
        rounds.sort(key=lambda r: r["p99.9"])
        pick = rounds[len(rounds) // 2]
        best[variant] = pick
        own = (
            f"   {pick['cpu-q p99.9']:11.3f} {pick['cpu-q max']:9.2f} "
            f"{pick['cpu-q share of p99.9 calls']:6.0%}"
            if "cpu-q p99.9" in pick
            else ""
        )
        print(
            f"{variant:<34} {pick['p50']:7.3f} {pick['p99']:7.3f} {pick['p99.9']:7.3f} "
            f"{pick['max']:7.2f}{own}"
        )
    if not any("cpu-q p99.9" in pick for pick in best.values()):
        print("(no cpu-q columns: this kernel counts its scheduler statistics in whole ticks)")
    ratios = _ratios(best)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "calls": args.calls,
                    "rounds": args.rounds,
                    "python": platform.python_version(),
                    "sqlite": sqlite3.sqlite_version,
                    # Which CPUs the measured process and the server side ran on.
                    "cpus": (
                        {"measured": sorted(layout[0]), "server side": sorted(layout[1])}
                        if layout
                        else "not pinned"
                    ),
                    # 1, 5 and 15-minute load averages before and after: how busy the
                    # shared machine was (2 cores), which the tails measure too.
                    "load_average": {"before": load_before, "after": os.getloadavg()},
                    "results": results,
                    "ratios": ratios,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
