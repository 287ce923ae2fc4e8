"""Review probes (ckreview): the byte cap with several producer processes appending at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite.dead_letters import used_bytes

from .sqlite_helpers import HOST, KEY

_PRODUCER = r"""
import os, sys, time
from durable_analytics._store.sqlite import SqliteQueue as Queue
path, cap, size, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[5]
spool = sys.argv[4] == "1"
q = Queue(path, max_queue_bytes=cap, spool=spool)
dest = q.destination(sys.argv[6], sys.argv[7])
while not os.path.exists(go):
    time.sleep(0.001)
stored = drops = 0
while drops < 2000:
    if q.append(dest, b"x" * size):
        stored += 1
    else:
        drops += 1
q.max_id()  # as flush() does: moves what this process spooled
q.close()
print(stored)
"""


@pytest.mark.parametrize("spool", [False, True], ids=["no-spool", "spool"])
def test_several_producer_processes_filling_a_capped_queue_stay_near_the_cap(
    tmp_path: Path, spool: bool
) -> None:
    """Four processes append 2,100-byte messages (one row per page: about twice the cap's
    estimate of a row) until each saw 2,000 drops, with nobody delivering
    (``flusher="none"``, no worker). The file's used size ends within 2 MiB of
    ``max_queue_bytes``; every stored message is in it once.

    Fails with ``spool=True`` on f428255 and a4f71fb alike (~16 MiB over a 48 MiB cap):
    ``SPOOL_MARGIN`` (32 MiB by one process's estimate) covers one process's spool, but
    each process spools up to ``MOST_SPOOLED`` rows and moves them without the cap's check.
    """
    path = tmp_path / "q.db"
    cap = 48 * 1024 * 1024
    Queue(path, max_queue_bytes=cap).close()
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _PRODUCER,
                str(path),
                str(cap),
                "2100",
                "1" if spool else "0",
                str(go),
                HOST,
                KEY,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    go.touch()
    stored = sum(int(p.communicate(timeout=120)[0]) for p in procs)
    q = Queue(path, max_queue_bytes=cap)
    q.max_id()  # adopts any spool left behind
    used = q._db.read(lambda conn: used_bytes(conn, 4096))
    assert q.pending() == stored  # lost 0, duplicated 0
    q.close()
    assert used <= cap + 2 * 1024 * 1024, f"{(used - cap) / 2**20:.1f} MiB over the cap"
