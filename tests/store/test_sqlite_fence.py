"""The commit fence's exclusive hold (``fence.py``): how a delivering thread keeps every
other writer, of any process, out of the commit that starts the log over."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import start_python

from durable_analytics._store.sqlite.fence import CommitFence

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
    ours = CommitFence(tmp_path, wait=1.0)
    theirs = CommitFence(tmp_path, wait=1.0)
    assert ours.try_exclusive(0.01)
    assert ours.depth == 1
    started = time.monotonic()
    assert not theirs.try_enter()
    assert time.monotonic() - started < 0.1
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
        fence = CommitFence(tmp_path, wait=1.0)
        started = time.monotonic()
        assert not fence.try_exclusive(0.05)
        waited = time.monotonic() - started
        assert 0.05 <= waited < 1.0
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
