"""Django: the app builds the client from settings; gunicorn, uvicorn and manage.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from durable_analytics.testing import Collector
from tests.conftest import WRITE_KEY, child_env
from tests.contrib.servers import free_port, get, server, stop
from tests.reliability.oracle import queued_message_ids

# One module is the settings, the URLconf and the views. flush_at above the request count
# and an hour's flush_interval: nothing is sent while serving, only on the way out.
PROJECT = """
    import os
    from django.http import JsonResponse
    from django.urls import path
    from durable_analytics.contrib.django import get_client

    SECRET_KEY = "test"
    DEBUG = False
    ALLOWED_HOSTS = ["*"]
    ROOT_URLCONF = "proj"
    INSTALLED_APPS = ["durable_analytics.contrib.django"]
    DURABLE_ANALYTICS = {
        "write_key": os.environ["WK"], "host": os.environ["HOST"],
        "queue_path": os.environ["QUEUE"], "flush_at": 5000, "flush_interval": 3600,
        "shutdown_timeout": 20,
        "flusher": os.environ.get("FLUSHER", "thread"),
        "on_exit": os.environ.get("ON_EXIT", "flush"),
    }

    def hit(request, n):
        get_client().track(f"user-{n}", "Hit", {"n": n})
        return JsonResponse({"ok": True})

    urlpatterns = [path("hit/<int:n>", hit)]
"""

WSGI = """
    import os
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj")
    from django.core.wsgi import get_wsgi_application
    application = get_wsgi_application()
"""

ASGI = """
    import os
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj")
    from django.core.asgi import get_asgi_application
    from durable_analytics.contrib.asgi import AnalyticsLifespan
    from durable_analytics.contrib.django import get_client
    application = AnalyticsLifespan(get_asgi_application(), get_client())
"""


def _project(tmp_path: Path, collector: Collector, **extra: str) -> dict[str, str]:
    (tmp_path / "proj.py").write_text(textwrap.dedent(PROJECT))
    (tmp_path / "wsgi.py").write_text(textwrap.dedent(WSGI))
    (tmp_path / "asgi.py").write_text(textwrap.dedent(ASGI))
    queue = tmp_path / "q.sqlite3"
    return {
        "WK": WRITE_KEY,
        "HOST": collector.url,
        "QUEUE": str(queue),
        "DJANGO_SETTINGS_MODULE": "proj",
        **extra,
    }


@pytest.mark.parametrize("server_kind", ["gunicorn", "uvicorn"])
def test_django_under_a_real_server_delivers_every_event_on_sigterm(
    tmp_path: Path, collector: Collector, server_kind: str
) -> None:
    """300 requests, SIGTERM: 300 at the collector, once each, none left on disk."""
    env = _project(tmp_path, collector)
    port = free_port()
    if server_kind == "gunicorn":
        argv = ["gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "wsgi:application"]
    else:  # Django has no lifespan: AnalyticsLifespan answers it and closes the client
        argv = ["uvicorn", "asgi:application", "--port", str(port), "--log-level", "warning"]
    events = 300
    with server(argv, tmp_path, env, port) as proc:
        assert get(port, [f"/hit/{n}" for n in range(events)], connections=3) == [200] * events
        assert collector.requests == 0
        stop(proc, signal.SIGTERM)
    ids = collector.message_ids()
    assert (len(ids), max(ids.values())) == (events, 1)
    assert sum(queued_message_ids(Path(env["QUEUE"])).values()) == 0


def _manage(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {**child_env(), **env}
    full["PYTHONPATH"] = f"{tmp_path}:{full['PYTHONPATH']}"
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


TRACK = """
    import django
    django.setup()
    from durable_analytics.contrib.django import get_client
    for n in range(50):
        get_client().track(f"user-{n}", "Backfilled")
"""


def test_manage_py_analytics_status_and_drain_use_the_settings_queue(
    tmp_path: Path, collector: Collector
) -> None:
    """50 queued with no flusher: status shows 50, drain delivers 50, status then shows 0."""
    env = _project(tmp_path, collector, FLUSHER="none", ON_EXIT="none")
    tracked = _manage(tmp_path, env, "shell", "-c", textwrap.dedent(TRACK))
    assert tracked.returncode == 0, tracked.stderr
    assert collector.requests == 0

    status = _manage(tmp_path, env, "analytics", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pending"] == 50

    drain = _manage(tmp_path, env, "analytics", "drain", "--json")
    assert drain.returncode == 0, drain.stderr
    assert json.loads(drain.stdout)["sent"] == 50
    assert len(collector.message_ids()) == 50

    after = _manage(tmp_path, env, "analytics", "status", "--json")
    assert json.loads(after.stdout)["pending"] == 0


def test_manage_py_analytics_passes_exit_codes_and_help_through(
    tmp_path: Path, collector: Collector
) -> None:
    """A drain that cannot deliver exits 1 as the CLI does; --help lists the commands."""
    with Collector() as down:
        down.set_default(500)
        env = _project(tmp_path, down, FLUSHER="none", ON_EXIT="none")
        assert _manage(tmp_path, env, "shell", "-c", textwrap.dedent(TRACK)).returncode == 0
        drain = _manage(tmp_path, env, "analytics", "drain", "--max-retries", "0")
    assert drain.returncode == 1, drain.stderr
    assert "left 50" in drain.stdout
    shown = _manage(tmp_path, env, "analytics", "--help")
    assert shown.returncode == 0
    assert "drain" in shown.stdout
    assert "status" in shown.stdout


def test_a_bad_setting_fails_at_django_start_up(tmp_path: Path, collector: Collector) -> None:
    """A typo in DURABLE_ANALYTICS raises ConfigError when Django starts, not on a request."""
    env = _project(tmp_path, collector, FLUSHER="threads")
    result = _manage(tmp_path, env, "check")
    assert result.returncode != 0
    assert "ConfigError" in result.stderr
    assert "flusher must be one of" in result.stderr
