"""The commit fence's exclusive hold (``fence.py``): how a delivering thread keeps every
other writer, of any process, out of the commit that starts the log over."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType

import pytest
from conftest import directory_locked_by_someone, start_python

from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite.checkpoint import restart_log
from durable_analytics._store.sqlite.fence import CommitFence

from .sqlite_helpers import HOST, KEY

# A child that holds the directory's lock shared (as a writer during one commit) until its
# stdin closes.
_SHARED_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_SH)
print("held", flush=True)
sys.stdin.read()
"""


def test_an_exclusive_hold_makes_other_writers_find_the_fence_taken(tmp_path: Path) -> None:
    """While one fence holds the lock exclusively, another's ``try_enter`` (a writer of
    another process: its own descriptor) fails at once, so that writer spools; after
    ``leave`` it succeeds again."""
    # A fence's wait of 5 s: "at once" is then told from it with room for a loaded machine.
    ours = CommitFence(tmp_path, wait=5.0)
    theirs = CommitFence(tmp_path, wait=5.0)
    assert ours.try_exclusive(0.01)
    assert ours.depth == 1
    started = time.monotonic()
    assert not theirs.try_enter()
    assert time.monotonic() - started < 1.0
    assert theirs.depth == 0
    ours.leave()
    assert ours.depth == 0
    assert theirs.try_enter()
    theirs.leave()
    ours.close()
    theirs.close()


def test_an_exclusive_hold_is_not_taken_while_another_process_commits(tmp_path: Path) -> None:
    """A writer of another process holding the lock shared keeps ``try_exclusive`` from
    taking it: it gives up after its wait, holding nothing (the fence works as before)."""
    child = start_python(_SHARED_HOLDER, str(tmp_path), stdin=-1)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        fence = CommitFence(tmp_path, wait=5.0)
        started = time.monotonic()
        assert not fence.try_exclusive(0.05)
        waited = time.monotonic() - started
        assert 0.05 <= waited < 2.0  # its own wait, not the fence's 5 s
        assert fence.depth == 0
        assert fence.try_enter()  # shared beside the other writer, as any commit
        fence.leave()
        fence.close()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)


def test_an_exclusive_hold_is_not_taken_inside_a_commit_of_the_same_fence(
    tmp_path: Path,
) -> None:
    """Inside a hold of its own (a signal handler's call on the thread that commits), the
    fence does not turn its shared lock into an exclusive one."""
    fence = CommitFence(tmp_path, wait=1.0)
    assert fence.try_enter()
    assert not fence.try_exclusive(0.01)
    assert fence.depth == 1
    fence.leave()
    assert fence.depth == 0
    fence.close()


class _Interrupted(Exception):
    """What a signal handler may raise into the code it interrupted (a SIGALRM-based
    timeout, KeyboardInterrupt, SystemExit from a SIGTERM handler)."""


@pytest.mark.parametrize("where", ["while it retries", "after its flock"])
def test_a_signal_handler_raising_into_the_exclusive_hold_leaves_the_fence_free(
    tmp_path: Path, where: str
) -> None:
    """``flush()`` delivers on the caller's thread, so a signal handler may raise into the
    delivering thread's ``restart_log`` while ``try_exclusive`` retries (another process's
    writer holds the lock shared) or right after its flock succeeded. Nothing stays held
    afterwards: the fence's count is back to 0, and once this process commits again a
    recovery of another process can take the directory. (Before: the count stayed at 1, so
    every later commit of the process left its shared lock held, for the process's life.)"""
    path = tmp_path / "q.sqlite3"
    q = Queue(path)
    dest = q.destination(HOST, KEY)
    fence = q._db.fence
    theirs = CommitFence(tmp_path, wait=1.0)
    if where == "while it retries":
        # A writer of another process holds the lock shared: try_exclusive keeps trying
        # (2 ms), and a signal arriving meanwhile raises out of its sleep.
        assert theirs.try_enter()
        main = threading.get_ident()
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if frame is not None and frame.f_code.co_name == "try_exclusive":
                raise _Interrupted

        def kill() -> None:
            while not stop.wait(0.0002):
                signal.pthread_kill(main, signal.SIGUSR1)

        previous = signal.signal(signal.SIGUSR1, on_signal)
        killer = threading.Thread(target=kill, daemon=True)
        killer.start()

        def restart_until_interrupted() -> None:
            for _ in range(2000):
                restart_log(q._db)

        try:
            with pytest.raises(_Interrupted):
                restart_until_interrupted()
        finally:
            stop.set()
            killer.join()
            signal.signal(signal.SIGUSR1, previous)
        theirs.leave()
    else:
        real = fence.try_exclusive

        def interrupted(wait: float) -> bool:
            del fence.try_exclusive
            assert real(wait)  # the flock returned: the signal lands after it
            raise _Interrupted

        fence.try_exclusive = interrupted  # type: ignore[method-assign]
        with pytest.raises(_Interrupted):
            restart_log(q._db)
    assert fence.depth == 0
    assert q.append(dest, b'{"i":1}') > 0  # a commit of this process, as any track()
    assert not directory_locked_by_someone(tmp_path)
    assert q.pending() == 1
    theirs.close()
    q.close()
