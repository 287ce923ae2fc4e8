"""Compatibility with segment-analytics-python 2.4.0 (``segment.analytics``).

The same calls made through segment's ``Client(send=False)``, through our
``Client(send=False)`` and through ``_messages`` (the stored body) must give messages with
the same fields and values, except ``messageId``, ``timestamp``, ``sentAt``,
``context.library`` and ``writeKey`` (which we never put in a body).

Segment keeps datetimes inside properties as ``datetime`` objects and serializes them only
when it posts, with its ``DatetimeSerializer`` (``obj.isoformat()``); its messages are
compared after that same JSON round trip.

Intentional differences are rows of ``differences.py`` (the README's compatibility table);
each ``test_difference_*`` below names its row with ``@pytest.mark.difference(key)``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import uuid
from collections.abc import Callable, Iterator
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum, IntEnum
from fractions import Fraction
from typing import Any

import numpy
import pytest
import segment.analytics as segment_analytics
from segment.analytics.request import DatetimeSerializer
from segment.analytics.utils import guess_timezone

import durable_analytics
from durable_analytics import _messages
from durable_analytics.exceptions import MessageTooLarge, ValidationError

IGNORED = ("messageId", "timestamp", "sentAt", "writeKey")
FIXED_TS = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
FIXED_ID = "00000000-0000-4000-8000-000000000000"


class Color(Enum):
    RED = "red"


class Level(IntEnum):
    HIGH = 3


RICH = {
    "plan": "Enterprise",
    "seats": 25,
    "price": Decimal("129.99"),
    "ratio": 0.25,
    "tags": ("a", "b"),
    "ids": {3, 1, 2},
    "color": Color.RED,
    "level": Level.HIGH,
    "on": date(2024, 2, 29),
    "none": None,
    "trial": False,
    "nested": {"list": [1, [2, {"k": "v"}]], "empty": {}},
    1: "int key",
    2.5: "float key",
    "bytes": "café".encode(),
    "text": "naïve 😀 \x00 \u2028",
}
CONTEXT = {"ip": "203.0.113.5", "app": {"name": "shop", "version": "1.2"}, "locale": "fr-FR"}
INTEGRATIONS = {"All": False, "Mixpanel": True, "Amplitude": {"session_id": 5}}

# (call, args, kwargs): every call, with and without each optional part.
CASES: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("identify", ("user-1", {"email": "a@example.com", "age": 30}), {}),
    ("identify", (123, {"name": "Numeric"}), {}),
    ("identify", (), {"anonymous_id": "anon-1", "traits": {"plan": "free"}}),
    ("identify", (), {"anonymous_id": 456}),
    ("identify", ("u", RICH, CONTEXT, FIXED_TS, "anon", INTEGRATIONS, "msg-1"), {}),
    ("track", ("user-1", "Signed Up", {"plan": "Enterprise"}), {}),
    ("track", (42, "Order Completed", RICH), {}),
    ("track", (4.5, "Float Id"), {}),
    ("track", (Decimal("12.50"), "Decimal Id"), {}),
    ("track", (), {"anonymous_id": "anon-1", "event": "Anonymous"}),
    ("track", ("u", "E", RICH, CONTEXT, FIXED_TS, "anon", INTEGRATIONS, "msg-2"), {}),
    ("track", ("u", "E"), {"context": CONTEXT, "integrations": INTEGRATIONS}),
    ("page", ("user-1", "Docs", "Install", {"url": "https://example.com/docs"}), {}),
    ("page", ("user-1",), {}),
    ("page", (), {"anonymous_id": "anon-1", "name": "Home"}),
    ("page", ("u", "C", "N", RICH, CONTEXT, FIXED_TS, "anon", INTEGRATIONS, "msg-3"), {}),
    ("screen", ("user-1", "Onboarding", "Welcome", {"step": 1}), {}),
    ("screen", (7,), {"name": "Settings"}),
    ("screen", ("u", "C", "N", RICH, CONTEXT, FIXED_TS, "anon", INTEGRATIONS, "msg-4"), {}),
    ("group", ("user-1", "group-1", {"name": "Acme", "employees": 100}), {}),
    ("group", ("user-1", 42), {}),
    ("group", (), {"anonymous_id": "anon-1", "group_id": "g", "traits": {"plan": "pro"}}),
    ("group", ("u", "g", RICH, CONTEXT, FIXED_TS, "anon", INTEGRATIONS, "msg-5"), {}),
    ("alias", ("anon-1", "user-1"), {}),
    ("alias", (1, 2), {}),
    ("alias", ("p", "u", CONTEXT, FIXED_TS, INTEGRATIONS, "msg-6"), {}),
]
CASE_IDS = [f"{call}-{i}" for i, (call, _, _) in enumerate(CASES)]


def segment_wire(msg: dict[str, Any]) -> Any:
    """Segment's message as its ``post`` serializes it (``DatetimeSerializer``: isoformat)."""
    return json.loads(json.dumps(msg, cls=DatetimeSerializer))


def comparable(msg: Any) -> dict[str, Any]:
    """The message without the fields allowed to differ."""
    out = {k: v for k, v in msg.items() if k not in IGNORED}
    out["context"] = {k: v for k, v in out["context"].items() if k != "library"}
    return out


@pytest.fixture
def segment_client() -> segment_analytics.Client:
    return segment_analytics.Client("k", send=False)


@pytest.fixture
def our_client() -> Iterator[durable_analytics.Client]:
    client = durable_analytics.Client("k", send=False)
    yield client
    client.close()


def call_all(
    segment_client: Any, our_client: Any, call: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The message from segment, from our Client, and our stored body, parsed.

    Each gets its own deep copy of the arguments: segment mutates the caller's context.
    """
    ok, seg = getattr(segment_client, call)(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    assert ok is True
    ok, ours = getattr(our_client, call)(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    assert ok is True
    _, body = getattr(_messages, call)(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    return seg, ours, json.loads(body)


@pytest.mark.parametrize(("call", "args", "kwargs"), CASES, ids=CASE_IDS)
def test_same_call_gives_the_same_message_as_segment(
    segment_client: Any,
    our_client: Any,
    call: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    seg, ours, stored = call_all(segment_client, our_client, call, args, kwargs)
    expected = comparable(segment_wire(seg))
    assert comparable(json.loads(json.dumps(ours))) == expected
    assert comparable(stored) == expected
    # Not just the same values: the same set of fields, nulls included.
    assert set(stored) == set(segment_wire(seg))


@pytest.mark.parametrize(("call", "args", "kwargs"), CASES, ids=CASE_IDS)
def test_given_message_id_and_aware_timestamp_are_sent_as_segment_sends_them(
    segment_client: Any,
    our_client: Any,
    call: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    seg, ours, stored = call_all(segment_client, our_client, call, args, kwargs)
    if FIXED_TS in args:
        assert stored["timestamp"] == ours["timestamp"] == seg["timestamp"]
        assert stored["timestamp"] == "2024-05-06T07:08:09.123+00:00"
    if any(isinstance(a, str) and a.startswith("msg-") for a in args):
        assert stored["messageId"] == ours["messageId"] == seg["messageId"]


def test_numeric_user_ids_become_strings_like_segment(segment_client: Any, our_client: Any) -> None:
    seg, ours, stored = call_all(segment_client, our_client, "track", (42, "E"), {})
    assert seg["userId"] == ours["userId"] == stored["userId"] == "42"
    seg, ours, stored = call_all(segment_client, our_client, "group", ("u", 42), {})
    assert seg["groupId"] == ours["groupId"] == stored["groupId"] == 42


# --------------------------------------------------------------------------- differences


@pytest.mark.difference("naive-timestamp-utc")
def test_difference_naive_timestamp_is_utc_here_segment_may_guess_local(
    segment_client: Any, our_client: Any
) -> None:
    # Segment: a naive datetime within 5 s of datetime.now() is taken as local time.
    now = datetime.now()
    assert guess_timezone(now).tzinfo is not None
    assert guess_timezone(now).tzinfo.utcoffset(now) == datetime.now().astimezone().utcoffset()
    ours = our_client.track("u", "E", timestamp=now)[1]["timestamp"]
    assert ours == now.isoformat(timespec="milliseconds") + "+00:00"
    # An older naive datetime: segment falls back to UTC, so both agree.
    old = datetime(2020, 1, 2, 3, 4, 5, 678000)
    seg = segment_client.track("u", "E", timestamp=old)[1]["timestamp"]
    assert seg == our_client.track("u", "E", timestamp=old)[1]["timestamp"]
    assert seg == "2020-01-02T03:04:05.678+00:00"


@pytest.mark.difference("datetime-values-format")
def test_difference_datetimes_in_properties_have_milliseconds_and_an_offset(
    segment_client: Any, our_client: Any
) -> None:
    props = {"aware": FIXED_TS, "naive": datetime(2024, 5, 6, 7, 8, 9, 123456)}
    seg = segment_wire(segment_client.track("u", "E", props)[1])["properties"]
    ours = our_client.track("u", "E", props)[1]["properties"]
    assert seg == {
        "aware": "2024-05-06T07:08:09.123456+00:00",
        "naive": "2024-05-06T07:08:09.123456",
    }
    assert ours == {
        "aware": "2024-05-06T07:08:09.123+00:00",
        "naive": "2024-05-06T07:08:09.123+00:00",
    }


@pytest.mark.difference("validation-error-type")
def test_difference_validation_raises_value_error_not_assertion_error(
    segment_client: Any, our_client: Any
) -> None:
    with pytest.raises(AssertionError):
        segment_client.track(None, "E")
    with pytest.raises(ValidationError) as info:
        our_client.track(None, "E")
    assert isinstance(info.value, ValueError)
    assert not isinstance(info.value, AssertionError)


@pytest.mark.difference("id-types")
def test_difference_bool_ids_are_rejected(segment_client: Any, our_client: Any) -> None:
    assert segment_client.track(True, "E")[1]["userId"] == "True"
    with pytest.raises(ValidationError, match="user_id must be a string or a number"):
        our_client.track(True, "E")


@pytest.mark.difference("id-types")
def test_difference_user_id_zero_and_uuid_are_accepted(
    segment_client: Any, our_client: Any
) -> None:
    with pytest.raises(AssertionError):
        segment_client.track(0, "E")
    assert our_client.track(0, "E")[1]["userId"] == "0"
    with pytest.raises(AssertionError):
        segment_client.track(uuid.UUID(FIXED_ID), "E")
    assert our_client.track(uuid.UUID(FIXED_ID), "E")[1]["userId"] == FIXED_ID


@pytest.mark.difference("empty-required-ids")
def test_difference_empty_group_id_and_previous_id_are_rejected(
    segment_client: Any, our_client: Any
) -> None:
    assert segment_client.group("u", "")[1]["groupId"] == ""
    assert segment_client.alias("", "u")[1]["previousId"] == ""
    with pytest.raises(ValidationError, match="group_id is required"):
        our_client.group("u", "")
    with pytest.raises(ValidationError, match="previous_id is required"):
        our_client.alias("", "u")
    assert segment_client.track("u", "")[1]["event"] == ""
    with pytest.raises(ValidationError, match="event is required"):
        our_client.track("u", "")
    assert segment_client.track("u", "E", message_id="")[1]["messageId"] == ""
    assert segment_client.track("u", "E", message_id=True)[1]["messageId"] == "True"
    for bad in ("", True):
        with pytest.raises(ValidationError, match="message_id"):
            our_client.track("u", "E", message_id=bad)


@pytest.mark.difference("mapping-fields")
def test_difference_mapping_fields_accept_any_mapping_and_reject_falsy_non_dicts(
    segment_client: Any, our_client: Any
) -> None:
    assert segment_client.identify("u", [])[1]["traits"] == {}
    with pytest.raises(ValidationError, match="traits must be a dict"):
        our_client.identify("u", [])
    assert segment_client.track("u", "E", context=[])[1]["context"]["library"]
    assert segment_client.track("u", "E", integrations="")[1]["integrations"] == {}
    with pytest.raises(ValidationError, match="context must be a dict"):
        our_client.track("u", "E", context=[])
    with pytest.raises(ValidationError, match="integrations must be a dict"):
        our_client.track("u", "E", integrations="")
    from types import MappingProxyType

    with pytest.raises(AssertionError):
        segment_client.identify("u", MappingProxyType({"a": 1}))
    assert our_client.identify("u", MappingProxyType({"a": 1}))[1]["traits"] == {"a": 1}
    assert segment_client.page("u", 0, 0)[1]["name"] == 0
    with pytest.raises(ValidationError, match="category must be a string"):
        our_client.page("u", 0, 0)


@pytest.mark.difference("value-conversion")
def test_difference_uuid_and_frozenset_values_are_converted_not_dropped(
    segment_client: Any, our_client: Any
) -> None:
    props = {"id": uuid.UUID(FIXED_ID), "f": frozenset({1}), "kept": 1}
    assert segment_client.track("u", "E", props)[1]["properties"] == {"kept": 1}
    assert our_client.track("u", "E", props)[1]["properties"] == {
        "id": FIXED_ID,
        "f": [1],
        "kept": 1,
    }


UNSERIALIZABLE = [
    pytest.param(object(), "object", id="object"),
    pytest.param(time(12, 30), "datetime.time", id="time"),
    pytest.param(timedelta(seconds=90), "datetime.timedelta", id="timedelta"),
    pytest.param(numpy.bool_(True), "numpy.bool", id="numpy-bool"),
    pytest.param(numpy.array([1, 2]), "numpy.ndarray", id="numpy-array"),
]


@pytest.mark.parametrize(("bad", "type_name"), UNSERIALIZABLE)
@pytest.mark.difference("unserializable-values")
def test_difference_values_json_cannot_hold_raise_here_segment_drops_them(
    segment_client: Any,
    our_client: Any,
    bad: Any,
    type_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Segment logs a warning and drops the key; we refuse the call naming path and type."""
    with caplog.at_level(logging.WARNING, logger="segment"):
        sent = segment_client.track("u", "E", {"flag": bad, "kept": 1})[1]["properties"]
    assert sent == {"kept": 1}
    assert "Dictionary values must be serializeable to JSON" in caplog.text
    with pytest.raises(ValidationError) as raised:
        our_client.track("u", "E", {"flag": bad, "kept": 1})
    assert str(raised.value).startswith(
        f"track: properties.flag: cannot convert {type_name} to JSON ("
    )
    assert our_client.stats().pending == 0


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        pytest.param(numpy.int64(3), 3, id="numpy-int64"),
        pytest.param(numpy.float32(1.5), 1.5, id="numpy-float32"),
        pytest.param(Fraction(1, 4), 0.25, id="fraction"),
    ],
)
@pytest.mark.difference("number-types")
def test_difference_numbers_json_cannot_write_are_sent_as_numbers(
    segment_client: Any, our_client: Any, value: Any, sent: Any
) -> None:
    with pytest.raises(TypeError, match="is not JSON serializable"):
        segment_client.track("u", "E", {"n": value})
    _, body = _messages.track("u", "E", {"n": value})
    assert json.loads(body)["properties"] == {"n": sent}


@pytest.mark.parametrize(
    "key",
    [(1, 2), frozenset({1}), object()],
    ids=["tuple", "frozenset", "object"],
)
@pytest.mark.difference("unrepresentable-keys")
def test_difference_keys_json_has_no_name_for_raise_value_error_not_type_error(
    segment_client: Any, our_client: Any, key: Any
) -> None:
    props = {"nested": {key: 1}}
    with pytest.raises(TypeError, match="keys must be str, int, float, bool or None"):
        segment_client.track("u", "E", props)
    with pytest.raises(
        ValidationError, match=r"^track: properties\.nested: .*cannot be a JSON name"
    ):
        our_client.track("u", "E", props)
    assert our_client.stats().pending == 0


@pytest.mark.difference("unrepresentable-keys")
def test_difference_date_uuid_enum_and_bytes_keys_become_text_segment_raises(
    segment_client: Any, our_client: Any
) -> None:
    for key, name in [
        (date(2024, 1, 2), "2024-01-02"),
        (uuid.UUID(FIXED_ID), FIXED_ID),
        (Color.RED, "red"),
        (b"k", "k"),
        (numpy.int64(3), "3"),
    ]:
        with pytest.raises(TypeError, match="keys must be str"):
            segment_client.track("u", "E", {key: 1})
        assert our_client.track("u", "E", {key: 1})[1]["properties"] == {name: 1}


def test_int_float_bool_and_none_keys_become_the_names_segment_sends(
    segment_client: Any, our_client: Any
) -> None:
    """The keys ``json`` itself converts: the same names from both libraries, on the wire."""
    props = {7: "int", 2.5: "float", True: "bool", None: "none", "s": "str"}
    seg = json.loads(json.dumps(segment_client.track("u", "E", props)[1]["properties"]))
    _, body = _messages.track("u", "E", props)
    assert (
        json.loads(body)["properties"]
        == seg
        == {
            "7": "int",
            "2.5": "float",
            "true": "bool",
            "null": "none",
            "s": "str",
        }
    )


@pytest.mark.difference("invalid-utf8-replaced")
def test_difference_invalid_utf8_bytes_are_replaced_not_raised(
    segment_client: Any, our_client: Any
) -> None:
    with pytest.raises(UnicodeDecodeError):
        segment_client.track("u", "E", {"b": b"a\xffb"})
    assert our_client.track("u", "E", {"b": b"a\xffb"})[1]["properties"] == {"b": "a\ufffdb"}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, Decimal("NaN")], ids=repr)
@pytest.mark.difference("non-json-values")
def test_difference_nan_and_infinity_are_rejected_not_sent(
    segment_client: Any, our_client: Any, bad: Any
) -> None:
    seg = segment_client.track("u", "E", {"x": bad})[1]
    wire = json.dumps(seg, cls=DatetimeSerializer)
    assert "NaN" in wire or "Infinity" in wire  # not JSON: a strict server refuses the batch
    with pytest.raises(ValidationError, match=r"properties\.x"):
        our_client.track("u", "E", {"x": bad})


@pytest.mark.difference("non-json-values")
def test_difference_circular_reference_is_a_validation_error(
    segment_client: Any, our_client: Any
) -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(RecursionError):
        segment_client.track("u", "E", {"loop": loop})
    with pytest.raises(ValidationError, match="circular reference"):
        our_client.track("u", "E", {"loop": loop})


@pytest.mark.difference("context-not-mutated")
def test_difference_callers_context_is_not_mutated(segment_client: Any, our_client: Any) -> None:
    seg_context: dict[str, Any] = {"ip": "203.0.113.5"}
    segment_client.track("u", "E", context=seg_context)
    assert seg_context["library"] == {"name": "analytics-python", "version": "2.4.0"}
    our_context: dict[str, Any] = {"ip": "203.0.113.5"}
    msg = our_client.track("u", "E", context=our_context)[1]
    assert our_context == {"ip": "203.0.113.5"}
    assert msg["context"]["library"] == {
        "name": "durable-analytics",
        "version": durable_analytics.__version__,
    }


@pytest.mark.difference("size-limit-utf8")
def test_difference_size_limit_counts_compact_utf8_bytes(
    segment_client: Any, our_client: Any
) -> None:
    props = {"text": "é" * 12_000}  # 24 KB as UTF-8, 72 KB as segment's ASCII-escaped JSON
    with pytest.raises(RuntimeError):
        segment_client.track("u", "E", props)
    assert our_client.track("u", "E", props)[0] is True
    with pytest.raises(MessageTooLarge):
        our_client.track("u", "E", {"text": "é" * 17_000})


# --------------------------------------------------------------------------- module API

SEGMENT_MODULE_NAMES = [
    "track",
    "identify",
    "group",
    "alias",
    "page",
    "screen",
    "flush",
    "join",
    "shutdown",
    "write_key",
    "host",
    "on_error",
    "debug",
    "send",
    "sync_mode",
    "gzip",
    "timeout",
    "max_retries",
    "default_client",
    "log_handler",
    "max_queue_size",
    "oauth_client_id",
    "oauth_client_key",
    "oauth_key_id",
    "oauth_auth_server",
    "oauth_scope",
    "VERSION",
    "__version__",
]
SEGMENT_MODULE_FUNCTIONS = ["track", "identify", "group", "alias", "page", "screen"]
SEGMENT_MODULE_FUNCTIONS += ["flush", "join", "shutdown"]


@pytest.fixture
def module_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    """Both module APIs set up with ``send = False``; their settings are restored after."""
    for module in (durable_analytics, segment_analytics):
        monkeypatch.setattr(module, "default_client", None)
        monkeypatch.setattr(module, "write_key", "k")
        monkeypatch.setattr(module, "send", False)
        for name in ("host", "timeout", "max_retries", "gzip", "sync_mode", "on_error"):
            monkeypatch.setattr(module, name, getattr(module, name))
    yield durable_analytics, segment_analytics
    client = durable_analytics.default_client
    if client is not None:
        client.close()


MODULE_CALLS: list[tuple[str, tuple[Any, ...]]] = [
    ("identify", ("user-1", {"email": "a@example.com"}, CONTEXT, FIXED_TS, "anon", INTEGRATIONS)),
    ("track", ("user-1", "Signed Up", {"plan": "Enterprise"}, CONTEXT, FIXED_TS, "anon")),
    ("page", ("user-1", "Docs", "Install", {"url": "https://x"}, CONTEXT, FIXED_TS)),
    ("screen", ("user-1", "App", "Home", {"step": 1}, CONTEXT, FIXED_TS, "anon")),
    ("group", ("user-1", "group-1", {"name": "Acme"}, CONTEXT, FIXED_TS, "anon")),
    ("alias", ("anon-1", "user-1", CONTEXT, FIXED_TS, INTEGRATIONS, "msg-1")),
]


@pytest.mark.parametrize(("call", "args"), MODULE_CALLS, ids=[c for c, _ in MODULE_CALLS])
def test_module_api_is_a_drop_in_with_segments_positional_order(
    module_api: tuple[Any, Any], call: str, args: tuple[Any, ...]
) -> None:
    analytics, segment = module_api
    ok, ours = getattr(analytics, call)(*copy.deepcopy(args))
    assert ok is True
    ok, seg = getattr(segment, call)(*copy.deepcopy(args))
    assert ok is True
    assert comparable(json.loads(json.dumps(ours))) == comparable(segment_wire(seg))
    assert ours["timestamp"] == seg["timestamp"]
    assert isinstance(analytics.default_client, durable_analytics.Client)


def test_module_api_builds_the_default_client_from_the_module_settings(
    module_api: tuple[Any, Any],
) -> None:
    analytics, _ = module_api
    analytics.host = "https://events.example.test/"
    analytics.timeout = 3.5
    analytics.max_retries = 7
    analytics.gzip = True
    analytics.track("u", "E")
    config = analytics.default_client.config
    assert (config.host, config.timeout, config.max_retries, config.gzip, config.send) == (
        "https://events.example.test",
        3.5,
        7,
        True,
        False,
    )


def test_module_api_flush_join_and_shutdown_work_like_segments(
    module_api: tuple[Any, Any],
) -> None:
    analytics, segment = module_api
    for module in (analytics, segment):
        module.track("u", "E")
        module.flush()
        module.join()
        module.shutdown()


@pytest.mark.parametrize("name", SEGMENT_MODULE_NAMES)
def test_every_public_name_of_segments_module_exists(name: str) -> None:
    assert hasattr(segment_analytics, name), "the list must name segment's own API"
    assert hasattr(durable_analytics, name)
    if name in SEGMENT_MODULE_FUNCTIONS:
        assert callable(getattr(durable_analytics, name))


def test_module_call_signatures_take_segments_parameter_names(
    module_api: tuple[Any, Any],
) -> None:
    analytics, _ = module_api
    keyword_calls: list[tuple[Callable[..., Any], dict[str, Any]]] = [
        (analytics.identify, {"user_id": "u", "traits": {"a": 1}}),
        (analytics.track, {"user_id": "u", "event": "E", "properties": {"a": 1}}),
        (analytics.page, {"user_id": "u", "category": "C", "name": "N"}),
        (analytics.screen, {"anonymous_id": "a", "category": "C", "name": "N"}),
        (analytics.group, {"user_id": "u", "group_id": "g", "traits": {"a": 1}}),
        (analytics.alias, {"previous_id": "p", "user_id": "u"}),
    ]
    for func, kwargs in keyword_calls:
        kwargs.update(context={}, timestamp=FIXED_TS, integrations={}, message_id="m")
        ok, msg = func(**kwargs)
        assert ok is True
        assert msg["messageId"] == "m"


def test_segment_takes_a_naive_datetime_older_than_5_seconds_as_utc() -> None:
    # A guard for difference 1: the two only differ for naive datetimes near "now".
    old = datetime.now() - timedelta(days=1)
    assert guess_timezone(old).utcoffset() == timedelta(0)
