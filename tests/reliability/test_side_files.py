"""The -wal and -shm deleted under a running producer (issue 11, item 3).

A cleanup job (or an operator) removes ``queue.sqlite3-shm``, or both side files, while a
producer has the queue open. Before, that producer went on committing into the unlinked
files, a second producer wrote to fresh ones, and the first one's last close deleted the
second one's -wal: hundreds of returned calls lost, silently. Now the producer notices at
its next write (the files' identity changed), logs a warning, reopens on the files now on
disk and stores again what only it still saw. Counted: every call that returned is there.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import run_python, start_python

from durable_analytics._store.sqlite import SqliteQueue as Queue

FIRST = """
import json, logging, sys
from durable_analytics._store.sqlite import SqliteQueue as Queue
logging.basicConfig()             # the library attaches only a NullHandler: the app decides
q = Queue(sys.argv[1])
dest = q.destination("https://api.example.test", "test-write-key-0001")
returned = []
def append(i):
    body = json.dumps({"type": "track", "messageId": f"first-{i}", "properties": {"p": "x" * 200}})
    if q.append(dest, body.encode()):
        returned.append(f"first-{i}")
for i in range(400):
    append(i)
print("half", flush=True)
sys.stdin.readline()              # the side files are deleted, a second producer writes
for i in range(400, 800):
    append(i)
q.close()
print(json.dumps(returned), flush=True)
"""

SECOND = """
import json, sys
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics.exceptions import QueueError
returned = []
try:
    q = Queue(sys.argv[1])
    dest = q.destination("https://api.example.test", "test-write-key-0001")
    for i in range(300):
        body = json.dumps({"type": "track", "messageId": f"second-{i}"})
        if q.append(dest, body.encode()):
            returned.append(f"second-{i}")
    q.close()
except QueueError as exc:
    print("error:", exc, file=sys.stderr)
print(json.dumps(returned), flush=True)
"""


@pytest.mark.parametrize("deleted", [("-shm",), ("-wal", "-shm")], ids=["shm", "wal-and-shm"])
def test_side_files_deleted_under_a_running_producer_lose_no_returned_call(
    tmp_path: Path, deleted: tuple[str, ...]
) -> None:
    directory = tmp_path / "q"
    directory.mkdir(mode=0o700)
    path = directory / "queue.sqlite3"
    Queue(path).close()
    first = start_python(FIRST, str(path), stdin=subprocess.PIPE)
    assert first.stdin is not None
    assert first.stdout is not None
    assert first.stdout.readline().strip() == "half"
    for suffix in deleted:
        os.unlink(f"{path}{suffix}")
    second = run_python(SECOND, str(path))
    assert second.returncode == 0, second.stderr
    second_returned = json.loads(second.stdout.strip().splitlines()[-1])
    first.stdin.write("go\n")
    first.stdin.flush()
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    first_returned = json.loads(out.strip().splitlines()[-1])

    q = Queue(path)
    stored = [json.loads(b)["messageId"] for b in q.bodies()]
    integrity = q.integrity_check()
    q.close()
    returned = first_returned + second_returned
    lost = sorted(set(returned) - set(stored))
    duplicated = len(stored) - len(set(stored))
    print(
        f"\ndeleted {'+'.join(deleted)}: returned {len(first_returned)} + "
        f"{len(second_returned)}, stored {len(stored)}, lost {len(lost)}, "
        f"duplicated {duplicated}; warning logged: {'deleted or replaced' in err}"
    )
    assert integrity == "ok"
    assert len(first_returned) == 800
    assert lost == []
    assert duplicated == 0
    assert "was deleted or replaced while this process had it open" in err
