"""Lease holders across processes: killed holders, clock jumps, other boots.

Each test's name states the behaviour it proves. Child processes are real (``start_python``,
``os.fork``); the heavier multi-process runs live in tests/reliability/.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import freezegun
import freezegun.api
import pytest
from conftest import start_python

from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite import holders

from .sqlite_helpers import (
    HOST,
    KEY,
    body,
    fill,
)

# --------------------------------------------------------------------------- lease holders

HOLDER = """
import sys, time
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite import holders
q = Queue(sys.argv[1], lease_timeout=float(sys.argv[2]))
lease = q.lease(1000, 10_000_000)
print("leased", len(lease), lease.expires_monotonic, flush=True)
time.sleep(120)
"""


def start_holder(path: Path, lease_timeout: float) -> tuple[subprocess.Popen[str], float]:
    """A live child process holding a lease on every message; returns it and its expiry."""
    proc = start_python(HOLDER, str(path), str(lease_timeout))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("leased"):
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the holder did not lease: {line!r} {err}")
    _, _, expires = line.split()
    return proc, float(expires)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_lease_of_a_killed_holder_is_reclaimed_at_once(queue_path: Path) -> None:
    q = Queue(queue_path, lease_timeout=60)
    dest_id = q.destination(HOST, KEY)
    ids = fill(q, dest_id, 10)
    proc, _ = start_holder(queue_path, 60)
    try:
        assert q.lease(100, 10_000_000) is None
        assert q.stats().leased == 10
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lease = q.lease(100, 10_000_000)  # no waiting out the 60 s lease_timeout
        assert lease is not None
        assert list(lease.ids) == ids
    finally:
        stop(proc)
        q.close()


def test_reclaim_expired_frees_a_killed_holders_lease(queue_path: Path) -> None:
    q = Queue(queue_path, lease_timeout=60)
    fill(q, q.destination(HOST, KEY), 3)
    proc, _ = start_holder(queue_path, 60)
    try:
        assert q.reclaim_expired() == 0
        proc.kill()
        proc.wait()
        assert q.reclaim_expired() == 1
        assert q.stats().leased == 0
        assert q.ready_summary(10)[0] == 3
    finally:
        stop(proc)
        q.close()


def test_lease_of_a_live_holder_is_not_reclaimed_before_expiry(queue_path: Path) -> None:
    q = Queue(queue_path, lease_timeout=0.01)  # the reader's own timeout does not matter
    fill(q, q.destination(HOST, KEY), 5)
    proc, _ = start_holder(queue_path, 60)
    try:
        time.sleep(0.1)
        assert q.lease(100, 10_000_000) is None
        assert q.reclaim_expired() == 0
        assert q.stats().leased == 5
    finally:
        stop(proc)
        q.close()


def test_wall_clock_jump_forward_does_not_expire_a_live_holders_lease(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = Queue(queue_path)
    fill(q, q.destination(HOST, KEY), 5)
    proc, _ = start_holder(queue_path, 30)
    try:
        real_time = time.time
        # Only the wall clock jumps (freezegun would move time.monotonic too).
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
        assert q.lease(100, 10_000_000) is None
        assert q.reclaim_expired() == 0
        assert q.stats().leased == 5
        monkeypatch.setattr(time, "time", lambda: real_time() + 86400 * 365)
        assert q.lease(100, 10_000_000) is None
    finally:
        monkeypatch.undo()
        stop(proc)
        q.close()


def test_wall_clock_jump_back_does_not_keep_an_expired_lease_alive(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = Queue(queue_path)
    fill(q, q.destination(HOST, KEY), 5)
    proc, expires = start_holder(queue_path, 0.3)
    try:
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
        time.sleep(max(0.0, expires - time.monotonic()) + 0.05)
        lease = q.lease(100, 10_000_000)  # the holder is alive, but its lease ran out
        assert lease is not None
        assert len(lease) == 5
    finally:
        monkeypatch.undo()
        stop(proc)
        q.close()


def test_wall_clock_jump_under_freezegun_tick_does_not_steal_a_live_lease(
    queue_path: Path,
) -> None:
    q = Queue(queue_path)
    fill(q, q.destination(HOST, KEY), 2)
    proc, _ = start_holder(queue_path, 30)
    try:
        with freezegun.freeze_time("2099-01-01", tick=True):
            # freezegun fakes time.monotonic too (as wall-clock seconds), which no real clock
            # does; give the monotonic clock back (freezegun restores it on exit).
            time.monotonic = freezegun.api.real_monotonic
            assert time.time() > 4e9
            assert q.lease(100, 10_000_000) is None
            assert q.stats().leased == 2
    finally:
        stop(proc)
        q.close()


def test_lease_without_boot_id_expires_by_wall_clock_ignoring_implausible_expiries(
    queue: Queue, dest: int, queue_path: Path
) -> None:
    """A lease from a system without /proc boot ids: only the wall clock can expire it."""
    fill(queue, dest, 2)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    conn = sqlite3.connect(str(queue_path), isolation_level=None)
    now = time.time()
    conn.execute(
        "UPDATE leases SET boot = '', wall_expires = ? WHERE token = ?", (now + 30, lease.token)
    )
    assert queue.lease(10, 1_000_000) is None  # not expired yet
    assert queue.lease(10, 1_000_000, now=now + 31) is not None  # expired by the wall clock
    lease2 = queue.lease(10, 1_000_000, now=now + 31)
    assert lease2 is None
    queue.append(dest, body(5))
    fresh = queue.lease(10, 1_000_000)
    assert fresh is not None
    conn.execute(
        "UPDATE leases SET boot = '', wall_expires = ? WHERE token = ?",
        (now + 100 * 3600, fresh.token),
    )
    conn.close()
    # An expiry 100 h ahead with a 60 s lease_timeout: the wall clock jumped back.
    assert queue.lease(10, 1_000_000) is not None


def test_lease_of_another_boot_is_reclaimed_at_once(
    queue: Queue, dest: int, queue_path: Path
) -> None:
    fill(queue, dest, 2)
    lease = queue.lease(10, 1_000_000)
    assert lease is not None
    conn = sqlite3.connect(str(queue_path), isolation_level=None)
    conn.execute("UPDATE leases SET boot = 'another-boot' WHERE token = ?", (lease.token,))
    conn.close()
    again = queue.lease(10, 1_000_000)
    assert again is not None
    assert again.ids == lease.ids


# --------------------------------------------------------------------------- probe counts

MANY_HOLDER = """
import sys, time
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite import holders
q = Queue(sys.argv[1], lease_timeout=60)
leases = [q.lease(2, 10_000_000) for _ in range(int(sys.argv[2]))]
print("leased", sum(len(x) for x in leases if x), flush=True)
time.sleep(120)
"""


def _count_probes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the pid of every ``/proc/<pid>/stat`` read the lease scan makes."""
    probed: list[int] = []
    real = holders._process_start

    def counting(pid: int) -> int | None:
        probed.append(pid)
        return real(pid)

    monkeypatch.setattr(holders, "_process_start", counting)
    return probed


def test_a_lease_never_probes_proc_for_this_processs_own_leases(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With many batches of this process in flight, each new lease reads no ``/proc`` file:
    this process is alive while it asks (counted, not timed)."""
    q = Queue(queue_path, lease_timeout=60)
    dest_id = q.destination(HOST, KEY)
    fill(q, dest_id, 100)
    holders.holder()  # this process's identity, read once before counting
    probed = _count_probes(monkeypatch)
    held = [q.lease(2, 10_000_000) for _ in range(32)]
    assert all(lease is not None for lease in held)
    assert q.reclaim_expired() == 0
    assert probed == []
    assert q.stats().leased == 64
    q.close()


def test_another_processs_many_leases_cost_one_probe_per_scan_and_are_reclaimed_once_killed(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 10 leases of one other live process are probed once per lease (one /proc read for
    its pid, not ten) and respected; once it is SIGKILLed, the very next lease reclaims all
    ten (no answer is trusted from an earlier scan) while this process's own lease stays."""
    q = Queue(queue_path, lease_timeout=60)
    dest_id = q.destination(HOST, KEY)
    ids = fill(q, dest_id, 30)
    proc = start_python(MANY_HOLDER, str(queue_path), "10")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == ["leased", "20"]
        mine = q.lease(5, 10_000_000)
        assert mine is not None
        assert list(mine.ids) == ids[20:25]
        probed = _count_probes(monkeypatch)
        second = q.lease(5, 10_000_000)
        assert second is not None
        assert list(second.ids) == ids[25:30]
        assert probed == [proc.pid]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        probed.clear()
        reclaimed = q.lease(100, 10_000_000)
        assert reclaimed is not None
        assert list(reclaimed.ids) == ids[:20]  # all ten of the killed holder's leases
        assert probed == [proc.pid]
        assert q.ack(mine) == 5  # ours was never taken
    finally:
        stop(proc)
        q.close()
