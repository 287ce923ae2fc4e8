"""Celery prefork: every pool child delivers what its tasks tracked when it shuts down."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from durable_analytics.testing import Collector
from tests.conftest import WRITE_KEY, child_env
from tests.contrib.servers import output, server, stop
from tests.reliability.oracle import queued_message_ids, wait_until

# flush_at above the task count and an hour's flush_interval: nothing is sent while tasks
# run, so every message at the collector was delivered by a child's or the worker's exit.
TASKS = """
    import os
    from celery import Celery
    from durable_analytics import Client
    from durable_analytics.contrib.celery import connect

    folder = os.environ["BROKER_DIR"]
    app = Celery("tasks", broker="filesystem://")
    app.conf.broker_transport_options = {
        "data_folder_in": folder, "data_folder_out": folder,
        "processed_folder": folder + "-done", "store_processed": False,
    }
    app.conf.worker_hijack_root_logger = False

    client = Client(os.environ["WK"], host=os.environ["HOST"], queue_path=os.environ["QUEUE"],
                    flush_at=5000, flush_interval=3600, shutdown_timeout=30)
    if os.environ.get("CONNECT") == "1":
        connect(client)

    @app.task
    def hit(n):
        client.track(f"user-{n}", "Task Ran", {"n": n, "pid": os.getpid()})
"""

SEND = """
    import sys
    sys.path.insert(0, sys.argv[1])
    from tasks import hit
    for n in range(int(sys.argv[2])):
        hit.delay(n)
"""


@pytest.mark.parametrize("connected", [True, False], ids=["connect", "control"])
def test_prefork_children_deliver_their_events_on_shutdown(
    tmp_path: Path, collector: Collector, connected: bool
) -> None:
    """300 tasks over recycled prefork children, then SIGTERM: all 300 arrive, once."""
    (tmp_path / "tasks.py").write_text(textwrap.dedent(TASKS))
    broker = tmp_path / "broker"
    broker.mkdir()
    queue = tmp_path / "q.sqlite3"
    env = {
        "WK": WRITE_KEY,
        "HOST": collector.url,
        "QUEUE": str(queue),
        "BROKER_DIR": str(broker),
        "CONNECT": "1" if connected else "0",
    }
    tasks = 300
    sent = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SEND), str(tmp_path), str(tasks)],
        env={**child_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert sent.returncode == 0, sent.stderr
    argv = ["celery", "-A", "tasks", "worker", "--pool", "prefork", "-c", "2",
            "--max-tasks-per-child", "60", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-l", "info"]  # fmt: skip
    with server(argv, tmp_path, env) as proc:

        def seen() -> int:
            stored = set(queued_message_ids(queue)) if queue.exists() else set()
            return len(stored | set(collector.message_ids()))

        assert wait_until(lambda: seen() >= tasks, timeout=120), output(proc)
        assert stop(proc, signal.SIGTERM, timeout=90) == 0, output(proc)
        log = output(proc)
    ids = collector.message_ids()
    stored = queued_message_ids(queue)
    left = sum(stored.values())
    if connected:
        # Every task's event reached the collector, once. A child the pool ends while its
        # last batch is in flight (seen once on a loaded machine: 60 left) leaves that batch
        # on disk although delivered: resent later, never lost.
        assert len(ids) == tasks, log
        assert max(ids.values()) == 1
        assert set(stored) <= set(ids), log
        # Children recycled by max-tasks-per-child delivered theirs as they went.
        assert len({m["properties"]["pid"] for m in collector.messages()}) > 2
    else:
        assert left > 0  # the control: children end with os._exit and skip the exit flush
        assert len(ids) + left == tasks
