"""A recovery never overwrites a call another process stored meanwhile (issue 11, item 1).

The recovering process locks the file (``BEGIN IMMEDIATE``), salvages it, lets go of the
lock and writes the fresh content over the file with SQLite's backup. A commit of another
process between the two was overwritten: its call had returned a row id, and the row was
gone. Now every commit holds the commit fence (``_store/sqlite/fence.py``), which the
recovery holds exclusively across that window.

The instrumented test puts another process's append exactly in the window; the soak test
runs producers that append while the file is damaged again and again.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import WRITE_KEY, start_python

from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite import recovery as recovery_module
from durable_analytics.exceptions import QueueError

HOST = "https://api.example.test"
PAGE = 4096
MESSAGES_ROOT = 4  # the messages table's root page in a file this version created


def body(name: str, i: int, pad: int = 150) -> bytes:
    return json.dumps(
        {"type": "track", "messageId": f"{name}-{i}", "properties": {"pad": "x" * pad}},
        separators=(",", ":"),
    ).encode()


def seed(path: Path, n: int = 400) -> set[str]:
    """A queue of ``n`` messages, checkpointed (no -wal left)."""
    q = Queue(path)
    dest = q.destination(HOST, WRITE_KEY)
    for i in range(n):
        q.append(dest, body("seed", i))
    q.close()
    return {f"seed-{i}" for i in range(n)}


def break_first_leaf(path: Path) -> None:
    """Flip the first leaf page's header of the messages table: reading every message meets
    it, while appends (which go to the rightmost leaf) do not."""
    with open(path, "r+b") as f:
        f.seek((MESSAGES_ROOT - 1) * PAGE)
        root = f.read(PAGE)
        assert root[0] == 5, "the seeded messages table must have an interior root"
        cell = int.from_bytes(root[12:14], "big")
        leaf = int.from_bytes(root[cell : cell + 4], "big")
        f.seek((leaf - 1) * PAGE)
        first = f.read(1)
        f.seek((leaf - 1) * PAGE)
        f.write(bytes([first[0] ^ 0xFF]))


def message_ids(q: Queue) -> list[str]:
    return [json.loads(b)["messageId"] for b in q.bodies()]


# The other process: opens the queue before the damage, appends one message when told, and
# says when its append is held at the commit fence.
APPENDER = """
import json, sys
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite import fence
q = Queue(sys.argv[1])
dest = q.destination("https://api.example.test", "test-write-key-0001")
if hasattr(fence, "CommitFence"):
    waiting = fence.CommitFence.wait_enter
    def wait_enter(self):
        print("fenced", flush=True)
        waiting(self)
    fence.CommitFence.wait_enter = wait_enter
print("open", flush=True)
sys.stdin.readline()
row = q.append(dest, json.dumps({"type": "track", "messageId": "window-0"}).encode())
print("stored", row, flush=True)
q.close()
"""


def test_an_append_of_another_process_inside_the_recovery_window_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process appends exactly between the recovery's ROLLBACK and its backup: the
    call returns only once the fresh file is in place, and its row is in it."""
    directory = tmp_path / "q"
    directory.mkdir(mode=0o700)
    path = directory / "queue.sqlite3"
    seeded = seed(path)
    other = start_python(APPENDER, str(path), stdin=subprocess.PIPE)
    assert other.stdin is not None
    assert other.stdout is not None
    assert other.stdout.readline().strip() == "open"
    break_first_leaf(path)

    said: list[str] = []
    replace: Callable[..., Any] = recovery_module.Recovery._replace_in_place

    def in_the_window(self: Any, *args: Any) -> None:
        # The recovery has let go of SQLite's lock: let the other process append now.
        assert other.stdin is not None
        assert other.stdout is not None
        other.stdin.write("go\n")
        other.stdin.flush()
        said.append(other.stdout.readline().strip())  # "fenced" (held) or "stored <id>"
        replace(self, *args)

    monkeypatch.setattr(recovery_module.Recovery, "_replace_in_place", in_the_window)
    q = Queue(path, recover=True)
    ids = message_ids(q)  # meets the broken leaf: recovers, then reads the fresh file
    assert q.last_recovery is not None
    out, err = other.communicate(timeout=60)
    assert other.returncode == 0, err
    said += out.split("\n")
    stored = [line for line in said if line.startswith("stored")]
    assert len(stored) == 1, said
    returned = int(stored[0].split()[1])
    ids = message_ids(q)
    q.close()
    lost = 0 if (returned == 0 or "window-0" in ids) else 1
    print(f"\nwindow append: {said[0]!r} first; returned 1, lost {lost}")
    assert said[0] == "fenced"
    assert lost == 0
    assert len(ids) == len(set(ids)), "duplicates"
    assert q.last_recovery is not None
    assert len(set(ids) & seeded) == q.last_recovery.messages  # what the salvage reported


# --------------------------------------------------------------------------- soak

PRODUCER = """
import json, sys, time, os
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics.exceptions import QueueError
path, name, stop = sys.argv[1], sys.argv[2], sys.argv[3]
q = Queue(path, recover=True)
dest = q.destination("https://api.example.test", "test-write-key-0001")
i = 0
pad = "y" * 150
with open(sys.argv[4], "w") as log:
    while i < 4000 and not os.path.exists(stop):
        b = json.dumps({"type": "track", "messageId": f"{name}-{i}", "properties": {"p": pad}})
        try:
            row = q.append(dest, b.encode())
        except QueueError as exc:
            print("error", exc, file=sys.stderr, flush=True)
            row = 0
        if row:
            log.write(f"{name}-{i}\\n")
            log.flush()
        i += 1
        time.sleep(0.001)
q.close()
"""


@pytest.mark.soak
def test_producers_appending_through_repeated_recoveries_lose_no_returned_call(
    tmp_path: Path,
) -> None:
    """4 producer processes append (up to 4,000 each); 12 times the first leaf of the messages
    table is broken and a fifth process recovers the file. Every call that returned a row
    id is in the final file."""
    directory = tmp_path / "q"
    directory.mkdir(mode=0o700)
    path = directory / "queue.sqlite3"
    seed(path)
    stop = directory / "stop"
    logs = [tmp_path / f"p{k}.log" for k in range(4)]
    procs = [start_python(PRODUCER, str(path), f"p{k}", str(stop), str(logs[k])) for k in range(4)]
    recoveries = 0
    try:
        for _ in range(12):
            time.sleep(0.25)
            break_first_leaf(path)  # while the producers write
            q = Queue(path, recover=True)
            with contextlib.suppress(QueueError):  # damaged again while reading: next round
                message_ids(q)
            recoveries += q.last_recovery is not None
            q.close()
    finally:
        stop.touch()
        for proc in procs:
            proc.communicate(timeout=120)
    q = Queue(path, recover=True)
    kept = set(message_ids(q))
    q.close()
    returned = [line for log in logs for line in log.read_text().split()]
    lost = [m for m in returned if m not in kept]
    print(
        f"\n{recoveries} recoveries, {len(returned)} calls returned, lost {len(lost)}, "
        f"corrupt copies {len(list(directory.glob('*.corrupt-*')))}"
    )
    assert recoveries >= 5
    assert lost == []
