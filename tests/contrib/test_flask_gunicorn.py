"""Flask under gunicorn: preload, max_requests recycling and SIGTERM lose nothing."""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest
from flask import Flask

from durable_analytics import Client, ConfigError
from durable_analytics.contrib.flask import DurableAnalytics
from durable_analytics.testing import Collector
from tests.conftest import WRITE_KEY
from tests.contrib.servers import free_port, get, server, stop
from tests.reliability.oracle import queued_message_ids

# flush_at above the request count and an hour's flush_interval: nothing is sent while the
# workers serve, so every message at the collector was delivered by a worker's exit.
APP = """
    import os
    from flask import Flask
    from durable_analytics.contrib.flask import DurableAnalytics

    analytics = DurableAnalytics()

    def create_app():
        app = Flask(__name__)
        app.config["DURABLE_ANALYTICS"] = {
            "write_key": os.environ["WK"], "host": os.environ["HOST"],
            "queue_path": os.environ["QUEUE"], "flush_at": 5000, "flush_interval": 3600,
            "shutdown_timeout": 20,
        }
        analytics.init_app(app)

        @app.get("/hit/<int:n>")
        def hit(n):
            analytics.client.track(f"user-{n}", "Hit", {"n": n, "pid": os.getpid()})
            return {"ok": True}

        return app

    app = create_app()
"""

HOOKS = """
    from durable_analytics.contrib.gunicorn import worker_exit  # noqa: F401
"""


@pytest.mark.parametrize(
    ("options", "hooks"),
    [
        (["--preload", "--max-requests", "40", "--max-requests-jitter", "10"], True),
        ([], False),
    ],
    ids=["preload-recycling-hooks", "plain-atexit"],
)
def test_gunicorn_workers_deliver_every_event_on_exit(
    tmp_path: Path, collector: Collector, options: list[str], hooks: bool
) -> None:
    """Every tracked event arrives once; none is left on disk after SIGTERM."""
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    argv = ["gunicorn", "-w", "2", "--graceful-timeout", "40", *options]
    if hooks:
        (tmp_path / "gunicorn.conf.py").write_text(textwrap.dedent(HOOKS))
        argv += ["-c", "gunicorn.conf.py"]
    queue = tmp_path / "q.sqlite3"
    port = free_port()
    env = {"WK": WRITE_KEY, "HOST": collector.url, "QUEUE": str(queue)}
    events = 300
    with server([*argv, "-b", f"127.0.0.1:{port}", "app:app"], tmp_path, env, port) as proc:
        assert get(port, [f"/hit/{n}" for n in range(events)], connections=3) == [200] * events
        assert stop(proc, signal.SIGTERM) == 0
        log = (tmp_path / "server.log").read_text()
    ids = collector.message_ids()
    assert len(ids) == events, log[-2000:]
    assert max(ids.values()) == 1
    assert sum(queued_message_ids(queue).values()) == 0
    pids = {m["properties"]["pid"] for m in collector.messages()}
    if "--max-requests" in options:
        # Recycled workers delivered theirs on the way out: more workers than -w 2.
        assert len(pids) > 2
        assert "delivered" in log  # the hook ran and said so


def test_init_app_builds_one_client_per_app_from_config(
    collector: Collector, queue_path: Path
) -> None:
    """Two apps, one extension: each request sees its own app's client."""
    ext = DurableAnalytics()
    apps = []
    for name in ("a", "b"):
        app = Flask(name)
        app.config["DURABLE_ANALYTICS"] = {
            "write_key": WRITE_KEY,
            "host": collector.url,
            "queue_path": queue_path.with_name(f"{name}.sqlite3"),
            "flusher": "none",
        }
        ext.init_app(app)
        apps.append(app)
    clients = []
    for app in apps:
        with app.app_context():
            clients.append(ext.client)
    assert clients[0] is not clients[1]
    assert clients[0].config.queue_path.name == "a.sqlite3"


def test_a_given_client_is_used_and_a_bad_config_is_refused(
    collector: Collector, queue_path: Path
) -> None:
    """``DurableAnalytics(client=...)`` works outside an app; a non-dict setting raises."""
    client = Client(WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="none")
    assert DurableAnalytics(client=client).client is client
    with pytest.raises(ConfigError, match="no durable-analytics client"):
        _ = DurableAnalytics().client
    app = Flask("bad")
    app.config["DURABLE_ANALYTICS"] = "WRITE_KEY"
    with pytest.raises(ConfigError, match="must be a dict"):
        DurableAnalytics(app)
