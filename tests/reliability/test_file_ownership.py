"""Queue files and directories another local user controls are refused (issue 11, item 5).

As ssh and gpg do: a queue file (or its -wal / -shm) must belong to the process's effective
user; its directory to that user, or to root and then not group-writable. Every refusal says
which command fixes it. Real files owned by another uid (``os.chown``), so these tests run
as root and skip otherwise.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WRITE_KEY, child_env

from durable_analytics import Client, QueuePermissionError
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics.testing import Collector

OTHER = 65534  # nobody

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root to create files owned by another user",
)


def planted(directory: Path) -> Path:
    """Another user's queue directory (0755) and empty queue file (0666), as an attacker
    would leave them in a shared sticky directory."""
    directory.mkdir()
    os.chmod(directory, 0o755)
    os.chown(directory, OTHER, OTHER)
    path = directory / "queue.sqlite3"
    path.touch()
    os.chmod(path, 0o666)
    os.chown(path, OTHER, OTHER)
    return path


def test_a_queue_directory_and_file_planted_by_another_user_are_refused_and_get_no_data(
    tmp_path: Path, collector: Collector
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    path = planted(shared / "app")
    with pytest.raises(QueuePermissionError) as info:
        Client(WRITE_KEY, host=collector.url, queue_path=path)
    message = str(info.value)
    assert "belongs to uid 65534" in message
    assert f"chown {os.geteuid()} {shlex.quote(str(path.parent))}" in message
    assert path.stat().st_size == 0  # not a byte of the write key or the messages
    assert sorted(p.name for p in path.parent.iterdir()) == ["queue.sqlite3"]
    print(f"\nplanted directory and file: refused ({message})")


def test_a_queue_file_of_another_user_in_a_private_directory_is_refused_until_chowned(
    tmp_path: Path, collector: Collector
) -> None:
    directory = tmp_path / "private"
    directory.mkdir(mode=0o700)
    path = directory / "queue.sqlite3"
    path.touch()
    os.chown(path, OTHER, OTHER)
    with pytest.raises(QueuePermissionError, match="belongs to uid 65534") as info:
        Queue(path)
    assert path.stat().st_size == 0
    # The message names the fix; following it makes the file usable.
    fix = re.search(r"chown (\d+) (\S+) && chmod 600", str(info.value))
    assert fix is not None
    assert Path(shlex.split(fix.group(2))[0]) == path
    os.chown(path, int(fix.group(1)), -1)
    client = Client(WRITE_KEY, host=collector.url, queue_path=path, flusher="none")
    sent = sum(1 for i in range(20) if client.track("u", "E", {"i": i})[0])
    assert client.queue.pending() == sent == 20
    client.close()


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_a_side_file_planted_by_another_user_is_refused(tmp_path: Path, suffix: str) -> None:
    directory = tmp_path / "private"
    directory.mkdir(mode=0o700)
    path = directory / "queue.sqlite3"
    Queue(path).close()
    side = Path(f"{path}{suffix}")
    side.write_bytes(b"")
    os.chown(side, OTHER, OTHER)
    with pytest.raises(QueuePermissionError, match=f"queue file {re.escape(str(side))} belongs"):
        Queue(path)


def test_a_directory_of_another_user_is_refused_even_when_not_writable_by_others(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, OTHER, OTHER)
    with pytest.raises(QueuePermissionError, match="its owner could read or replace the queue"):
        Queue(directory / "queue.sqlite3")
    assert list(directory.iterdir()) == []  # nothing created


AS_NOBODY = """
import os, sys
from durable_analytics import QueuePermissionError
from durable_analytics._store.sqlite import SqliteQueue as Queue
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
try:
    Queue(sys.argv[1]).close()
except QueuePermissionError as exc:
    print("refused:", exc)
else:
    print("accepted")
"""


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is private to root)."""
    top = Path(tempfile.mkdtemp(prefix="da-owner-", dir="/tmp"))
    os.chmod(top, 0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def test_a_group_writable_root_directory_is_refused_for_another_user(reachable_dir: Path) -> None:
    """A directory of root's that the user's group may write (root:nogroup 0770): any member
    of the group could replace the queue file. The user itself (uid 65534) is refused."""
    directory = reachable_dir / "rootgroup"
    directory.mkdir()
    os.chown(directory, 0, OTHER)
    os.chmod(directory, 0o770)
    out = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, str(directory / "queue.sqlite3")],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused:"), out.stdout
    assert "group-writable" in out.stdout
    assert f"chmod g-w {shlex.quote(str(directory))}" in out.stdout
    assert list(directory.iterdir()) == []
