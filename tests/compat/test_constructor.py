"""Constructor forms, settings attributes and constructor errors, on both libraries."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from durable_analytics.testing import Collector, Reply

from .conftest import WRITE_KEY
from .harness import Lib, differs


def delivered_events(collector: Collector) -> list[str]:
    return [str(m.get("event")) for m in collector.messages()]


def test_write_key_positionally_and_host_by_keyword_delivers(
    lib: Lib, collector: Collector
) -> None:
    """``Client(key, host=url)``: the README's first line works and the message arrives."""
    client = lib.client(WRITE_KEY, host=collector.url)
    ok, msg = client.track("user-1", "Signed Up", {"plan": "Pro"})
    client.flush()
    assert ok is True
    assert msg["event"] == "Signed Up"
    assert delivered_events(collector) == ["Signed Up"]


def test_write_key_by_keyword_delivers(lib: Lib, collector: Collector) -> None:
    """``Client(write_key=key, host=url)`` is the same client."""
    client = lib.client(write_key=WRITE_KEY, host=collector.url)
    client.track("user-1", "E")
    client.flush()
    assert delivered_events(collector) == ["E"]


def test_host_positionally_delivers(lib: Lib, collector: Collector) -> None:
    """``Client(key, url)``: segment's second positional parameter is ``host``."""
    client = lib.client(WRITE_KEY, collector.url)
    client.track("user-1", "Positional Host")
    client.flush()
    assert delivered_events(collector) == ["Positional Host"]


def test_every_segment_parameter_positionally(lib: Lib, collector: Collector) -> None:
    """All 22 of segment's parameters in its positional order are accepted and honoured."""
    client = lib.client(
        WRITE_KEY,
        collector.url,
        False,  # debug
        10000,  # max_queue_size
        True,  # send
        None,  # on_error
        True,  # gzip
        10,  # max_retries
        False,  # sync_mode
        15,  # timeout
        None,  # proxies
        1,  # thread
        100,  # upload_size
        0.5,  # upload_interval
        None,  # log_handler
        None,  # oauth_client_id
        None,  # oauth_client_key
        None,  # oauth_key_id
        "https://oauth2.segment.io",  # oauth_auth_server
        "tracking_api:write",  # oauth_scope
        43200,  # max_total_backoff_duration
        1800,  # max_rate_limit_duration
    )
    client.track("user-1", "All Positional")
    client.flush()
    assert delivered_events(collector) == ["All Positional"]
    # gzip, the seventh positional parameter, reached the wire.
    assert collector.batches[0].headers.get("Content-Encoding") == "gzip"


def test_every_segment_parameter_by_keyword(lib: Lib, collector: Collector) -> None:
    """All of segment's parameters by name, at segment's defaults, are accepted."""
    client = lib.client(
        write_key=WRITE_KEY,
        host=collector.url,
        debug=False,
        max_queue_size=10000,
        send=True,
        on_error=None,
        gzip=False,
        max_retries=10,
        sync_mode=False,
        timeout=15,
        proxies=None,
        thread=1,
        upload_size=100,
        upload_interval=0.5,
        log_handler=None,
        oauth_client_id=None,
        oauth_client_key=None,
        oauth_key_id=None,
        oauth_auth_server="https://oauth2.segment.io",
        oauth_scope="tracking_api:write",
        max_total_backoff_duration=43200,
        max_rate_limit_duration=1800,
    )
    client.track("user-1", "All Keywords")
    client.flush()
    assert delivered_events(collector) == ["All Keywords"]


def on_error_callback(exc: Exception, batch: list[dict[str, Any]]) -> None:
    """An on_error callback for the attribute scenario (never called there)."""


def test_settings_are_attributes_of_the_client(lib: Lib, collector: Collector) -> None:
    """Every setting segment exposes as a ``Client`` attribute reads back as given."""
    proxies = {"https": "http://proxy.invalid:3128"}
    client = lib.client(
        WRITE_KEY,
        host=collector.url,
        debug=True,
        send=True,
        on_error=on_error_callback,
        gzip=True,
        sync_mode=False,
        timeout=3,
        proxies=proxies,
        max_total_backoff_duration=100,
        max_rate_limit_duration=50,
    )
    seen = {
        name: getattr(client, name)
        for name in (
            "write_key",
            "host",
            "debug",
            "send",
            "on_error",
            "gzip",
            "sync_mode",
            "timeout",
            "proxies",
            "max_total_backoff_duration",
            "max_rate_limit_duration",
        )
    }
    assert seen == {
        "write_key": WRITE_KEY,
        "host": collector.url,
        "debug": True,
        "send": True,
        "on_error": on_error_callback,
        "gzip": True,
        "sync_mode": False,
        "timeout": 3,
        "proxies": proxies,
        "max_total_backoff_duration": 100,
        "max_rate_limit_duration": 50,
    }
    assert isinstance(client.log, logging.Logger)
    assert client.log.name == differs(
        lib, "library-name", segment="segment", durable="durable_analytics"
    )
    assert client.log.isEnabledFor(logging.DEBUG)


def test_host_attribute_without_a_host(lib: Lib) -> None:
    """``Client(key).host`` with no host given."""
    client = lib.client(WRITE_KEY, send=False)
    assert client.host == differs(
        lib, "host-attribute", segment=None, durable="https://api.segment.io"
    )


def test_flag_attributes_of_a_default_client(lib: Lib) -> None:
    """``send``/``sync_mode``/``gzip``/``debug``/``on_error`` read back segment's defaults."""
    client = lib.client(WRITE_KEY, send=False)
    assert (client.send, client.sync_mode, client.gzip, client.debug) == (
        False,
        False,
        False,
        False,
    )
    assert client.on_error is None


def test_missing_write_key_raises(lib: Lib) -> None:
    """``Client()`` without a key raises at construction."""
    expected = differs(lib, "validation-error-type", segment=AssertionError, durable=ValueError)
    with pytest.raises(expected):
        lib.client()


def test_write_key_that_is_not_a_string_raises(lib: Lib) -> None:
    """``Client(123)`` raises at construction."""
    expected = differs(lib, "validation-error-type", segment=AssertionError, durable=ValueError)
    with pytest.raises(expected):
        lib.client(123)


@pytest.mark.parametrize("setting", ["max_total_backoff_duration", "max_rate_limit_duration"])
def test_negative_retry_durations_raise_value_error(lib: Lib, setting: str) -> None:
    """A negative retry duration is a ``ValueError`` on both."""
    with pytest.raises(ValueError, match=setting):
        lib.client(WRITE_KEY, send=False, **{setting: -1})


def test_on_error_false_means_no_callback(lib: Lib, collector: Collector) -> None:
    """``on_error=False`` (as segment's own module tests set it) means no callback."""
    client = lib.client(WRITE_KEY, host=collector.url, on_error=False)
    client.track("user-1", "E")
    client.flush()
    assert delivered_events(collector) == ["E"]
    assert not client.on_error


def test_two_sender_threads_deliver_everything_once(lib: Lib, collector: Collector) -> None:
    """``thread=2`` is accepted; 30 messages arrive exactly once each."""
    client = lib.client(WRITE_KEY, host=collector.url, thread=2)
    for i in range(30):
        client.track("user-1", f"E{i}")
    client.flush()
    assert sorted(delivered_events(collector)) == sorted(f"E{i}" for i in range(30))
    assert set(collector.message_ids().values()) == {1}


def test_thread_bounds_the_requests_in_flight(lib: Lib, collector: Collector) -> None:
    """``thread=2`` against a slow server: never more than two requests at once, all arrive.

    segment runs two sender threads; durable-analytics keeps ``max_in_flight=2``.
    """
    collector.set_default(Reply(delay=0.05))
    client = lib.client(WRITE_KEY, host=collector.url, thread=2, upload_size=5)
    for i in range(100):
        client.track("user-1", f"E{i}")
    client.flush()
    assert sorted(delivered_events(collector)) == sorted(f"E{i}" for i in range(100))
    assert 1 <= collector.peak_concurrency <= 2
    if lib.name == "durable":
        assert client.config.max_in_flight == 2


def test_upload_size_bounds_the_batch(lib: Lib, collector: Collector) -> None:
    """``upload_size=2``: no request carries more than two messages; all seven arrive."""
    client = lib.client(WRITE_KEY, host=collector.url, upload_size=2, upload_interval=0.05)
    for i in range(7):
        client.track("user-1", f"E{i}")
    client.flush()
    assert sorted(delivered_events(collector)) == sorted(f"E{i}" for i in range(7))
    assert max(len(b.messages) for b in collector.batches) <= 2


def test_send_false_validates_and_sends_nothing(lib: Lib, collector: Collector) -> None:
    """``send=False``: calls return ``(True, message)``, nothing is sent, bad calls raise."""
    client = lib.client(WRITE_KEY, host=collector.url, send=False)
    ok, msg = client.track("user-1", "E")
    client.flush()
    assert ok is True
    assert msg["event"] == "E"
    assert collector.requests == 0
    expected = differs(lib, "validation-error-type", segment=AssertionError, durable=ValueError)
    with pytest.raises(expected):
        client.track("user-1", 123)


def test_an_empty_write_key_with_send_false_is_a_quiet_development_client(
    lib: Lib, collector: Collector
) -> None:
    """``write_key=os.environ.get("KEY", "")`` with ``send=False`` (a development setup):
    calls return ``(True, message)`` and flush returns; durable-analytics raised
    ``ConfigError`` from every call."""
    client = lib.client("", host=collector.url, send=False)
    ok, msg = client.track("user-1", "E")
    client.flush()
    assert ok is True
    assert msg["event"] == "E"
    assert collector.requests == 0


@pytest.mark.parametrize(
    ("flags", "sends"),
    [
        ({"send": 1, "gzip": 0, "debug": 0}, True),
        ({"send": None}, False),
        ({"send": 0}, False),
        ({"send": 2, "sync_mode": 0}, True),
    ],
)
def test_flags_are_read_as_truthy_or_falsy(
    lib: Lib, collector: Collector, flags: dict[str, Any], sends: bool
) -> None:
    """segment keeps ``send``, ``gzip``, ``sync_mode``, ``debug`` as given and reads them
    as truthy or falsy (``send=None`` sends nothing); durable-analytics refused anything
    but a bool, and took ``send=None`` for its default, True."""
    client = lib.client(WRITE_KEY, host=collector.url, **flags)
    assert client.track("user-1", "E")[0] is True
    client.flush()
    assert (collector.requests > 0) == sends


def test_a_string_flag_is_refused_rather_than_read_as_truthy(
    lib: Lib, collector: Collector
) -> None:
    """``send="false"`` (a setting read from the environment): segment reads it as truthy
    and sends; durable-analytics refuses it."""
    refused = differs(lib, "string-flags", segment=False, durable=True)
    if refused:
        with pytest.raises(ValueError, match="send must be True or False"):
            lib.client(WRITE_KEY, host=collector.url, send="false")
        return
    client = lib.client(WRITE_KEY, host=collector.url, send="false")
    client.track("user-1", "E")
    client.flush()
    assert collector.requests == 1


def test_log_handler_receives_the_librarys_records(lib: Lib, collector: Collector) -> None:
    """``log_handler`` is attached to the library's logger and gets its children's records."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    client = lib.client(WRITE_KEY, host=collector.url, debug=True, log_handler=Keep())
    client.track("user-1", "E")
    client.flush()
    assert records
    name = differs(lib, "library-name", segment="segment", durable="durable_analytics")
    assert all(r.name == name or r.name.startswith(name + ".") for r in records), {
        r.name for r in records
    }


def test_default_timeout(lib: Lib) -> None:
    """``Client(key).timeout``: the request timeout when none is given."""
    client = lib.client(WRITE_KEY, send=False)
    assert client.timeout == differs(lib, "durable-defaults", segment=15, durable=10.0)


def test_a_connect_and_read_timeout_pair_is_accepted_and_delivers(
    lib: Lib, collector: Collector
) -> None:
    """``timeout=(2, 5)``, requests' (connect, read) form that segment passes through:
    the client is built and delivers; our one bound of a request is their sum."""
    client = lib.client(WRITE_KEY, host=collector.url, timeout=(2, 5))
    assert client.timeout == differs(lib, "timeout-pair", segment=(2, 5), durable=7.0)
    client.track("user-1", "Paired")
    client.flush()
    assert delivered_events(collector) == ["Paired"]


@pytest.mark.parametrize("pair", [(1, 2, 3), (1, None), (0, 5), ("1", 5), (1, float("inf"))])
def test_a_timeout_pair_that_is_not_two_positive_numbers_is_refused(
    tmp_path: Any, pair: tuple[Any, ...]
) -> None:
    """Ours only (segment fails at the first request instead): a ``ConfigError``, a
    ``ValueError``, at construction, naming ``timeout``; the queue file is not created."""
    import durable_analytics
    from durable_analytics.exceptions import ConfigError

    path = tmp_path / "q.sqlite3"
    with pytest.raises(ConfigError, match="timeout") as caught:
        durable_analytics.Client(WRITE_KEY, queue_path=path, timeout=pair)
    assert isinstance(caught.value, ValueError)
    assert not path.exists()


def test_max_queue_size_zero_means_no_limit(lib: Lib, collector: Collector) -> None:
    """``max_queue_size=0`` is segment's (``queue.Queue``'s) "no limit": nothing is dropped."""
    client = lib.client(WRITE_KEY, host=collector.url, max_queue_size=0)
    results = [client.track("user-1", f"E{i}")[0] for i in range(5)]
    client.flush()
    assert results == [True] * 5
    assert len(collector.messages()) == 5
