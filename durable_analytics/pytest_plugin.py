"""A pytest plugin: a real collector and a client whose deliveries a test can assert on.

Installed with the package (the ``pytest11`` entry point), so the fixtures are there in
every test; with plugin autoloading off, add ``pytest_plugins =
["durable_analytics.pytest_plugin"]`` to the top ``conftest.py``::

    import durable_analytics as analytics

    def sign_up(user_id):
        analytics.track(user_id, "Signed Up", {"plan": "Pro"})

    def test_sign_up_is_tracked(analytics_events):
        sign_up("u1")
        analytics_events.assert_tracked("Signed Up", user_id="u1", properties={"plan": "Pro"})

Fixtures:

- ``collector``: a running ``durable_analytics.testing.Collector`` on 127.0.0.1 (any write
  key accepted).
- ``analytics_client``: a ``Client`` that sends to ``collector``, its queue in a temporary
  directory of its own (not the test's ``tmp_path``). It is also the module-level default
  client for the test, so ``durable_analytics.track(...)`` lands there too. Nothing is sent
  until it is flushed.
- ``analytics_events``: an ``AnalyticsEvents`` recorder over both, with ``messages()``,
  ``events``, ``assert_tracked()``, ``assert_sent()`` and ``assert_not_sent()``; each
  flushes the client first, so what the code under test queued is what they see.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from durable_analytics import Client
    from durable_analytics.testing import Collector

__all__ = ["WRITE_KEY", "AnalyticsEvents"]

#: The write key of the ``analytics_client`` fixture.
WRITE_KEY = "pytest-write-key"

# The Python keyword names of the calls, and the wire names they travel under.
_WIRE_NAMES = {
    "user_id": "userId",
    "anonymous_id": "anonymousId",
    "group_id": "groupId",
    "previous_id": "previousId",
    "message_id": "messageId",
}


def _matches(message: dict[str, Any], fields: dict[str, Any]) -> bool:
    for name, expected in fields.items():
        key = _WIRE_NAMES.get(name, name)
        if key not in message:
            return False
        actual = message[key]
        if isinstance(expected, dict) and isinstance(actual, dict):
            # A dict (properties, traits, context) matches when it holds these keys.
            if any(k not in actual or actual[k] != v for k, v in expected.items()):
                return False
        elif actual != expected:
            return False
    return True


def _describe(message: dict[str, Any]) -> str:
    shown = {
        k: message[k]
        for k in ("type", "event", "name", "userId", "anonymousId", "groupId", "previousId")
        if message.get(k) is not None
    }
    for k in ("properties", "traits"):
        if message.get(k):
            shown[k] = message[k]
    return json.dumps(shown, sort_keys=True, default=str)


class AnalyticsEvents:
    """What a test's code sent through ``client`` to ``collector``, and assertions on it.

    Field names in the helpers are the calls' keyword names (``user_id``, ``properties``)
    or the wire names (``userId``); a dict value matches when the message's dict holds
    those keys with those values.
    """

    def __init__(self, client: Client, collector: Collector, *, timeout: float = 10.0) -> None:
        self.client = client
        self.collector = collector
        self.timeout = timeout

    def messages(self, type: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """Flush the client, then every delivered message matching ``type`` and ``fields``."""
        self.client.flush(timeout=self.timeout)
        if type is not None:
            fields["type"] = type
        return [m for m in self.collector.messages() if _matches(m, fields)]

    @property
    def events(self) -> list[str]:
        """The names of the track events delivered so far, in order."""
        return [str(m.get("event")) for m in self.messages("track")]

    def assert_sent(self, type: str | None = None, **fields: Any) -> dict[str, Any]:
        """Assert exactly one delivered message matches; return it."""
        found = self.messages(type, **fields)
        if len(found) != 1:
            wanted = json.dumps({"type": type, **fields}, sort_keys=True, default=str)
            sent = "\n  ".join(_describe(m) for m in self.collector.messages()) or "(nothing)"
            raise AssertionError(
                f"expected one message matching {wanted}, found {len(found)}; sent:\n  {sent}"
            )
        return found[0]

    def assert_tracked(self, event: str, **fields: Any) -> dict[str, Any]:
        """Assert exactly one track call of ``event`` (with ``fields``) was delivered."""
        return self.assert_sent("track", event=event, **fields)

    def assert_not_sent(self, type: str | None = None, **fields: Any) -> None:
        """Assert no delivered message matches (with no arguments: nothing was sent at all)."""
        found = self.messages(type, **fields)
        if found:
            shown = "\n  ".join(_describe(m) for m in found)
            raise AssertionError(f"expected no such message, found {len(found)}:\n  {shown}")

    def clear(self) -> None:
        """Deliver what is queued, then forget everything received so far."""
        self.client.flush(timeout=self.timeout)
        self.collector.reset()


@pytest.fixture
def collector() -> Iterator[Collector]:
    """A running Segment-compatible collector on 127.0.0.1 (``.url``, ``.messages()``)."""
    from durable_analytics.testing import Collector

    with Collector() as running:
        yield running


@pytest.fixture
def analytics_client(
    collector: Collector,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Client]:
    """A Client sending to ``collector`` on flush, also the module-level default client."""
    import durable_analytics
    from durable_analytics import Client

    # A directory of its own, so the test's tmp_path holds only what the test wrote.
    directory = tmp_path_factory.mktemp("durable-analytics")
    directory.chmod(0o700)
    client = Client(
        WRITE_KEY,
        host=collector.url,
        queue_path=directory / "queue.sqlite3",
        flusher="none",
        on_exit="none",
    )
    monkeypatch.setattr(durable_analytics, "default_client", client)
    try:
        yield client
    finally:
        client.close(timeout=0)


@pytest.fixture
def analytics_events(analytics_client: Client, collector: Collector) -> AnalyticsEvents:
    """The messages the test's code sent, with ``assert_tracked`` and friends."""
    return AnalyticsEvents(analytics_client, collector)
