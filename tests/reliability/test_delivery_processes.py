"""Delivery across real processes: short-lived scripts, kills, several flushers, fork, exit modes.

Every producer is a fresh interpreter making 5,000 ``track`` calls and never calling
``flush()``; the parent counts distinct messageIds at a real Collector. Figures worth
keeping (exit times, how long a killed holder's batch waited) are printed: run with ``-s``.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import WRITE_KEY, child_env, run_python, start_python

from durable_analytics._config import DEFAULT_MAX_IN_FLIGHT
from durable_analytics._delivery import Deliverer
from durable_analytics._drain import drain
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._transport import HTTPTransport
from durable_analytics.testing import Collector, Reply

N = 5_000
FLUSH_AT = 20
#: A process that dies with batches in flight resends at most those: the window's worth.
IN_FLIGHT = DEFAULT_MAX_IN_FLIGHT * FLUSH_AT


def producer_script(
    collector: Collector, queue_path: Path, ending: str, *, n: int = N, **settings: object
) -> str:
    """A script making ``n`` track calls, printing the time of the last one, then ``ending``."""
    extra = "".join(f", {name}={value!r}" for name, value in settings.items())
    return f"""
import os, signal, sys, time
from durable_analytics import Client
client = Client({WRITE_KEY!r}, host={collector.url!r}, queue_path={str(queue_path)!r}{extra})
for i in range({n}):
    client.track("user-%d" % (i % 50), "Event", {{"i": i}})
print(time.time(), flush=True)
{ending}
"""


def run_producer(
    script: str, timeout: float = 60.0
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a producer; return it and how long it took to end after its last call."""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        check=False,
    )
    ended = time.time()
    last_call = float(result.stdout.split()[0])
    return result, ended - last_call


def drain_here(queue_path: Path) -> None:
    """A later drain, in this process: a dead holder's leases come back at once.

    See docs/ARCHITECTURE.md, "The lease protocol".
    """
    queue = Queue(queue_path)

    def make() -> Deliverer:
        return Deliverer(queue, HTTPTransport(timeout=5.0))

    result = drain(queue, make, concurrency=2, timeout=30)
    assert result.left == 0, result


def assert_all_delivered_once_or_the_window_twice(collector: Collector, n: int) -> Counter[str]:
    """Every message arrived; only the batches in flight at one stop (at most the window's
    ``max_in_flight`` times ``flush_at``) arrived twice."""
    ids = collector.message_ids()
    assert len(ids) == n
    twice = [m for m, count in ids.items() if count > 1]
    assert len(twice) <= IN_FLIGHT, f"{len(twice)} messages were sent twice"
    return ids


# ---------------------------------------------------------------- short-lived scripts


def test_a_plain_exit_delivers_all_5000_within_shutdown_timeout(
    collector: Collector, queue_path: Path
) -> None:
    result, exit_time = run_producer(
        producer_script(collector, queue_path, "", shutdown_timeout=5.0)
    )

    assert result.returncode == 0, result.stderr
    ids = collector.message_ids()
    assert len(ids) == N
    assert max(ids.values()) == 1
    assert exit_time <= 5.0
    assert Queue(queue_path).pending() == 0
    print(f"\nplain exit: {N} of {N} delivered; exit took {exit_time:.2f}s after the last call")


@pytest.mark.parametrize(
    ("ending", "recovery"),
    [
        ("os._exit(0)", "drain"),
        ("os.kill(os.getpid(), signal.SIGKILL)", "drain"),
        ("os.kill(os.getpid(), signal.SIGKILL)", "next process"),
    ],
    ids=["os._exit-then-drain", "sigkill-then-drain", "sigkill-then-next-process"],
)
def test_an_abrupt_exit_loses_none_and_a_later_run_delivers_all_5000(
    collector: Collector, queue_path: Path, ending: str, recovery: str
) -> None:
    result, _ = run_producer(producer_script(collector, queue_path, ending))
    expected = -signal.SIGKILL if "SIGKILL" in ending else 0
    assert result.returncode == expected, result.stderr
    before = len(collector.message_ids())
    assert Queue(queue_path).pending() + before >= N  # everything is on disk or delivered

    if recovery == "drain":
        drain_here(queue_path)
    else:
        later = run_python(producer_script(collector, queue_path, "", n=1))
        assert later.returncode == 0, later.stderr
    assert_all_delivered_once_or_the_window_twice(collector, N + (recovery == "next process"))
    assert Queue(queue_path).pending() == 0
    print(f"\n{ending}: {before} delivered before the exit, the rest by the {recovery}")


def test_exit_with_a_hanging_server_takes_at_most_shutdown_timeout_plus_1s(
    collector: Collector, queue_path: Path
) -> None:
    collector.set_default(Reply(hang=True))
    started = time.monotonic()
    result, exit_time = run_producer(
        producer_script(collector, queue_path, "", shutdown_timeout=2.0)
    )
    wall = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    assert exit_time <= 2.0 + 1.0
    assert collector.requests >= 1  # the server was reached and never answered
    assert Queue(queue_path).pending() == N  # nothing lost: all of it waits on disk
    print(f"\nhanging server: exit took {exit_time:.2f}s after the last call (wall {wall:.2f}s)")


# ---------------------------------------------------------------- several flusher processes

FLUSHER_SCRIPT = """
import os, sys, time
from durable_analytics._delivery import Deliverer
from durable_analytics._flusher import Flusher
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._transport import HTTPTransport
queue = Queue(sys.argv[1])
die_on_ack = int(sys.argv[2])
if die_on_ack:
    real_ack, real_lease, real_ack_and_lease = Queue.ack, Queue.lease, Queue.ack_and_lease
    acks = []
    def lease(self, *args, **kwargs):
        got = real_lease(self, *args, **kwargs)
        if got is not None and not acks:
            print("leased", flush=True)
        return got
    def acking(lease):
        acks.append(1)
        if len(acks) >= die_on_ack:
            print(" ".join(map(str, lease.ids)), flush=True)
            os.kill(os.getpid(), 9)  # the server has the batch; the ack never happens
    def ack(self, lease, ids=None):
        acking(lease)
        return real_ack(self, lease, ids)
    def ack_and_lease(self, lease, *args, **kwargs):
        acking(lease)  # the pipeline's ack that also leases the next batch
        return real_ack_and_lease(self, lease, *args, **kwargs)
    Queue.ack, Queue.lease, Queue.ack_and_lease = ack, lease, ack_and_lease
flusher = Flusher(Deliverer(queue, HTTPTransport(timeout=5.0)), flush_interval=0.05,
                  poll_interval=0.02)
flusher.start()
deadline = time.monotonic() + 60
while queue.pending() and time.monotonic() < deadline:
    time.sleep(0.02)
flusher.stop(5)
"""


def fill(queue_path: Path, collector: Collector, n: int) -> None:
    queue = Queue(queue_path)
    dest = queue.destination(collector.url, WRITE_KEY)
    for i in range(n):
        queue.append(dest, b'{"type":"track","event":"E","userId":"u","messageId":"m%d"}' % i)


def test_several_flusher_processes_deliver_each_message_once(
    collector: Collector, queue_path: Path
) -> None:
    fill(queue_path, collector, 3000)
    procs = [start_python(FLUSHER_SCRIPT, str(queue_path), "0") for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err

    ids = collector.message_ids(accepted_only=False)
    assert len(ids) == 3000
    assert max(ids.values()) == 1
    assert Queue(queue_path).pending() == 0


def test_a_flusher_killed_before_its_ack_loses_nothing_and_resends_one_batch(
    collector: Collector, queue_path: Path
) -> None:
    fill(queue_path, collector, 2000)
    # The doomed flusher's first request is answered late, so the others start and deliver
    # while it holds a live lease; it dies on that first ack.
    collector.script(Reply(delay=0.3))
    doomed = start_python(FLUSHER_SCRIPT, str(queue_path), "1")
    assert doomed.stdout is not None
    assert doomed.stdout.readline().strip() == "leased"
    others = [start_python(FLUSHER_SCRIPT, str(queue_path), "0") for _ in range(2)]
    out, _ = doomed.communicate(timeout=60)
    assert doomed.returncode == -signal.SIGKILL
    lost_ack = out.split()
    assert len(lost_ack) == FLUSH_AT
    for proc in others:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err

    ids = assert_all_delivered_once_or_the_window_twice(collector, 2000)
    twice = {m for m, count in ids.items() if count > 1}
    # Exactly the batch whose ack was lost, resent once: nobody took it while it was live.
    assert twice == {f"m{int(row) - 1}" for row in lost_ack}
    assert Queue(queue_path).pending() == 0
    assert Queue(queue_path).integrity_check() == "ok"


def test_a_drain_right_after_the_kill_reclaims_the_dead_holders_lease_at_once(
    collector: Collector, queue_path: Path
) -> None:
    fill(queue_path, collector, 100)
    doomed = start_python(FLUSHER_SCRIPT, str(queue_path), "1")
    out, _ = doomed.communicate(timeout=60)
    killed_at = time.time()
    assert doomed.returncode == -signal.SIGKILL
    assert len(out.splitlines()[-1].split()) == FLUSH_AT
    # Nothing acked (the first ack killed it) and the lease would only expire after 60 s.
    assert Queue(queue_path, lease_timeout=60.0).pending() == 100

    drain_here(queue_path)

    first: dict[str, float] = {}
    resent: list[float] = []
    for batch in collector.batches:
        for message in batch.messages:
            mid = message["messageId"]
            if mid in first:
                resent.append(batch.received_at - first[mid])
            else:
                first[mid] = batch.received_at
    ids = assert_all_delivered_once_or_the_window_twice(collector, 100)
    assert sum(1 for c in ids.values() if c > 1) == FLUSH_AT
    waited = max(resent)
    after_kill = max(b.received_at for b in collector.batches) - killed_at
    assert waited < 10.0  # not the 60 s lease_timeout: the holder was provably gone
    print(
        f"\nkilled holder's batch: resent {waited:.3f}s after the server first got it "
        f"(the whole drain ended {after_kill:.3f}s after the kill; lease_timeout 60s)"
    )


@pytest.mark.soak
def test_soak_flushers_killed_at_random_never_lose_a_message(
    collector: Collector, queue_path: Path
) -> None:
    """Rounds of three flusher processes, each SIGKILLed at a random moment mid-delivery."""
    rng = random.Random(20240501)
    total = 20_000
    collector.set_default(Reply(delay=0.02))  # keep requests in flight when the kill lands
    fill(queue_path, collector, total)
    kills = 0
    for _ in range(60):
        if not Queue(queue_path).pending():
            break
        procs = [start_python(FLUSHER_SCRIPT, str(queue_path), "0") for _ in range(3)]
        time.sleep(rng.uniform(0.3, 0.8))
        for proc in procs:  # staggered, so kills land at every point of a delivery
            time.sleep(rng.uniform(0.0, 0.05))
            if proc.poll() is None:
                proc.kill()
                kills += 1
        for proc in procs:
            proc.communicate(timeout=60)
    drain_here(queue_path)

    ids = collector.message_ids()
    assert len(ids) == total
    twice = sum(1 for count in ids.values() if count > 1)
    assert twice <= IN_FLIGHT * kills
    assert Queue(queue_path).integrity_check() == "ok"
    print(f"\nsoak: {total} delivered through {kills} kills; {twice} sent twice")


# ---------------------------------------------------------------- fork


def test_forked_children_deliver_every_event_and_nothing_twice(
    collector: Collector, queue_path: Path
) -> None:
    script = f"""
import os, sys
from durable_analytics import Client
client = Client({WRITE_KEY!r}, host={collector.url!r}, queue_path={str(queue_path)!r},
                shutdown_timeout=20)
client.track("parent", "Before fork")  # the parent's flusher thread is running
pids = []
for k in range(4):
    pid = os.fork()
    if pid == 0:
        for i in range(500):
            client.track("child-%d" % k, "Event", {{"i": i}})
        sys.exit(0)  # a normal exit: atexit flushes in the child
    pids.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
client.track("parent", "After children")
print(codes)
"""
    result = run_python(script, timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 0, 0, 0]"

    ids = collector.message_ids(accepted_only=False)
    assert len(ids) == 2 + 4 * 500
    assert max(ids.values()) == 1  # nothing sent twice, not even in a failed request
    by_user = Counter(m["userId"] for m in collector.messages())
    assert by_user == {"parent": 2, **{f"child-{k}": 500 for k in range(4)}}
    queue = Queue(queue_path)
    assert queue.pending() == 0
    assert queue.integrity_check() == "ok"


# ---------------------------------------------------------------- exit modes


def test_on_exit_spawn_exits_at_once_and_a_detached_drain_delivers(
    collector: Collector, queue_path: Path
) -> None:
    # Every answer 5 s away: the script cannot finish delivering first, and an exit that
    # waited to deliver would take its whole shutdown_timeout (5 s). The bound leaves a
    # loaded machine time to end the interpreter and start the drain.
    collector.set_default(Reply(delay=5.0))
    result, exit_time = run_producer(
        producer_script(collector, queue_path, "", n=1000, on_exit="spawn")
    )
    assert result.returncode == 0, result.stderr
    assert exit_time < 4.0  # it did not wait to deliver

    assert collector.wait_for_messages(1000, timeout=30)
    assert len(collector.message_ids()) == 1000
    deadline = time.monotonic() + 10
    while Queue(queue_path).pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Queue(queue_path).pending() == 0
    print(f"\non_exit='spawn': the script ended {exit_time:.2f}s after its last call")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in (b"Z", b"X")


def test_flusher_process_delivers_and_ends_after_the_parent_exits(
    collector: Collector, queue_path: Path
) -> None:
    script = producer_script(
        collector,
        queue_path,
        "print(client._child.pid, client._child.poll() is None, flush=True)",
        n=1000,
        flusher="process",
        on_exit="none",
        shutdown_timeout=3.0,
    )
    # stderr is not piped: the flusher process inherits it and would hold the pipe open.
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=child_env(),
    )
    assert parent.stdout is not None
    last_call = float(parent.stdout.readline())
    child_pid, alive = parent.stdout.readline().split()
    assert alive == "True"  # the flusher process runs while the parent does
    assert parent.wait(timeout=30) == 0
    parent_ended = time.monotonic()

    # Its shutdown_timeout, then time for a loaded machine to end the interpreter.
    deadline = parent_ended + 3.0 + 15.0
    while not _gone(int(child_pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    child_ended = time.monotonic()
    assert _gone(int(child_pid)), "the flusher process outlived its shutdown_timeout"
    parent.stdout.close()

    # The parent had no flusher thread and did nothing at exit: the child delivered it all.
    ids = collector.message_ids()
    assert len(ids) == 1000
    assert max(ids.values()) == 1
    assert Queue(queue_path).pending() == 0
    print(
        f"\nflusher='process': parent exited {time.time() - last_call:.2f}s after its last "
        f"call; its flusher process ended {child_ended - parent_ended:.2f}s after the parent"
    )


def test_flusher_process_with_on_exit_flush_delivers_everything(
    collector: Collector, queue_path: Path
) -> None:
    result, exit_time = run_producer(
        producer_script(collector, queue_path, "", n=1000, flusher="process")
    )
    assert result.returncode == 0, result.stderr
    assert len(collector.message_ids()) == 1000
    assert exit_time <= 5.0 + 1.0


def test_on_exit_none_leaves_the_rest_on_disk_for_the_next_run(
    collector: Collector, queue_path: Path
) -> None:
    # Every answer 5 s away: nothing is acknowledged before the exit, and an exit that
    # waited to deliver would take at least that.
    collector.set_default(Reply(delay=5.0))
    result, exit_time = run_producer(producer_script(collector, queue_path, "", on_exit="none"))
    assert result.returncode == 0, result.stderr
    assert exit_time < 4.0
    left = Queue(queue_path).pending()
    assert left > 0
    collector.set_default(Reply())
    drain_here(queue_path)
    assert_all_delivered_once_or_the_window_twice(collector, N)
