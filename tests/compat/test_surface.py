"""The API surface: segment's signature and names on ours, and every setting at module level."""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

import pytest
import segment.analytics as segment_analytics

import durable_analytics
from durable_analytics import Client
from durable_analytics._config import SEGMENT_PARAMETERS, Config, Settings
from durable_analytics._default import SETTINGS
from durable_analytics.exceptions import (
    APIError,
    ConfigError,
    ConfigurationRejected,
    DeliveryError,
    MessageRejected,
    RetryableError,
)

from .conftest import WRITE_KEY
from .harness import Lib, differs


def positional(function: Any) -> list[str]:
    return [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name != "self"
    ]


def test_client_takes_segments_parameters_in_segments_order() -> None:
    """``Client``'s positional parameters are segment's 22, by name and order, then ours."""
    assert positional(Client.__init__) == positional(segment_analytics.Client.__init__)
    assert tuple(positional(Client.__init__)) == SEGMENT_PARAMETERS


@pytest.mark.parametrize("call", ["identify", "track", "page", "screen", "group", "alias"])
def test_calls_take_segments_parameters_in_segments_order(call: str) -> None:
    """Every call (on Client and at module level) has segment's parameter list."""
    expected = positional(getattr(segment_analytics.Client, call))
    assert positional(getattr(Client, call)) == expected
    assert positional(getattr(durable_analytics, call)) == expected


def test_every_setting_is_a_segment_parameter_or_a_keyword_setting() -> None:
    """``Settings`` (keyword-only) and segment's parameters together are every Config field."""
    config_fields = {f.name for f in fields(Config)}
    ours = set(Settings.__annotations__)
    assert not ours & set(SEGMENT_PARAMETERS)
    # thread, upload_size and upload_interval are segment's names for settings we have.
    assert config_fields == ours | set(SEGMENT_PARAMETERS) - {
        "thread",
        "upload_size",
        "upload_interval",
    }


@pytest.mark.parametrize("name", SETTINGS)
def test_every_client_setting_is_a_module_attribute(name: str) -> None:
    """Each setting has a module-level attribute to set before the first call."""
    assert hasattr(durable_analytics, name)


@pytest.mark.parametrize("lib", ["durable"], indirect=True)
@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("flush_at", 7, "flush_at"),
        ("flush_interval", 0.25, "flush_interval"),
        ("flusher", "none", "flusher"),
        ("on_exit", "none", "on_exit"),
        ("shutdown_timeout", 0.5, "shutdown_timeout"),
        ("durability", "full", "durability"),
        ("max_queue_bytes", 1 << 20, "max_queue_bytes"),
        ("overflow", "drop_oldest", "overflow"),
        ("lease_timeout", 30.0, "lease_timeout"),
        ("upload_size", 9, "flush_at"),
        ("max_queue_size", 50, "max_queue_size"),
        ("max_total_backoff_duration", 5.0, "max_total_backoff_duration"),
    ],
)
def test_module_setting_reaches_the_default_client(
    lib: Lib, name: str, value: object, field: str
) -> None:
    """``analytics.<setting> = value`` before the first call configures the default client."""
    analytics = lib.module
    analytics.write_key = WRITE_KEY
    analytics.send = False
    setattr(analytics, name, value)
    analytics.track("u", "E")
    assert getattr(analytics.default_client.config, field) == value


@pytest.mark.parametrize("lib", ["durable"], indirect=True)
def test_unknown_module_setting_names_the_closest(lib: Lib, monkeypatch: Any) -> None:
    """A typo is reported at the first call with the setting it resembles."""
    monkeypatch.setattr(lib.module, "shutdown_timout", 1, raising=False)
    lib.module.write_key = WRITE_KEY
    with pytest.raises(ConfigError, match=r"shutdown_timout \(did you mean shutdown_timeout\?\)"):
        lib.module.track("u", "E")
    assert lib.module.default_client is None


def test_unknown_client_keyword_names_the_closest() -> None:
    """``Client(key, flush_intervall=1)``: a TypeError-free ``ConfigError`` naming the fix."""
    with pytest.raises(ConfigError, match="did you mean flush_interval"):
        Client(WRITE_KEY, send=False, flush_intervall=1)  # type: ignore[call-arg]


def test_api_error_is_a_delivery_error_with_segments_attributes() -> None:
    """``APIError`` is exported, a ``DeliveryError``, with ``status``, ``code``, ``message``."""
    error = APIError("HTTP 500 from h", status=500, code="retryable", message="down")
    assert isinstance(error, DeliveryError)
    assert (error.status, error.code, error.message) == (500, "retryable", "down")
    assert str(error) == "HTTP 500 from h"
    assert durable_analytics.APIError is APIError


@pytest.mark.parametrize(
    ("status", "answer", "code", "message"),
    [
        (500, '{"code": "boom", "message": "it broke"}', "boom", "it broke"),
        (400, '{"success": false, "code": 400, "message": "bad"}', 400, "bad"),
        (500, '{"success": true}', "unknown", '{"success": true}'),
        (503, "upstream down", "unknown", "upstream down"),
        (502, "[1, 2]", "unknown", "[1, 2]"),
        (500, '"text"', "unknown", '"text"'),
        (500, "", "unknown", ""),
        (307, "moved", "redirect", "Temporary Redirect"),
    ],
    ids=["json", "int-code", "json-without-code", "text", "json-list", "json-str", "empty", "3xx"],
)
def test_api_error_reads_code_and_message_from_the_answer_as_segment_does(
    status: int, answer: str, code: object, message: str
) -> None:
    """Built from an answer, ``code``/``message`` are the JSON's, else ``"unknown"`` and the text.

    The same rules as segment's ``request.post`` (checked against it in test_delivery.py
    with a real server); a 3xx is ``"redirect"`` and the reason phrase.
    """
    for kind in (APIError, RetryableError, MessageRejected, ConfigurationRejected):
        error = kind(f"HTTP {status} from h", status=status, excerpt=answer)
        assert (error.status, error.code, error.message) == (status, code, message)
        assert str(error) == f"HTTP {status} from h"


def test_every_exception_on_error_gets_is_an_api_error() -> None:
    """Retryable, rejected and refused batches are all ``APIError``s; no answer: ``network``."""
    for kind in (RetryableError, MessageRejected, ConfigurationRejected):
        assert issubclass(kind, APIError)
    error = RetryableError("cannot connect to h: refused; kept")
    assert (error.status, error.code, error.message) == (
        None,
        "network",
        "cannot connect to h: refused; kept",
    )
    refused = ConfigurationRejected("the OAuth token endpoint answered HTTP 401 (bad key)")
    assert (refused.status, refused.code) == (None, "configuration")


def test_settings_attributes_are_read_only(lib: Lib) -> None:
    """Assigning ``client.host``: segment takes it (its sender never sees it); we refuse."""
    client = lib.client(WRITE_KEY, send=False)
    if differs(lib, "settings-read-only", segment=False, durable=True):
        with pytest.raises(AttributeError):
            client.host = "https://elsewhere.example"
    else:
        client.host = "https://elsewhere.example"
