"""`durable-analytics` as real processes: drain, concurrent drains, worker signals, demo.

Each command runs as ``python -m durable_analytics.cli`` in a fresh interpreter against a
real Collector; the parent checks exit codes, what the Collector received, and the queue.
"""

from __future__ import annotations

import os
import pty
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from conftest import WRITE_KEY, child_env, start_python

from durable_analytics import Client
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics.testing import Collector, Reply

CLI = [sys.executable, "-m", "durable_analytics.cli"]


def cli_env() -> dict[str, str]:
    env = child_env()
    for name in (
        "DURABLE_ANALYTICS_QUEUE",
        "DURABLE_ANALYTICS_WRITE_KEY",
        "DURABLE_ANALYTICS_HOST",
    ):
        env.pop(name, None)
    return env


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=cli_env(), check=False
    )


def start_cli(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        **kwargs,
    )


def fill(queue_path: Path, host: str, count: int) -> list[str]:
    client = Client(WRITE_KEY, host=host, queue_path=queue_path, flusher="none", on_exit="none")
    ids = []
    for i in range(count):
        stored, message = client.track(user_id=f"u{i}", event="Ordered", properties={"i": i})
        assert stored
        ids.append(message["messageId"])
    client.queue.close()
    return ids


def queue_counts(queue_path: Path) -> tuple[int, int]:
    queue = Queue(queue_path)
    try:
        stats = queue.stats()
        return stats.pending, queue.live_leases()
    finally:
        queue.close()


def wait_until(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


class Lines:
    """Reads a child's pipe on a thread, so a test can wait for the next line with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)

    def next(self, timeout: float = 10.0) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no output in time") from None

    def rest(self) -> str:
        self._thread.join(10)
        out = []
        while not self._lines.empty():
            out.append(self._lines.get())
        return "".join(out)


def finish(proc: subprocess.Popen[str], timeout: float = 10.0) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


# --------------------------------------------------------------------------- drain


def test_drain_as_a_program(queue_path: Path, collector: Collector) -> None:
    ids = fill(queue_path, collector.url, 500)
    done = run_cli("drain", "--queue", str(queue_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("sent 500, left 0, dead-lettered 0 in ")
    assert done.stderr == ""  # a pipe: no progress bar
    assert collector.message_ids() == dict.fromkeys(ids, 1)
    assert queue_counts(queue_path) == (0, 0)


def test_drain_right_after_a_crash_takes_over_the_dead_holders_lease(
    queue_path: Path, collector: Collector
) -> None:
    ids = fill(queue_path, collector.url, 60)
    holder = start_python(
        """
        import sys
        from durable_analytics._store.sqlite import SqliteQueue as Queue
        lease = Queue(sys.argv[1]).lease(20, 500_000)
        print(len(lease), flush=True)
        sys.stdin.read()
        """,
        str(queue_path),
        stdin=subprocess.PIPE,
    )
    assert holder.stdout is not None
    assert Lines(holder.stdout).next().strip() == "20"
    holder.kill()
    holder.wait()
    assert queue_counts(queue_path) == (60, 1)  # the dead holder's lease is still recorded

    started = time.monotonic()
    done = run_cli("drain", "--queue", str(queue_path))
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 10  # not after lease_timeout (60 s)
    assert set(collector.message_ids()) == set(ids)
    holder.communicate()


def test_two_concurrent_drains_send_each_message_once(
    queue_path: Path, collector: Collector
) -> None:
    ids = fill(queue_path, collector.url, 3000)
    # Two requests in flight each, 0.1 s apiece: one drain alone would take 7.5 s, so the
    # second interpreter has started long before the first could finish, even on a loaded
    # machine (at the default window the first sent all 3,000 in 0.2 s once).
    collector.set_default(Reply(delay=0.1))
    cmd = ("drain", "--queue", str(queue_path), "--max-in-flight", "2")
    drains = [start_cli(*cmd)]
    assert collector.wait_for_requests(1, timeout=30)
    drains.append(start_cli(*cmd))
    outputs = [finish(proc, timeout=60) for proc in drains]
    for proc, (_, err) in zip(drains, outputs, strict=True):
        assert proc.returncode == 0, err
    sent = [int(re.match(r"sent ([\d,]+),", out).group(1).replace(",", "")) for out, _ in outputs]
    assert sum(sent) == 3000
    assert min(sent) > 0  # they really ran at the same time
    received = collector.message_ids()
    assert set(received) == set(ids)
    assert max(received.values()) == 1  # nothing sent twice
    assert queue_counts(queue_path) == (0, 0)


def test_once_lock_lets_one_drain_run_per_queue(queue_path: Path, collector: Collector) -> None:
    # 10 batches of 0.6 s: the first drain still holds the lock while a second interpreter
    # starts, even on a loaded machine (with 2 batches it could finish first).
    ids = fill(queue_path, collector.url, 200)
    collector.set_default(Reply(delay=0.6))
    first = start_cli("drain", "--queue", str(queue_path), "--once-lock", "--concurrency", "1")
    assert collector.wait_for_requests(1, timeout=10)
    started = time.monotonic()
    second = run_cli("drain", "--queue", str(queue_path), "--once-lock")
    assert second.returncode == 0
    assert second.stdout == second.stderr == ""
    assert first.poll() is None  # the two overlapped: the second found the lock taken
    assert time.monotonic() - started < 5
    out, err = finish(first)
    assert first.returncode == 0, err
    assert out.startswith("sent 200, left 0")
    assert collector.message_ids() == dict.fromkeys(ids, 1)


def test_drain_interrupted_finishes_the_batches_in_flight_and_keeps_the_rest(
    queue_path: Path, collector: Collector
) -> None:
    ids = fill(queue_path, collector.url, 400)
    collector.set_default(Reply(delay=0.2))
    proc = start_cli("drain", "--queue", str(queue_path), "--concurrency", "2")
    assert collector.wait_for_requests(2, timeout=10)
    proc.send_signal(signal.SIGINT)
    out, err = finish(proc)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("durable-analytics: error: interrupted; ")
    assert "Traceback" not in err
    sent = int(re.match(r"sent ([\d,]+),", out).group(1).replace(",", ""))
    assert 0 < sent < 400
    assert all(b.status == 200 for b in collector.batches)  # none cut off mid-request
    assert queue_counts(queue_path) == (400 - sent, 0)
    assert len(collector.message_ids()) == sent
    assert set(collector.message_ids()) <= set(ids)


def test_client_on_exit_spawn_hands_the_queue_to_a_detached_drain(
    queue_path: Path, collector: Collector
) -> None:
    producer = start_python(
        """
        import sys
        from durable_analytics import Client
        client = Client(sys.argv[2], host=sys.argv[3], queue_path=sys.argv[1],
                        flusher="none", on_exit="spawn")
        for i in range(30):
            client.track(user_id="u", event="Spawned", properties={"i": i})
        """,
        str(queue_path),
        WRITE_KEY,
        collector.url,
    )
    _, err = finish(producer)
    assert producer.returncode == 0, err
    assert collector.wait_for_messages(30, timeout=15)
    assert wait_until(lambda: queue_counts(queue_path) == (0, 0))


def test_progress_bar_on_a_terminal(queue_path: Path, collector: Collector) -> None:
    fill(queue_path, collector.url, 200)
    collector.set_default(Reply(delay=0.03))
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*CLI, "drain", "--queue", str(queue_path), "--concurrency", "2"],
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            env=cli_env(),
        )
        os.close(slave)
        seen = b""
        while True:
            ready, _, _ = select.select([master], [], [], 10)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        out, _ = finish(proc)
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert out.startswith("sent 200, left 0")
    text = seen.decode()
    assert "/200" in text
    assert "msg/s" in text
    assert "%" in text  # click's bar: position, percent, ETA once known, rate
    assert "\x1b[K" in text


# --------------------------------------------------------------------------- worker


def test_worker_delivers_and_sigterm_finishes_the_batch_in_flight(
    queue_path: Path, collector: Collector
) -> None:
    """SIGTERM while batches are held at the server: the worker finishes them (answered
    200, counted as sent) and leaves the rest queued, without a lease. How the 20 later
    messages were split is the worker's business (one batch, or a first message alone when
    the tracks outlast ``--flush-interval`` on a loaded machine): lost 0."""
    worker = start_cli(
        "worker", "--queue", str(queue_path), "--poll", "0.05", "--flush-interval", "0.1"
    )
    try:
        first = fill(queue_path, collector.url, 50)
        assert collector.wait_for_messages(50, timeout=10)
        collector.set_default(Reply(delay=0.6))
        requests_before = collector.requests
        fill(queue_path, collector.url, 20)
        assert collector.wait_for_requests(requests_before + 1, timeout=10)
        in_flight = collector.batches[-1]
        assert in_flight.status == 0  # the answer is still 0.6 s away
        worker.send_signal(signal.SIGTERM)
        # Bounded by finish()'s timeout only: how long the stop takes is the shutdown-timeout
        # tests' business; a wall-clock bound here failed under load without a fault.
        _, err = finish(worker, timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, err
    assert "stopping: finishing the batches in flight" in err
    assert "Traceback" not in err
    late = collector.batches[requests_before:]
    finished = [m["messageId"] for b in late for m in b.messages]
    assert [b.status for b in late] == [200] * len(late)  # every batch in flight finished
    assert {m["messageId"] for m in in_flight.messages} <= set(finished)
    assert f"stopped: sent {50 + len(finished)}," in err
    assert set(collector.message_ids()) == set(first) | set(finished)
    assert sum(collector.message_ids().values()) == 50 + len(finished)  # none twice
    assert queue_counts(queue_path) == (20 - len(finished), 0)  # the rest queued, no lease


def test_worker_sigint_when_idle_exits_0(queue_path: Path) -> None:
    worker = start_cli("worker", "--queue", str(queue_path), "--poll", "0.05")
    assert worker.stderr is not None
    err = Lines(worker.stderr)
    assert "worker started" in err.next()
    worker.send_signal(signal.SIGINT)
    worker.wait(10)
    assert worker.returncode == 0, err.rest()
    assert queue_path.exists()  # the worker creates the queue it serves


def test_worker_exits_within_the_shutdown_timeout_against_a_hanging_server(
    queue_path: Path, collector: Collector
) -> None:
    collector.set_default(Reply(hang=True))
    ids = fill(queue_path, collector.url, 5)
    worker = start_cli(
        "worker",
        "--queue",
        str(queue_path),
        "--poll",
        "0.05",
        "--flush-interval",
        "0.05",
        "--shutdown-timeout",
        "0.5",
    )
    assert collector.wait_for_requests(1, timeout=10)
    worker.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, err = finish(worker)
    assert worker.returncode == 0, err
    assert time.monotonic() - started < 3
    assert "still in flight" in err
    # Nothing is lost: the batch goes back (its holder is gone) and a drain delivers it now.
    collector.set_default(Reply())
    done = run_cli("drain", "--queue", str(queue_path))
    assert done.returncode == 0, done.stderr
    assert set(ids) <= set(collector.message_ids())


# --------------------------------------------------------------------------- collector, demo


def test_collector_prints_each_message_until_interrupted(tmp_path: Path) -> None:
    proc = start_cli("collector", "--port", "0", "--write-key", WRITE_KEY)
    assert proc.stdout is not None
    assert proc.stderr is not None
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        banner = err.next()
        match = re.search(r"http://127\.0\.0\.1:\d+", banner)
        assert match, banner
        url = match.group(0)
        queue_path = tmp_path / "q" / "queue.sqlite3"
        ids = fill(queue_path, url, 3)
        done = run_cli("drain", "--queue", str(queue_path))
        assert done.returncode == 0, done.stderr
        lines = [out.next() for _ in ids]
        for line, message_id in zip(lines, ids, strict=True):
            assert line.split()[:2] == ["track", "Ordered"]
            assert f"messageId={message_id}" in line
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "received 3 messages in 1 request" in err.rest()


def test_collector_delay_holds_every_answer(tmp_path: Path) -> None:
    """``--delay`` is ``Collector(delay=...)``: a drain whose deadline comes first sends
    nothing and keeps every message."""
    proc = start_cli("collector", "--port", "0", "--delay", "30")
    assert proc.stderr is not None
    err = Lines(proc.stderr)
    try:
        banner = err.next()
        assert "every answer held 30s" in banner
        match = re.search(r"http://127\.0\.0\.1:\d+", banner)
        assert match, banner
        queue_path = tmp_path / "q" / "queue.sqlite3"
        fill(queue_path, match.group(0), 3)
        done = run_cli("drain", "--queue", str(queue_path), "--timeout", "1")
        assert done.returncode == 1, done.stderr
        assert "the --timeout of 1s passed" in done.stderr
        assert done.stdout.startswith("sent 0, left 3,")
        assert queue_counts(queue_path)[0] == 3
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0


def test_demo_as_a_program() -> None:
    started = time.monotonic()
    done = run_cli("demo", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sent 2,000, received 2,000, lost 0, duplicates 0" in done.stdout
    assert "Traceback" not in done.stderr
    assert len(done.stdout.splitlines()) <= 10  # short
    assert time.monotonic() - started < 30
