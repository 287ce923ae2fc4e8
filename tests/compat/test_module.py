"""The module-level API (``import … as analytics``): settings, calls, flush/join/shutdown."""

from __future__ import annotations

import logging
import textwrap

import pytest
from conftest import run_python

from durable_analytics.testing import Collector

from .conftest import WRITE_KEY
from .harness import Lib, differs


def configure(lib: Lib, collector: Collector) -> None:
    """What a user writes once at start-up."""
    lib.module.write_key = WRITE_KEY
    lib.module.host = collector.url


def test_module_settings_then_calls_deliver_in_order(lib: Lib, collector: Collector) -> None:
    """Settings as module attributes, then the six calls positionally, then ``flush()``."""
    analytics = lib.module
    configure(lib, collector)
    results = [
        analytics.identify("u1", {"email": "a@example.com"}),
        analytics.track("u1", "Signed Up", {"plan": "Pro"}),
        analytics.page("u1", "Docs", "Install"),
        analytics.screen("u1", "Onboarding", "Welcome"),
        analytics.group("u1", "g1", {"name": "Acme"}),
        analytics.alias("anon-1", "u1"),
    ]
    flushed = analytics.flush()
    assert [ok for ok, _ in results] == [True] * 6
    arrived = collector.messages()
    assert [m["type"] for m in arrived] == ["identify", "track", "page", "screen", "group", "alias"]
    assert [m["messageId"] for m in arrived] == [msg["messageId"] for _, msg in results]
    expected_flush = differs(lib, "flush-result", segment=type(None), durable=object)
    assert isinstance(flushed, expected_flush)


def test_module_calls_by_keyword(lib: Lib, collector: Collector) -> None:
    """The module functions take segment's parameter names."""
    analytics = lib.module
    configure(lib, collector)
    analytics.track(user_id="u1", event="E", properties={"a": 1}, context={"ip": "1.2.3.4"})
    analytics.page(anonymous_id="a1", name="Home", category="Site")
    analytics.group(user_id="u1", group_id="g", traits={"n": 1})
    analytics.alias(previous_id="p", user_id="u1")
    analytics.flush()
    arrived = collector.messages()
    assert [m["type"] for m in arrived] == ["track", "page", "group", "alias"]
    assert arrived[0]["context"]["ip"] == "1.2.3.4"
    assert (arrived[1]["name"], arrived[1]["category"]) == ("Home", "Site")


def test_module_default_client_is_built_on_first_use(lib: Lib, collector: Collector) -> None:
    """``default_client`` is None until the first call, then a ``Client``."""
    analytics = lib.module
    configure(lib, collector)
    assert analytics.default_client is None
    analytics.track("u1", "E")
    assert isinstance(analytics.default_client, lib.Client)


def test_module_settings_reach_the_default_client(lib: Lib, collector: Collector) -> None:
    """Module settings show up as the default client's attributes."""
    analytics = lib.module
    configure(lib, collector)
    analytics.gzip = True
    analytics.timeout = 7
    analytics.track("u1", "E")
    client = analytics.default_client
    assert (client.write_key, client.host, client.gzip, client.timeout) == (
        WRITE_KEY,
        collector.url,
        True,
        7,
    )


def test_module_send_false_sends_nothing(lib: Lib, collector: Collector) -> None:
    """``analytics.send = False``: calls succeed, nothing reaches the server."""
    analytics = lib.module
    configure(lib, collector)
    analytics.send = False
    ok, _ = analytics.track("u1", "E")
    analytics.flush()
    assert ok is True
    assert collector.requests == 0


def test_module_gzip_reaches_the_wire(lib: Lib, collector: Collector) -> None:
    """``analytics.gzip = True`` compresses the requests."""
    analytics = lib.module
    configure(lib, collector)
    analytics.gzip = True
    analytics.track("u1", "E")
    analytics.flush()
    assert collector.batches[0].headers["Content-Encoding"] == "gzip"


def test_module_on_error_false_is_no_callback(lib: Lib, collector: Collector) -> None:
    """``analytics.on_error = False`` (segment's own tests set it so) is accepted."""
    analytics = lib.module
    configure(lib, collector)
    analytics.on_error = False
    analytics.track("u1", "E")
    analytics.flush()
    assert [m["event"] for m in collector.messages()] == ["E"]


def test_module_debug_and_log_handler(lib: Lib, collector: Collector) -> None:
    """``analytics.debug`` and ``analytics.log_handler`` reach the library's logger."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    analytics = lib.module
    configure(lib, collector)
    analytics.debug = True
    analytics.log_handler = Keep()
    analytics.track("u1", "E")
    analytics.flush()
    name = differs(lib, "library-name", segment="segment", durable="durable_analytics")
    assert logging.getLogger(name).isEnabledFor(logging.DEBUG)
    # segment defines analytics.log_handler but never passes it to its client.
    assert any(r.levelno == logging.DEBUG for r in records) is differs(
        lib, "module-log-handler", segment=False, durable=True
    )


def test_module_shutdown_delivers_everything(lib: Lib, collector: Collector) -> None:
    """``analytics.shutdown()`` returns None once everything queued is delivered."""
    analytics = lib.module
    configure(lib, collector)
    for i in range(5):
        analytics.track("u1", f"E{i}")
    assert analytics.shutdown() is None
    assert sorted(m["event"] for m in collector.messages()) == [f"E{i}" for i in range(5)]


def test_module_flush_then_join_return_none(lib: Lib, collector: Collector) -> None:
    """``flush()`` then ``join()``: delivered, and ``join()`` returns None."""
    analytics = lib.module
    configure(lib, collector)
    analytics.track("u1", "E")
    analytics.flush()
    assert analytics.join() is None
    assert [m["event"] for m in collector.messages()] == ["E"]


def test_misspelled_module_setting(
    lib: Lib, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``analytics.flush_intervall = 1`` (a typo) at the first call."""
    analytics = lib.module
    configure(lib, collector)
    monkeypatch.setattr(analytics, "flush_intervall", 1, raising=False)
    if differs(lib, "unknown-module-setting", segment=False, durable=True):
        with pytest.raises(ValueError, match="flush_interval"):
            analytics.track("u1", "E")
    else:
        assert analytics.track("u1", "E")[0] is True


@pytest.mark.parametrize("status", [500, 401])
def test_module_flush_returns_during_an_outage(lib: Lib, collector: Collector, status: int) -> None:
    """The usual end of a cron script, ``analytics.flush()``, returns while the server fails.

    Run in a child process so that a flush that never returns is killed, not leaked.
    """
    collector.set_default(status)
    code = f"""
        import {lib.module.__name__} as analytics
        analytics.write_key = {WRITE_KEY!r}
        analytics.host = {collector.url!r}
        analytics.max_retries = 1
        analytics.track("u1", "E")
        analytics.flush()
        print("flush returned")
    """
    result = run_python(textwrap.dedent(code), timeout=20)
    assert "flush returned" in result.stdout, result.stderr[-2000:]
