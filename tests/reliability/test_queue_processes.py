"""The queue under real processes: producers and consumers at once, SIGKILL, SIGSTOP, exit.

Every child is a fresh interpreter (``start_python``); the parent checks the file afterwards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from conftest import WRITE_KEY, run_python, start_python

from durable_analytics._store.sqlite import SqliteQueue as Queue

HOST = "https://api.example.test"


def stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.kill()
    return proc.communicate()


def integrity(path: Path) -> str:
    conn = sqlite3.connect(str(path))
    try:
        return "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check").fetchall())
    finally:
        conn.close()


def stored_properties(path: Path) -> list[dict[str, int]]:
    """The properties of every message stored, after a mover took in what the producers'
    journals and spools hold (as a worker would: a killed producer's are adopted)."""
    mover = Queue(path)
    try:
        mover.move_spools(scan_now=True)
    finally:
        mover.close()
    conn = sqlite3.connect(str(path))
    try:
        rows = conn.execute("SELECT body FROM messages ORDER BY id").fetchall()
    finally:
        conn.close()
    return [json.loads(r[0])["properties"] for r in rows]


# --------------------------------------------------------------------------- producers/consumers

PRODUCER = """
import json, sys
from durable_analytics._store.sqlite import SqliteQueue as Queue
path, p, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
q = Queue(path)
dest = q.destination("https://api.example.test", "key-%d" % (p % 2))
errors = 0
for i in range(n):
    body = json.dumps({"type": "track", "properties": {"p": p, "i": i}}).encode()
    try:
        if not q.append(dest, body):
            errors += 1
            print("dropped", p, i, flush=True)
    except Exception as exc:
        errors += 1
        print("error", type(exc).__name__, exc, flush=True)
print("errors", errors, flush=True)
"""

CONSUMER = """
import json, os, sys, time
from durable_analytics._store.sqlite import SqliteQueue as Queue
path, out, done = sys.argv[1], sys.argv[2], sys.argv[3]
q = Queue(path)
errors = 0
with open(out, "w") as f:
    while True:
        try:
            lease = q.lease(20, 500_000)
        except Exception as exc:
            errors += 1
            print("error", type(exc).__name__, exc, flush=True)
            continue
        if lease is None:
            if os.path.exists(done) and q.pending() == 0:
                break
            time.sleep(0.002)
            continue
        acked = q.ack(lease)
        if acked != len(lease):
            print("error ack", acked, len(lease), flush=True)
            errors += 1
        for b in lease.bodies:
            m = json.loads(b)["properties"]
            f.write("%d %d %s\\n" % (m["p"], m["i"], lease.destination.write_key))
        f.flush()
print("errors", errors, flush=True)
"""


def test_four_producers_two_consumers_consume_every_message_exactly_once(
    queue_path: Path, tmp_path: Path
) -> None:
    per_producer = 5000
    Queue(queue_path).close()  # created up front so every child opens an existing file
    done = tmp_path / "producers-done"
    outs = [tmp_path / f"consumed-{c}.txt" for c in range(2)]
    consumers = [start_python(CONSUMER, str(queue_path), str(o), str(done)) for o in outs]
    producers = [
        start_python(PRODUCER, str(queue_path), str(p), str(per_producer)) for p in range(4)
    ]
    try:
        for proc in producers:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert out.splitlines()[-1] == "errors 0", out
            assert "locked" not in out + err
        done.touch()
        for proc in consumers:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert out.splitlines()[-1] == "errors 0", out
            assert "locked" not in out + err
    finally:
        for proc in consumers + producers:
            stop(proc)

    consumed: Counter[tuple[int, int]] = Counter()
    for o in outs:
        for line in o.read_text().splitlines():
            p, i, key = line.split()
            assert key == f"key-{int(p) % 2}"  # batches never mixed the two destinations
            consumed[(int(p), int(i))] += 1
    expected = {(p, i) for p in range(4) for i in range(per_producer)}
    assert set(consumed) == expected  # none lost
    assert max(consumed.values()) == 1  # none consumed twice
    assert all(len(o.read_text()) > 0 for o in outs)  # both consumers took part
    q = Queue(queue_path)
    assert q.pending() == 0
    assert q.live_leases() == 0
    q.close()
    assert integrity(queue_path) == "ok"


# --------------------------------------------------------------------------- dead holders

HOLDER = """
import sys, time
from durable_analytics._store.sqlite import SqliteQueue as Queue
q = Queue(sys.argv[1], lease_timeout=float(sys.argv[2]))
lease = q.lease(int(sys.argv[3]), 10_000_000)
print("leased", " ".join(map(str, lease.ids)), flush=True)
print("expires", lease.expires_monotonic, flush=True)
time.sleep(120)
"""


def start_holder(
    path: Path, lease_timeout: float, n: int
) -> tuple[subprocess.Popen[str], list[int], float]:
    proc = start_python(HOLDER, str(path), str(lease_timeout), str(n))
    assert proc.stdout is not None
    leased = proc.stdout.readline().split()
    expires = proc.stdout.readline().split()
    if not leased or leased[0] != "leased" or not expires:
        _, err = stop(proc)
        raise AssertionError(f"the holder did not lease: {leased} {err}")
    return proc, [int(x) for x in leased[1:]], float(expires[1])


def test_consumer_killed_while_holding_a_lease_its_messages_come_back_at_once(
    queue_path: Path,
) -> None:
    q = Queue(queue_path, lease_timeout=60)
    dest = q.destination(HOST, WRITE_KEY)
    ids = [q.append(dest, json.dumps({"properties": {"i": i}}).encode()) for i in range(100)]
    proc, held, _ = start_holder(queue_path, 60, 40)
    try:
        assert held == ids[:40]
        rest = q.lease(1000, 10_000_000)
        assert rest is not None
        assert list(rest.ids) == ids[40:]
        assert q.lease(1000, 10_000_000) is None  # the live holder keeps its 40
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        back = q.lease(1000, 10_000_000)  # at once, not after the 60 s lease_timeout
        assert back is not None
        assert list(back.ids) == held
        assert q.ack(back) == 40
        assert q.ack(rest) == 60
        assert q.pending() == 0  # nothing lost, nothing left over
    finally:
        stop(proc)
        q.close()
    assert integrity(queue_path) == "ok"


def test_stuck_holder_messages_come_back_after_lease_timeout_not_before(
    queue_path: Path,
) -> None:
    q = Queue(queue_path, lease_timeout=60)
    dest = q.destination(HOST, WRITE_KEY)
    ids = [q.append(dest, json.dumps({"properties": {"i": i}}).encode()) for i in range(20)]
    proc, held, expires = start_holder(queue_path, 0.5, 20)
    try:
        proc.send_signal(signal.SIGSTOP)  # alive but stuck: its pid still exists
        assert held == ids
        checks_before = 0
        while True:
            polled_at = time.monotonic()
            back = q.lease(1000, 10_000_000)
            returned_at = time.monotonic()
            if back is not None:
                break
            if polled_at < expires:
                checks_before += 1
            assert polled_at < expires + 5, "the stuck holder's lease never expired"
            time.sleep(0.02)
        # Came back only once the holder's lease_timeout had passed (one monotonic clock;
        # the lease looks at the clock between polled_at and returned_at).
        assert returned_at >= expires
        assert checks_before > 0
        assert list(back.ids) == ids
        assert q.ack(back) == 20
        assert q.pending() == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        stop(proc)
        q.close()
    assert integrity(queue_path) == "ok"


# --------------------------------------------------------------------------- crash tests

TRACKER = """
import os, sys
from durable_analytics import Client
path, key, run = sys.argv[1], sys.argv[2], int(sys.argv[3])
limit = int(sys.argv[4]) if len(sys.argv) > 4 else None
client = Client(key, queue_path=path, flusher="none", on_exit="none")
out = sys.stdout
print("ready", flush=True)
i = 0
while limit is None or i < limit:
    client.track(f"user-{run}", "Crash Test", {"i": i, "run": run})
    out.write(f"{i}\\n")  # only once track() has returned
    out.flush()
    i += 1
if limit is not None:
    os._exit(0)
"""


def test_track_calls_that_returned_survive_sigkill_at_a_random_moment_20_times(
    queue_path: Path,
) -> None:
    rng = random.Random(20240601)
    total_returned = 0
    for run in range(20):
        proc = start_python(TRACKER, str(queue_path), WRITE_KEY, str(run))
        assert proc.stdout is not None
        stdout = proc.stdout
        chunks: list[str] = []
        # Drain stdout while the child runs, so it never blocks on a full pipe: the kill
        # must land at a random point of the call, not always in the print.
        reader = threading.Thread(target=lambda out=stdout, acc=chunks: acc.append(out.read()))
        try:
            first = stdout.readline()
            assert first == "ready\n", first + (stop(proc)[1] or "")
            reader.start()
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            reader.join(timeout=30)
        finally:
            _, err = stop(proc)
        assert proc.returncode == -signal.SIGKILL, err
        lines = "".join(chunks).split("\n")
        returned = [int(x) for x in lines[:-1]]  # the last piece may be cut short
        assert returned == list(range(len(returned)))
        stored = {p["i"] for p in stored_properties(queue_path) if p["run"] == run}
        missing = set(returned) - stored
        assert not missing, f"run {run}: {len(missing)} returned calls not stored"
        # At most the one call in flight when the kill came may be stored unreported.
        assert len(stored) - len(returned) in (0, 1)
        assert integrity(queue_path) == "ok", f"run {run}"
        total_returned += len(returned)
    assert total_returned > 0


def test_os_exit_right_after_5000_calls_leaves_5000_queued(queue_path: Path) -> None:
    result = run_python(TRACKER, str(queue_path), WRITE_KEY, "7", "5000")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "4999"
    props = stored_properties(queue_path)
    assert len(props) == 5000
    assert sorted(p["i"] for p in props) == list(range(5000))
    assert {p["run"] for p in props} == {7}
    assert integrity(queue_path) == "ok"


# --------------------------------------------------------------------------- opening at once

OPENER = """
import sys, time
from durable_analytics._store.sqlite import SqliteQueue as Queue
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
q = Queue(sys.argv[1])
body = b'{"properties": {"i": %s}}' % sys.argv[3].encode()
q.append(q.destination("https://api.example.test", "k"), body)
print("ok", flush=True)
"""


def test_processes_creating_the_same_new_queue_at_once_all_succeed(queue_path: Path) -> None:
    start = time.time() + 1.0
    procs = [start_python(OPENER, str(queue_path), str(start), str(i)) for i in range(6)]
    results = [p.communicate(timeout=60) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == "ok"
    assert sorted(p["i"] for p in stored_properties(queue_path)) == list(range(6))
    conn = sqlite3.connect(str(queue_path))
    assert conn.execute("SELECT count(*) FROM destinations").fetchone()[0] == 1
    conn.close()
    assert integrity(queue_path) == "ok"
    assert not os.path.islink(queue_path)
