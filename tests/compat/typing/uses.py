"""Uses of the public API that mypy --strict must accept, and mistakes it must catch.

A line ending in ``# E: <code>`` must get exactly that mypy error; every other line none.
Checked by ``tests/compat/test_typing.py``; never imported or run.
"""

from __future__ import annotations

from typing import Any

import durable_analytics as analytics
from durable_analytics import Client


def report(exc: Exception, batch: list[dict[str, Any]]) -> None:
    """An on_error callback."""


# Module-level settings.
analytics.write_key = "WRITE_KEY"
analytics.host = "https://api.segment.io"
analytics.on_error = report
analytics.on_error = False
analytics.sync_mode = True
analytics.max_queue_size = 10_000
analytics.flusher = "none"
analytics.on_exit = "spawn"
analytics.flush_at = 100
analytics.flusher = "nonee"  # E: assignment
analytics.timeout = "10"  # E: assignment
analytics.on_exit = "flushh"  # E: assignment

# Module-level calls.
ok, message = analytics.track("user-1", "Signed Up", {"plan": "Pro"})
analytics.identify("user-1", {"email": "a@example.com"})
analytics.page("user-1", "Docs", "Install")
analytics.group("user-1", "group-1", {"name": "Acme"})
analytics.alias("anon-1", "user-1")
analytics.track(user_id="user-1", event="E", context={"ip": "1.2.3.4"})
analytics.track("user-1", 123)  # E: arg-type
analytics.track(user_id="user-1", evnt="E")  # E: call-arg
analytics.identify("user-1", traits=["not", "a", "dict"])  # E: arg-type
analytics.screen("user-1", name=5)  # E: arg-type
analytics.alias("anon-1", "user-1", connection=None)
analytics.flush()
analytics.flush(timeout="5")  # E: arg-type
analytics.shutdown()
still_queued: int = analytics.flush(2.0).pending
queued_count: str = analytics.stats().pending  # E: assignment
flag: bool = ok
text: str = message  # E: assignment

# The Client.
client = Client("WRITE_KEY", "https://api.segment.io", flusher="none", on_exit="none")
Client("WRITE_KEY", host="https://h", max_queue_size=5, on_error=False, upload_size=10)
Client("WRITE_KEY", flusher="nonee")  # E: arg-type
Client("WRITE_KEY", durability="fulll")  # E: arg-type
Client("WRITE_KEY", timeout="10")  # E: arg-type
client.track("user-1", "Signed Up", {"plan": "Pro"})
client.track("user-1", 123)  # E: arg-type
client.track("user-1", "E", properties="x")  # E: arg-type
client.page("user-1", name=5)  # E: arg-type
host: str = client.host
