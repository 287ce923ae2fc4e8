"""The process-crash row of the fault matrix: SIGKILL producers and flushers, and count.

Producers are child interpreters tracking from 8 threads through the oracle's call log and
are SIGKILLed at random moments. Flushers are child interpreters killed at each step of one
delivery: right after the lease, while the server holds the request, after the 2xx before
the delete, inside the delete's transaction, and after its commit. Every test ends with the
oracle's report (printed: run with ``-s``) and ``PRAGMA integrity_check`` = ok.

The ``soak`` tests are the same scenarios with many more cycles: ``pytest -m soak -s
tests/reliability/test_crash_matrix.py``.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import WRITE_KEY, start_python

from durable_analytics._config import DEFAULT_MAX_IN_FLIGHT
from durable_analytics.testing import Collector, Reply

from .oracle import (
    CHILD_PRELUDE,
    Report,
    check,
    drain,
    integrity_check,
    produce,
    queued_message_ids,
    unsettled_leases,
    wait_answered,
    wait_until,
)

FLUSH_AT = 20
#: What one kill may resend: the batches in flight, at most the window's worth.
IN_FLIGHT = DEFAULT_MAX_IN_FLIGHT * FLUSH_AT


def finish(proc: subprocess.Popen[str], timeout: float = 30.0) -> tuple[str, str]:
    """Wait for a child (killing it if it outlives ``timeout``); its stdout and stderr."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"child still running after {timeout}s: {err[-2000:]}") from None


def judge_duplicates(report: Report, killed: list[tuple[bool, list[str]]]) -> int:
    """Check every duplicate against the kills; return the most duplicated by one kill.

    ``killed``: for each kill, whether the server may have had the batch in flight, and
    that batch. A message may come twice only if it was in flight at a kill after the server
    got it, and at most once more per such kill.
    """
    allowed: Counter[str] = Counter()
    for server_had_it, batch in killed:
        if server_had_it:
            allowed.update(batch)
    excess = {m: n - 1 for m, n in report.copies.items() if n - 1 > allowed[m]}
    assert not excess, f"duplicates not explained by a kill after the server got them: {excess}"
    per_kill = [sum(1 for m in set(batch) if m in report.copies) for _, batch in killed]
    assert all(n <= FLUSH_AT for n in per_kill)
    return max(per_kill, default=0)


# --------------------------------------------------------------------------- producers

PRODUCER = (
    CHILD_PRELUDE
    + """
import sys
from reliability.oracle import produce, trace_leases
queue_path, host, key, log, prefix, flusher = sys.argv[1:7]
trace_leases(log + ".leases")
produce(queue_path, host, key, log, prefix, None, 8,
        ready=lambda: print("ready", flush=True),
        settings={"flush_at": 20, "flush_interval": 0.05, "on_exit": "none",
                  "flusher": flusher, "shutdown_timeout": 5.0})
"""
)


def producer_kill_cycles(
    collector: Collector,
    queue_path: Path,
    tmp_path: Path,
    cycles: int,
    seed: int,
    producers: int = 2,
    flusher: str = "thread",
) -> tuple[Report, dict[str, int], float]:
    """Each cycle: ``producers`` producers (8 threads tracking, a flusher thread or process
    delivering) share the queue and are SIGKILLed at independent random moments; then a
    drain.

    ``flusher="process"``: the killed producer's flusher process lives on, delivers what is
    on disk and exits within its shutdown_timeout; the producer's stderr pipe stays open
    until it does, so waiting for the producer waits for it too.

    Returns the final report, figures, and the elapsed time.
    """
    rng = random.Random(seed)
    logs = tmp_path / "calls"
    logs.mkdir()
    started = time.monotonic()
    killed: list[tuple[bool, list[str]]] = []  # every batch in flight at a kill
    kills = 0
    batches_at_kills: list[int] = []
    left_for_drain = 0
    report = None
    for c in range(cycles):
        names = [logs / f"c{c}p{p}.calls" for p in range(producers)]
        procs = [
            start_python(
                PRODUCER, str(queue_path), collector.url, WRITE_KEY, str(name), name.stem, flusher
            )
            for name in names
        ]
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline() != "ready\n":
                for other in procs:
                    other.kill()
                raise AssertionError(f"a producer did not start: {finish(proc)[1][-2000:]}")
        # The random moments of the kills (not waits for something).
        for proc in procs:
            time.sleep(rng.uniform(0.0, 0.25 / producers))
            proc.send_signal(signal.SIGKILL)
        for proc, name in zip(procs, names, strict=True):
            _, err = finish(proc)
            assert proc.returncode == -signal.SIGKILL, err[-2000:]
            in_flight = unsettled_leases(f"{name}.leases")
            # The flusher keeps up to max_in_flight batches in flight, each under a lease.
            assert len(in_flight) <= DEFAULT_MAX_IN_FLIGHT
            kills += 1
            batches_at_kills.append(len(in_flight))
            killed.extend((True, batch) for batch in in_flight)
        left_for_drain += len(queued_message_ids(queue_path))
        drain(queue_path)
        assert wait_answered(collector)
        report = check([logs], collector, queue_path=queue_path)
        report.assert_sound()
        assert report.pending == 0
    assert report is not None
    elapsed = time.monotonic() - started
    figures = {
        "kills": kills,
        "kills_with_a_batch_in_flight": sum(1 for n in batches_at_kills if n),
        "most_batches_in_flight_at_a_kill": max(batches_at_kills, default=0),
        "max_duplicated_per_kill": judge_duplicates(report, killed),
        "left_on_disk_for_the_drains": left_for_drain,
    }
    return report, figures, elapsed


@pytest.mark.parametrize(("flusher", "cycles"), [("thread", 10), ("process", 4)])
def test_producers_killed_at_random_moments_lose_nothing(
    collector: Collector, queue_path: Path, tmp_path: Path, flusher: str, cycles: int
) -> None:
    report, figures, elapsed = producer_kill_cycles(
        collector, queue_path, tmp_path, cycles, 1, flusher=flusher
    )
    report.show(f"crash: producer SIGKILL, flusher={flusher}", cycles=cycles, **figures, t=elapsed)
    assert report.sent > 0
    assert report.maybe <= 8 * figures["kills"]  # at most the calls in flight at each kill
    assert report.extra_copies <= IN_FLIGHT * figures["kills"]
    if flusher == "process":
        # The orphaned flusher process delivered everything on disk before it exited, and
        # was never killed: nothing came twice.
        assert figures["left_on_disk_for_the_drains"] == 0
        assert report.extra_copies == 0


@pytest.mark.soak
@pytest.mark.parametrize("flusher", ["thread", "process"])
def test_soak_producers_killed_at_random_moments_lose_nothing(
    collector: Collector, queue_path: Path, tmp_path: Path, flusher: str
) -> None:
    cycles = 100 if flusher == "thread" else 30
    report, figures, elapsed = producer_kill_cycles(
        collector, queue_path, tmp_path, cycles, 2, flusher=flusher
    )
    report.show(f"soak: producer SIGKILL, flusher={flusher}", cycles=cycles, **figures, t=elapsed)
    assert report.maybe <= 8 * figures["kills"]
    assert report.extra_copies <= IN_FLIGHT * figures["kills"]


# --------------------------------------------------------------------------- flushers

#: Where a flusher dies, and whether the server has its batch by then.
STEPS = {
    "after-lease": False,  # leased, nothing sent
    "during-request": True,  # the server got the request and has not answered yet
    "after-2xx": True,  # answered 2xx, the ack (DELETE) never starts
    "during-delete": True,  # the DELETE ran inside the ack's transaction, no COMMIT
    "after-commit": False,  # the ack committed: delivered once, nothing to resend
}

# A flusher that SIGKILLs itself at ``step`` of its ``nth`` delivery (during-request: the
# parent kills it while the collector delays the nth answer). Every lease is printed first,
# so the parent knows the batch in flight at the kill.
FLUSHER = (
    CHILD_PRELUDE
    + """
import json, os, signal, sys, time
from durable_analytics._delivery import Deliverer
from durable_analytics._flusher import Flusher
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite.connections import Connection as _Connection
from durable_analytics._transport import HTTPTransport
path, step, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
leases = [0]
in_delete = [False]

def die(where):
    print("kill", where, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

real_lease, real_ack, real_execute = Queue.lease, Queue.ack, _Connection.execute
real_ack_and_lease = Queue.ack_and_lease

def took(got):
    if got is not None:
        leases[0] += 1
        ids = " ".join(json.loads(b)["messageId"] for b in got.bodies)
        print("leased", ids, flush=True)
    return got

def lease(self, *args, **kwargs):
    got = took(real_lease(self, *args, **kwargs))
    if got is not None and step == "after-lease" and leases[0] == nth:
        die(step)
    return got

def before_ack():
    mine = leases[0] == nth
    if mine and step == "after-2xx":
        die(step)
    in_delete[0] = mine and step == "during-delete"
    return mine

def ack(self, lease, ids=None):
    mine = before_ack()
    done = real_ack(self, lease, ids)
    if mine and step == "after-commit":
        die(step)
    return done

# The pipeline acks a batch and leases the next in one transaction: the same steps, and the
# lease it took is printed before an after-commit kill (it is in the file, unsent).
def ack_and_lease(self, lease, *args, **kwargs):
    mine = before_ack()
    done, got = real_ack_and_lease(self, lease, *args, **kwargs)
    took(got)
    if mine and step == "after-commit":
        die(step)
    if got is not None and step == "after-lease" and leases[0] == nth:
        die(step)
    return done, got

def execute(self, sql, *args):
    cursor = real_execute(self, sql, *args)
    if in_delete[0] and sql.startswith("DELETE FROM messages"):
        die(step)  # inside BEGIN IMMEDIATE ... COMMIT: the transaction never commits
    return cursor

Queue.lease, Queue.ack, _Connection.execute = lease, ack, execute
Queue.ack_and_lease = ack_and_lease
queue = Queue(path)
flusher = Flusher(Deliverer(queue, HTTPTransport(timeout=5.0)), flush_interval=0.01,
                  poll_interval=0.01)
flusher.start()
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    time.sleep(0.01)
sys.exit("never killed")
"""
)


def fill(collector: Collector, queue_path: Path, logs: Path, count: int) -> None:
    """Queue ``count`` messages through the Client (no flusher), logged by the oracle."""
    per_thread = -(-count // 4)
    client = produce(
        str(queue_path),
        collector.url,
        WRITE_KEY,
        str(logs / "fill.calls"),
        "m",
        per_thread,
        4,
        settings={"flusher": "none", "on_exit": "none"},
    )
    client.queue.close()


def flusher_kill_cycles(
    collector: Collector,
    queue_path: Path,
    tmp_path: Path,
    steps: list[str],
    cycles: int,
    seed: int,
    max_nth: int = 3,
) -> tuple[Report, dict[str, int], float]:
    """Kill one flusher per cycle at a step of its nth delivery; then drain, and judge.

    Returns the report, figures (kills, kills after the server got the batch, the most
    duplicated messages one kill caused), and the elapsed time. Asserts that duplicates
    come only from kills after the server got the batch, each at most once per such kill.
    """
    rng = random.Random(seed)
    logs = tmp_path / "calls"
    logs.mkdir()
    fill(collector, queue_path, logs, cycles * max_nth * FLUSH_AT + 2 * FLUSH_AT)
    started = time.monotonic()
    killed: list[tuple[str, list[str]]] = []  # (step, the batch in flight)
    for _ in range(cycles):
        step = rng.choice(steps)
        nth = rng.randint(1, max_nth)
        base = collector.requests
        if step == "during-request":
            collector.script(*[200] * (nth - 1), Reply(delay=0.3))
        proc = start_python(FLUSHER, str(queue_path), step, str(nth))
        if step == "during-request":
            reached = wait_until(lambda n=nth, b=base: collector.requests >= b + n, 20)
            proc.send_signal(signal.SIGKILL)
            assert reached, "the flusher never sent its nth request"
        out, err = finish(proc)
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        lines = out.splitlines()
        if step != "during-request":
            assert lines[-1] == f"kill {step}", out[-500:]
        batch = [ln.split()[1:] for ln in lines if ln.startswith("leased ")][-1]
        assert len(batch) <= FLUSH_AT
        killed.append((step, batch))
        assert integrity_check(queue_path) == "ok"
    drain(queue_path)
    assert wait_answered(collector)
    report = check([logs], collector, queue_path=queue_path)
    elapsed = time.monotonic() - started
    report.assert_sound()
    assert report.pending == 0

    figures = {
        "kills": len(killed),
        "kills_after_receipt": sum(1 for step, _ in killed if STEPS[step]),
        "max_duplicated_per_kill": judge_duplicates(
            report, [(STEPS[step], batch) for step, batch in killed]
        ),
    }
    return report, figures, elapsed


@pytest.mark.parametrize("step", list(STEPS))
def test_flusher_killed_at_each_step_of_a_delivery_loses_nothing(
    collector: Collector, queue_path: Path, tmp_path: Path, step: str
) -> None:
    cycles = 5
    report, figures, elapsed = flusher_kill_cycles(
        collector, queue_path, tmp_path, [step], cycles, seed=list(STEPS).index(step)
    )
    report.show(f"crash: flusher SIGKILL {step}", cycles=cycles, **figures, t=elapsed)
    assert figures["kills"] == cycles
    if STEPS[step]:
        assert 0 < report.extra_copies <= FLUSH_AT * cycles
    else:
        assert report.extra_copies == 0


@pytest.mark.soak
def test_soak_flushers_killed_at_random_steps_lose_nothing(
    collector: Collector, queue_path: Path, tmp_path: Path
) -> None:
    cycles = 150
    report, figures, elapsed = flusher_kill_cycles(
        collector, queue_path, tmp_path, list(STEPS), cycles, seed=3, max_nth=5
    )
    report.show("soak: flusher SIGKILL, random steps", cycles=cycles, **figures, t=elapsed)
    assert report.extra_copies <= FLUSH_AT * figures["kills_after_receipt"]


def test_call_log_lines_survive_the_kill_of_their_writer(tmp_path: Path) -> None:
    """The oracle's own premise: a line written before a SIGKILL is in the file after it."""
    script = (
        CHILD_PRELUDE
        + """
import os, sys
from reliability.oracle import CallLog
log = CallLog(sys.argv[1])
log.record("a", "start")
log.record("a", "ok")
log.record("b", "start")
os.kill(os.getpid(), 9)
"""
    )
    proc = start_python(script, str(tmp_path / "x.calls"))
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    report = check([tmp_path], Counter({"a": 1, "b": 2, "c": 1}))
    assert (report.sent, report.maybe, report.maybe_received) == (1, 1, 1)
    assert (report.lost, report.unexpected, report.duplicated, report.extra_copies) == (0, 1, 1, 1)
    assert json.loads(json.dumps(report.unexpected_ids)) == ["c"]


# --------------------------------------------------------------------------- flusher process


def test_a_killed_flusher_process_is_replaced_while_its_client_lives(
    collector: Collector, queue_path: Path, tmp_path: Path
) -> None:
    """SIGKILL the flusher process of a live Client: a new one starts and delivers what is
    tracked after, before the client closes (the wait is bounded generously: a loaded CI
    machine took over 2 s to start the new interpreter). Lost 0, none twice."""
    from durable_analytics import Client

    logs = tmp_path / "calls"
    logs.mkdir()
    client = Client(
        WRITE_KEY,
        host=collector.url,
        queue_path=queue_path,
        flusher="process",
        flush_interval=0.05,
        on_exit="none",
    )
    try:
        produce("", "", "", str(logs / "before.calls"), "before", 10, 1, client=client)
        assert collector.wait_for_messages(10, timeout=10)  # the flusher process runs
        child = client._child
        assert child is not None
        child.kill()
        child.wait()
        produce("", "", "", str(logs / "after.calls"), "after", 10, 1, client=client)
        started = time.monotonic()
        delivered = collector.wait_for_messages(20, timeout=30)
        waited = time.monotonic() - started
        replacement = client._child
    finally:
        client.close(timeout=10)  # delivers the rest in this process, whatever happened
    assert wait_answered(collector)
    report = check([logs], collector, queue_path=queue_path)
    report.show("crash: flusher process SIGKILLed under a live Client", waited_s=waited)
    report.assert_sound()
    assert delivered, "10 messages tracked after the flusher process died waited over 30 s"
    assert replacement is not None
    assert replacement.pid != child.pid  # delivered by a new flusher process, not by close()


# --------------------------------------------------------------- many batches in flight

WINDOW = 8

# A flusher with WINDOW batches in flight (pipelined), each lease printed before it is sent.
PIPELINED_FLUSHER = (
    CHILD_PRELUDE
    + """
import json, os, sys, time
from durable_analytics._delivery import Deliverer
from durable_analytics._flusher import Flusher
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._transport import HTTPTransport
path, window = sys.argv[1], int(sys.argv[2])
real_lease, real_ack_and_lease = Queue.lease, Queue.ack_and_lease

def took(got):
    if got is not None:
        # One write(2) per line: threads printing at once must not interleave their lines.
        ids = " ".join(json.loads(b)["messageId"] for b in got.bodies)
        os.write(1, f"leased {ids}\\n".encode())
    return got

def lease(self, *args, **kwargs):
    return took(real_lease(self, *args, **kwargs))

def ack_and_lease(self, *args, **kwargs):
    done, got = real_ack_and_lease(self, *args, **kwargs)
    return done, took(got)

Queue.lease, Queue.ack_and_lease = lease, ack_and_lease
queue = Queue(path)
deliverer = Deliverer(queue, HTTPTransport(timeout=5.0, maxsize=window), max_in_flight=window)
Flusher(deliverer, flush_interval=0.01, poll_interval=0.01).start()
time.sleep(30)
sys.exit("never killed")
"""
)


def test_a_flusher_killed_with_many_batches_in_flight_loses_nothing(
    queue_path: Path, tmp_path: Path
) -> None:
    """SIGKILL a flusher while the server holds several of its requests: lost 0, and at most
    the batches in flight (the window times flush_at) come again, only ones the server had."""
    cycles = 3
    with Collector(WRITE_KEY, delay=0.2) as collector:
        logs = tmp_path / "calls"
        logs.mkdir()
        fill(collector, queue_path, logs, cycles * 300)
        started = time.monotonic()
        killed: list[tuple[bool, list[str]]] = []
        peaks = []
        for _ in range(cycles):
            base = collector.requests
            proc = start_python(PIPELINED_FLUSHER, str(queue_path), str(WINDOW))
            reached = wait_until(
                lambda b=base: collector.requests >= b + 2 and collector.in_flight >= 3, 20
            )
            peaks.append(collector.in_flight)
            proc.send_signal(signal.SIGKILL)
            out, err = finish(proc)
            assert reached, f"the flusher never had several requests in flight: {err[-2000:]}"
            assert proc.returncode == -signal.SIGKILL, err[-2000:]
            batches = [ln.split()[1:] for ln in out.splitlines() if ln.startswith("leased ")]
            # Every batch it leased and did not settle may have been in flight at the kill.
            killed.extend((True, batch) for batch in batches)
            assert integrity_check(queue_path) == "ok"
        drain(queue_path)
        assert wait_answered(collector)
        report = check([logs], collector, queue_path=queue_path)
        elapsed = time.monotonic() - started

    report.assert_sound()
    assert report.pending == 0
    assert report.lost == 0
    judge_duplicates(report, killed)  # each duplicate was in flight at a kill
    report.show(
        "crash: flusher SIGKILL with many batches in flight",
        cycles=cycles,
        window=WINDOW,
        in_flight_at_kill=peaks,
        t=elapsed,
    )
    assert max(peaks) >= 3
    assert report.extra_copies <= cycles * WINDOW * FLUSH_AT
