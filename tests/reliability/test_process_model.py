"""The process-model row of the fault matrix: how real deployments start, fork and stop.

gunicorn-style preload and fork, the three ``multiprocessing`` start methods, SIGTERM with
threads mid-call, two workers and a drain on one queue while producers append, and
wall-clock jumps of an hour while leases are held. Every producer goes through the oracle's
call log; every test ends with its report (printed: run with ``-s``) and integrity_check.

Long versions: ``pytest -m soak -s tests/reliability/test_process_model.py``.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import WRITE_KEY, run_python, start_python

from durable_analytics._config import DEFAULT_MAX_IN_FLIGHT
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics.testing import Collector, Reply

from .oracle import (
    CHILD_PRELUDE,
    Report,
    check,
    drain,
    produce,
    queued_message_ids,
    read_calls,
    wait_answered,
    wait_until,
)
from .test_cli_processes import run_cli, start_cli

FLUSH_AT = 20
#: A process cut off with batches in flight resends at most those: the window's worth.
IN_FLIGHT = DEFAULT_MAX_IN_FLIGHT * FLUSH_AT


def finish(
    proc: subprocess.Popen[str], timeout: float = 60.0, stdin: str | None = None
) -> tuple[str, str]:
    """Give a child ``stdin`` (then EOF) and wait for it, killing it if it outlives
    ``timeout``; its stdout and stderr."""
    try:
        return proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"child still running after {timeout}s: {err[-2000:]}") from None


def logs_dir(tmp_path: Path) -> Path:
    logs = tmp_path / "calls"
    logs.mkdir()
    return logs


# --------------------------------------------------------------------------- gunicorn preload

# app.py as gunicorn --preload imports it in the master: the Client is built at import. The
# master then forks 3 workers (2 threads each, like a gthread worker) that track and exit
# the way a gunicorn worker does, through sys.exit (so on_exit="flush" runs).
PRELOAD = (
    CHILD_PRELUDE
    + """
import json, os, sys
from durable_analytics import Client
from reliability.oracle import produce
queue_path, host, key, logs = sys.argv[1:5]
master_calls, per_thread = int(sys.argv[5]), int(sys.argv[6])
client = Client(key, host=host, queue_path=queue_path, flush_interval=0.05, shutdown_timeout=20)
if master_calls:
    produce(queue_path, host, key, f"{logs}/master.calls", "master", master_calls, 2,
            client=client)
pids = []
for w in range(3):
    pid = os.fork()
    if pid == 0:
        produce(queue_path, host, key, f"{logs}/w{w}.calls", f"w{w}", per_thread, 2,
                client=client)
        sys.exit(0)
    pids.append(pid)
print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]))
"""
)


def run_preload(
    collector: Collector, queue_path: Path, tmp_path: Path, master_calls: int, per_thread: int
) -> None:
    logs = logs_dir(tmp_path)
    started = time.monotonic()
    result = run_python(
        PRELOAD,
        str(queue_path),
        collector.url,
        WRITE_KEY,
        str(logs),
        str(master_calls),
        str(per_thread),
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == [0, 0, 0]
    assert wait_answered(collector)
    # No drain: the workers' own exits (and the master's) delivered everything.
    report = check([logs], collector, queue_path=queue_path)
    label = "with" if master_calls else "without"
    report.show(
        f"process: gunicorn preload, master {label} calls before fork",
        workers=3,
        threads=2,
        t=elapsed,
    )
    report.assert_sound()
    assert report.sent == 2 * master_calls + 3 * 2 * per_thread
    assert report.pending == 0
    assert report.resent == 0  # nothing killed: nothing sent twice, whatever the answer
    assert "Traceback" not in result.stderr


def test_gunicorn_preload_master_makes_no_call_then_forks_3_workers(
    collector: Collector, queue_path: Path, tmp_path: Path
) -> None:
    run_preload(collector, queue_path, tmp_path, 0, 300)


def test_gunicorn_preload_master_tracks_before_forking_3_workers(
    collector: Collector, queue_path: Path, tmp_path: Path
) -> None:
    run_preload(collector, queue_path, tmp_path, 100, 300)


@pytest.mark.soak
@pytest.mark.parametrize("master_calls", [0, 2000], ids=["no-master-calls", "master-calls"])
def test_soak_gunicorn_preload_fork(
    collector: Collector, queue_path: Path, tmp_path: Path, master_calls: int
) -> None:
    run_preload(collector, queue_path, tmp_path, master_calls, 5000)


# --------------------------------------------------------------------------- multiprocessing

# A Client per child, one queue file. The children's target is the oracle's produce(),
# importable by reference as spawn and forkserver need.
MULTIPROCESSING = (
    CHILD_PRELUDE
    + """
import json, multiprocessing, sys
from reliability.oracle import produce

def main():
    method, queue_path, host, key, logs, per_thread = sys.argv[1:7]
    ctx = multiprocessing.get_context(method)
    settings = {"flush_interval": 0.05, "shutdown_timeout": 20}
    procs = [
        ctx.Process(
            target=produce,
            args=(queue_path, host, key, f"{logs}/{method}{k}.calls", f"{method}{k}",
                  int(per_thread), 2),
            kwargs={"settings": settings},
        )
        for k in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    print(json.dumps([p.exitcode for p in procs]))

if __name__ == "__main__":
    main()
"""
)


def run_multiprocessing(
    collector: Collector, queue_path: Path, tmp_path: Path, method: str, per_thread: int
) -> None:
    logs = logs_dir(tmp_path)
    Queue(queue_path).close()
    started = time.monotonic()
    result = run_python(
        MULTIPROCESSING,
        method,
        str(queue_path),
        collector.url,
        WRITE_KEY,
        str(logs),
        str(per_thread),
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == [0, 0, 0]
    assert wait_answered(collector)
    calls = read_calls([logs])
    on_disk = queued_message_ids(queue_path)
    before = len(set(collector.message_ids()) & calls.ok)
    assert calls.ok <= set(collector.message_ids()) | set(on_disk)  # all returned: kept
    drain(queue_path)
    assert wait_answered(collector)
    report = check([logs], collector, queue_path=queue_path)
    report.show(
        f"process: multiprocessing {method}",
        children=3,
        threads=2,
        delivered_by_the_children=before,
        left_on_disk_for_the_drain=len(on_disk),
        t=elapsed,
    )
    report.assert_sound()
    assert report.sent == 3 * 2 * per_thread
    assert report.pending == 0
    if method == "spawn":
        # A spawn child ends through sys.exit: on_exit="flush" delivered everything.
        assert before == report.sent
        assert report.resent == 0
    else:
        # fork and forkserver children end through os._exit: no atexit, so on_exit does not
        # run and the flusher thread is cut off, perhaps with a batch in flight. What the
        # calls returned is on disk; the drain delivered it, at most the batches in flight
        # again each.
        assert report.extra_copies <= IN_FLIGHT * 3
        assert report.resent is not None
        assert report.resent <= IN_FLIGHT * 3


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_start_methods_with_a_client_per_child(
    collector: Collector, queue_path: Path, tmp_path: Path, method: str
) -> None:
    run_multiprocessing(collector, queue_path, tmp_path, method, 300)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_multiprocessing_child_exit_runs_on_exit_flush(
    collector: Collector, queue_path: Path, tmp_path: Path, method: str
) -> None:
    """As a spawn child does: what a child tracked is delivered when its target returns."""
    logs = logs_dir(tmp_path)
    result = run_python(
        MULTIPROCESSING, method, str(queue_path), collector.url, WRITE_KEY, str(logs), "100"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert wait_answered(collector)
    report = check([logs], collector, queue_path=queue_path)
    report.show(f"process: multiprocessing {method}, on_exit at the child's exit")
    assert report.pending == 0, f"{report.pending} left on disk when the children exited"


@pytest.mark.soak
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_soak_multiprocessing_start_methods(
    collector: Collector, queue_path: Path, tmp_path: Path, method: str
) -> None:
    run_multiprocessing(collector, queue_path, tmp_path, method, 5000)


# --------------------------------------------------------------------------- SIGTERM

# 4 threads tracking without end; the flusher thread delivering. "handled": the app turns
# SIGTERM into a normal exit (what gunicorn, uvicorn and most servers do).
TERMINATED = (
    CHILD_PRELUDE
    + """
import signal, sys, threading
from reliability.oracle import produce
queue_path, host, key, log, prefix, mode = sys.argv[1:7]
stop = None
if mode == "handled":
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
produce(queue_path, host, key, log, prefix, None, 4, stop=stop,
        ready=lambda: print("ready", flush=True),
        settings={"flush_interval": 0.05, "shutdown_timeout": 10})
sys.exit(0)
"""
)


def sigterm_cycles(
    collector: Collector, queue_path: Path, tmp_path: Path, mode: str, cycles: int, seed: int
) -> None:
    rng = random.Random(seed)
    logs = logs_dir(tmp_path)
    exit_times: list[float] = []
    kept_on_disk = 0
    delivered_before = 0
    for c in range(cycles):
        log = logs / f"term{c}.calls"
        proc = start_python(
            TERMINATED, str(queue_path), collector.url, WRITE_KEY, str(log), f"t{c}", mode
        )
        assert proc.stdout is not None
        if proc.stdout.readline() != "ready\n":
            proc.kill()
            raise AssertionError(f"the producer did not start: {finish(proc)[1][-2000:]}")
        time.sleep(rng.uniform(0.02, 0.2))  # the random moment of the signal
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, err = finish(proc)
        exit_times.append(time.monotonic() - signalled)
        assert wait_answered(collector)
        calls = read_calls([log])
        received = set(collector.message_ids())
        on_disk = set(queued_message_ids(queue_path))
        # Whatever returned before the signal is on disk or delivered.
        assert calls.ok <= received | on_disk, len(calls.ok - received - on_disk)
        kept_on_disk += len(calls.ok & on_disk)
        delivered_before += len(calls.ok & received)
        if mode == "default":
            # The default action kills Python at once: no atexit, no on_exit.
            assert proc.returncode == -signal.SIGTERM, err[-2000:]
        else:
            assert proc.returncode == 0, err[-2000:]
            assert "Traceback" not in err
            assert calls.maybe == frozenset()  # every call in flight finished
            assert not on_disk  # on_exit="flush" delivered everything at exit
        drain(queue_path)
        assert wait_answered(collector)
    report = check([logs], collector, queue_path=queue_path)
    report.show(
        f"process: SIGTERM ({mode} handler), 4 threads mid-call",
        cycles=cycles,
        delivered_before_exit=delivered_before,
        left_on_disk_for_the_drain=kept_on_disk,
        max_exit_s=max(exit_times),
    )
    report.assert_sound()
    assert report.pending == 0
    if mode == "default":
        assert report.maybe <= 4 * cycles
        assert report.extra_copies <= IN_FLIGHT * cycles  # the flusher's batches in flight
    else:
        assert report.resent == 0
        assert max(exit_times) < 10 + 1


@pytest.mark.parametrize("mode", ["default", "handled"])
def test_sigterm_with_4_threads_mid_call(
    collector: Collector, queue_path: Path, tmp_path: Path, mode: str
) -> None:
    sigterm_cycles(collector, queue_path, tmp_path, mode, 3, seed=len(mode))


@pytest.mark.soak
@pytest.mark.parametrize("mode", ["default", "handled"])
def test_soak_sigterm_with_4_threads_mid_call(
    collector: Collector, queue_path: Path, tmp_path: Path, mode: str
) -> None:
    sigterm_cycles(collector, queue_path, tmp_path, mode, 40, seed=10 + len(mode))


# --------------------------------------------------------------------------- workers + drain

APPENDER = (
    CHILD_PRELUDE
    + """
import sys
from reliability.oracle import produce
queue_path, host, key, log, prefix, per_thread = sys.argv[1:7]
produce(queue_path, host, key, log, prefix, int(per_thread), 4,
        settings={"flusher": "none", "on_exit": "none"})
"""
)


def workers_and_drain(
    collector: Collector, queue_path: Path, tmp_path: Path, producers: int, per_thread: int
) -> None:
    """2 ``durable-analytics worker`` + drains on one queue while producers append."""
    logs = logs_dir(tmp_path)
    Queue(queue_path).close()
    # 10 ms a request: delivery is slower than the producers, so the drains find a backlog
    # and share it with the workers.
    collector.set_default(Reply(delay=0.01))
    worker_args = ["--queue", str(queue_path), "--poll", "0.02", "--flush-interval", "0.05"]
    workers = [start_cli("worker", *worker_args) for _ in range(2)]
    started = time.monotonic()
    try:
        appenders = [
            start_python(
                APPENDER,
                str(queue_path),
                collector.url,
                WRITE_KEY,
                str(logs / f"a{p}.calls"),
                f"a{p}",
                str(per_thread),
            )
            for p in range(producers)
        ]
        # A drain while the producers append and the workers deliver.
        assert wait_until(lambda: len(collector.message_ids()) >= 100, 30)
        mid = run_cli("drain", "--queue", str(queue_path), timeout=120)
        assert mid.returncode == 0, mid.stderr
        for proc in appenders:
            _, err = finish(proc, 120)
            assert proc.returncode == 0, err[-2000:]
        last = run_cli("drain", "--queue", str(queue_path), timeout=120)
        assert last.returncode == 0, last.stderr
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            _, err = finish(worker, 30)
            assert worker.returncode == 0, err[-2000:]
            assert "Traceback" not in err
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    elapsed = time.monotonic() - started
    assert wait_answered(collector)
    report = check([logs], collector, queue_path=queue_path)
    report.show(
        "process: 2 workers + drains while producers append",
        producers=producers,
        threads=4,
        mid_drain=mid.stdout.strip(),
        last_drain=last.stdout.strip(),
        t=elapsed,
    )
    report.assert_sound()
    assert report.sent == producers * 4 * per_thread
    assert report.pending == 0
    # Nothing was killed: no message was in two requests, whatever their answers.
    assert report.resent == 0
    assert report.duplicated == 0


def test_two_workers_and_a_drain_while_producers_append(
    collector: Collector, queue_path: Path, tmp_path: Path
) -> None:
    workers_and_drain(collector, queue_path, tmp_path, 2, 500)


@pytest.mark.soak
def test_soak_two_workers_and_a_drain_while_producers_append(
    collector: Collector, queue_path: Path, tmp_path: Path
) -> None:
    workers_and_drain(collector, queue_path, tmp_path, 4, 10_000)


# --------------------------------------------------------------------------- wall-clock jumps

# Replaces time.time in this process by the real clock plus an offset, from the start (the
# jump happened before) or from a given moment. The monotonic clock is left alone, as a real
# jump leaves it.
CLOCK = """
import time
_real_time = time.time
_offset = [0.0]
time.time = lambda: _real_time() + _offset[0]
def jump(seconds):
    _offset[0] = seconds
"""

# Leases a batch, its clock jumps (before or after the lease), then holds it until told to
# deliver it ("deliver" on stdin) or is killed.
HOLDER = (
    CHILD_PRELUDE
    + CLOCK
    + """
import json, sys
from durable_analytics._delivery import Deliverer
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._transport import HTTPTransport
path, lease_timeout, jump_s, when = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
queue = Queue(path, lease_timeout=lease_timeout)
if when == "before":
    jump(jump_s)
lease = queue.lease(20, 10_000_000)
if when == "after":
    jump(jump_s)
print(" ".join(json.loads(b)["messageId"] for b in lease.bodies), flush=True)
print(lease.expires_monotonic, flush=True)
if sys.stdin.readline().strip() == "deliver":
    stats = Deliverer(queue, HTTPTransport(timeout=5.0)).deliver(lease)
    print("sent", stats.sent, flush=True)
"""
)

# A flusher whose wall clock is off by an hour, running until stdin closes.
JUMPED_FLUSHER = (
    CHILD_PRELUDE
    + CLOCK
    + """
import sys, threading
from durable_analytics._delivery import Deliverer
from durable_analytics._flusher import Flusher
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._transport import HTTPTransport
path, jump_s, flush_interval = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
jump(jump_s)
queue = Queue(path)
flusher = Flusher(Deliverer(queue, HTTPTransport(timeout=5.0)), flush_interval=flush_interval,
                  poll_interval=0.02)
flusher.start()
print("ready", flush=True)
sys.stdin.read()
flusher.stop(5)
print("sent", flusher.delivered.sent, flush=True)
"""
)


def start_holder(
    queue_path: Path, lease_timeout: float, jump_s: float, when: str
) -> tuple[subprocess.Popen[str], list[str], float]:
    """A HOLDER child: its leased messageIds and the lease's monotonic expiry."""
    proc = start_python(
        HOLDER, str(queue_path), str(lease_timeout), str(jump_s), when, stdin=subprocess.PIPE
    )
    assert proc.stdout is not None
    ids = proc.stdout.readline().split()
    if len(ids) != FLUSH_AT:
        proc.kill()
        raise AssertionError(f"the holder did not lease: {finish(proc)[1][-2000:]}")
    return proc, ids, float(proc.stdout.readline())


def clock_jump_round(
    collector: Collector, queue_path: Path, logs: Path, holder_jump: int, flusher_jump: int
) -> tuple[Report, float, float]:
    """A live lease is not stolen, a dead holder's is taken over at once, a stuck one's after
    its lease_timeout on the monotonic clock: whichever side's wall clock jumped.

    Returns the report, how long the dead holder's batch took to be taken over, and how
    long after its expiry the stuck holder's batch was sent.
    """
    client = produce(
        str(queue_path),
        collector.url,
        WRITE_KEY,
        str(logs / "fill.calls"),
        "m",
        35,
        4,
        settings={"flusher": "none", "on_exit": "none"},
    )
    client.queue.close()
    # Three holders lease the first 60, their clocks jumping during their leases: a slow
    # live one (lease_timeout 60 s), one about to be killed, one about to be stopped (1.5 s).
    live, live_ids, _ = start_holder(queue_path, 60, holder_jump, "after")
    doomed, doomed_ids, _ = start_holder(queue_path, 60, holder_jump, "before")
    stuck, stuck_ids, stuck_expires = start_holder(queue_path, 1.5, holder_jump, "after")
    flusher = start_python(
        JUMPED_FLUSHER, str(queue_path), str(flusher_jump), "0.05", stdin=subprocess.PIPE
    )
    try:
        stuck.send_signal(signal.SIGSTOP)  # alive, but will never finish
        assert flusher.stdout is not None
        assert flusher.stdout.readline() == "ready\n"
        assert collector.wait_for_messages(140 - 60, timeout=20)

        # Not stolen: with the live and doomed holders alive, their batches stay theirs,
        # and the stuck one's until its lease_timeout has passed.
        def stolen() -> bool:
            got = set(collector.message_ids())
            early = time.monotonic() < stuck_expires and bool(got & set(stuck_ids))
            return early or bool(got & set(live_ids + doomed_ids))

        assert not wait_until(stolen, timeout=0.5)

        # Dead: the killed holder's batch is taken over at once (not after 60 s, nor 1 h).
        doomed.kill()
        doomed.wait()
        killed_at = time.monotonic()
        assert wait_until(lambda: set(doomed_ids) <= set(collector.message_ids()), 10)
        takeover = time.monotonic() - killed_at

        # Stuck: its lease ends after its 1.5 s lease_timeout (monotonic), not before.
        assert wait_until(lambda: set(stuck_ids) <= set(collector.message_ids()), 10)
        first_sent = min(
            b.received_at
            for b in collector.batches
            if {m["messageId"] for m in b.messages} & set(stuck_ids)
        )
        # The expiry on the parent's (unjumped) wall clock, to compare with received_at.
        stuck_after = first_sent - (stuck_expires + time.time() - time.monotonic())

        # The live holder finishes its own delivery: its lease was still its own.
        out, err = finish(live, 20, stdin="deliver\n")
        assert live.returncode == 0, err[-2000:]
        assert out.split() == ["sent", str(FLUSH_AT)]
    finally:
        for proc in (live, doomed, stuck):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
    out, err = finish(flusher, 20, stdin="")
    assert flusher.returncode == 0, err[-2000:]
    assert wait_answered(collector)
    report = check([logs], collector, queue_path=queue_path)
    report.assert_sound()
    assert report.pending == 0
    assert report.resent == 0  # no batch was sent twice: no live lease was stolen
    assert takeover < 5.0
    assert -0.01 < stuck_after < 4.0  # sent after the expiry: the lease was not cut short
    return report, takeover, stuck_after


JUMPS = [(3600, 0), (-3600, 0), (0, 3600), (0, -3600)]
JUMP_IDS = ["holder+1h", "holder-1h", "flusher+1h", "flusher-1h"]


@pytest.mark.parametrize(("holder_jump", "flusher_jump"), JUMPS, ids=JUMP_IDS)
def test_wall_clock_jump_of_an_hour_during_leases(
    collector: Collector,
    queue_path: Path,
    tmp_path: Path,
    holder_jump: int,
    flusher_jump: int,
) -> None:
    report, takeover, stuck_after = clock_jump_round(
        collector, queue_path, logs_dir(tmp_path), holder_jump, flusher_jump
    )
    report.show(
        f"process: wall clock jump holder {holder_jump:+d}s flusher {flusher_jump:+d}s",
        dead_holder_takeover_s=takeover,
        stuck_holder_resent_after_its_expiry_s=stuck_after,
    )


@pytest.mark.soak
def test_soak_wall_clock_jumps_during_leases(collector: Collector, tmp_path: Path) -> None:
    rounds = 10
    takeovers: list[float] = []
    stuck_afters: list[float] = []
    sent = lost = resent = 0
    for r in range(rounds):
        for holder_jump, flusher_jump in JUMPS:
            directory = tmp_path / f"r{r}{holder_jump}{flusher_jump}"
            directory.mkdir(mode=0o700)
            collector.reset()
            report, takeover, stuck_after = clock_jump_round(
                collector,
                directory / "queue.sqlite3",
                logs_dir(directory),
                holder_jump,
                flusher_jump,
            )
            takeovers.append(takeover)
            stuck_afters.append(stuck_after)
            sent += report.sent
            lost += report.lost
            resent += report.resent or 0
    print(
        f"\n[soak: wall clock jumps during leases] rounds={rounds * len(JUMPS)} sent={sent} "
        f"lost={lost} resent={resent} max_dead_holder_takeover_s={max(takeovers):.2f} "
        f"stuck_holder_resent_after_its_expiry_s={min(stuck_afters):.2f}..{max(stuck_afters):.2f}"
    )


@pytest.mark.parametrize(
    "jump_s",
    [3600, -3600],
    ids=["+1h", "-1h"],
)
def test_flush_interval_holds_after_a_wall_clock_jump(
    collector: Collector, queue_path: Path, tmp_path: Path, jump_s: int
) -> None:
    """Fewer than flush_at messages, stored before the flusher's clock jumped, still go out
    within flush_interval (here 0.2 s), not an hour later."""
    logs = logs_dir(tmp_path)
    client = produce(
        str(queue_path),
        collector.url,
        WRITE_KEY,
        str(logs / "few.calls"),
        "few",
        5,
        1,
        settings={"flusher": "none", "on_exit": "none"},
    )
    client.queue.close()
    flusher = start_python(
        JUMPED_FLUSHER, str(queue_path), str(jump_s), "0.2", stdin=subprocess.PIPE
    )
    try:
        assert flusher.stdout is not None
        assert flusher.stdout.readline() == "ready\n"
        started = time.monotonic()
        # 30 s: a loaded machine's first request; the defect waited out the jump (an hour).
        delivered = collector.wait_for_messages(5, timeout=30)
        waited = time.monotonic() - started
    finally:
        finish(flusher, 20, stdin="")
    if not delivered:
        drain(queue_path)
    assert wait_answered(collector)
    report = check([logs], collector, queue_path=queue_path)
    report.show(f"process: flush_interval after a {jump_s:+d}s jump", waited_s=waited)
    report.assert_sound()
    assert delivered, (
        f"5 messages waited more than 30 s (flush_interval 0.2 s) after a {jump_s}s jump"
    )
