"""Tests of durable_analytics._messages: validation, JSON cleaning, shape, size limit, ids.

Every call returns ``(message, body)``; ``body`` is the UTF-8 JSON that is stored and sent.
These tests read the body back with a strict parser wherever they check what is stored.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import re
import sys
import time
import types
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum, IntEnum
from typing import Any

import numpy
import pytest
from freezegun import freeze_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from durable_analytics import _messages
from durable_analytics._messages import (
    MAX_DEPTH,
    Alias,
    Group,
    Identify,
    Page,
    Screen,
    Track,
)
from durable_analytics._version import __version__
from durable_analytics.exceptions import MessageTooLarge, ValidationError

FIXED_ID = "00000000-0000-4000-8000-000000000000"
FIXED_TS = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
ISO_MS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")

# The calls that need a user: (name, function, keyword arguments besides the ids).
USER_CALLS: list[tuple[str, Callable[..., Any], dict[str, Any]]] = [
    ("identify", _messages.identify, {}),
    ("track", _messages.track, {"event": "E"}),
    ("page", _messages.page, {}),
    ("screen", _messages.screen, {}),
    ("group", _messages.group, {"group_id": "g"}),
]
USER_CALL_IDS = [name for name, _, _ in USER_CALLS]

# Every call with the smallest valid arguments, by name.
MINIMAL: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "identify": (_messages.identify, {"user_id": "u"}),
    "track": (_messages.track, {"user_id": "u", "event": "E"}),
    "page": (_messages.page, {"user_id": "u"}),
    "screen": (_messages.screen, {"user_id": "u"}),
    "group": (_messages.group, {"user_id": "u", "group_id": "g"}),
    "alias": (_messages.alias, {"previous_id": "p", "user_id": "u"}),
}

# Which mapping fields each call takes.
MAPPING_FIELDS = [
    (call, field)
    for call, fields in {
        "identify": ("traits", "context", "integrations"),
        "track": ("properties", "context", "integrations"),
        "page": ("properties", "context", "integrations"),
        "screen": ("properties", "context", "integrations"),
        "group": ("traits", "context", "integrations"),
        "alias": ("context", "integrations"),
    }.items()
    for field in fields
]


def _reject_constant(name: str) -> Any:
    raise AssertionError(f"the body holds {name}, which is not JSON")


def strict_loads(body: bytes) -> Any:
    """Parse like a strict server: UTF-8 only, no NaN/Infinity, no lone surrogates."""
    assert isinstance(body, bytes)
    value = json.loads(body.decode("utf-8", "strict"), parse_constant=_reject_constant)
    for text in _strings(value):
        assert not any("\ud800" <= c <= "\udfff" for c in text), f"lone surrogate in {text!r}"
    return value


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def stored_properties(properties: Any) -> Any:
    """What a track call stores as ``properties`` for ``properties``."""
    _, body = _messages.track("u", "E", properties)
    return strict_loads(body)["properties"]


def nested(levels: int, *, kind: str = "dict") -> Any:
    """A container ``levels`` deep: ``nested(1)`` is ``{}``, ``nested(2)`` ``{"a": {}}``."""
    value: Any = {} if kind == "dict" else []
    for _ in range(levels - 1):
        value = {"a": value} if kind == "dict" else [value]
    return value


class Color(Enum):
    RED = "red"


class Level(IntEnum):
    HIGH = 3


class Plan(str, Enum):
    PRO = "pro"


# --------------------------------------------------------------------------- validation


def test_validation_error_is_a_value_error() -> None:
    assert issubclass(ValidationError, ValueError)
    assert issubclass(MessageTooLarge, ValidationError)
    with pytest.raises(ValueError, match="track"):
        _messages.track(None, "E")


@pytest.mark.parametrize(("call", "func", "extra"), USER_CALLS, ids=USER_CALL_IDS)
def test_missing_user_id_and_anonymous_id_is_rejected(
    call: str, func: Callable[..., Any], extra: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError, match=rf"^{call}: user_id or anonymous_id is required"):
        func(**extra)
    with pytest.raises(ValidationError, match=rf"^{call}: user_id or anonymous_id"):
        func(user_id="", anonymous_id="", **extra)


@pytest.mark.parametrize(("call", "func", "extra"), USER_CALLS, ids=USER_CALL_IDS)
def test_anonymous_id_alone_is_enough(
    call: str, func: Callable[..., Any], extra: dict[str, Any]
) -> None:
    msg, body = func(anonymous_id="anon-1", **extra)
    stored = strict_loads(body)
    assert stored["type"] == call
    assert stored["anonymousId"] == "anon-1"
    assert stored["userId"] is None
    assert msg["anonymousId"] == "anon-1"


def test_alias_needs_no_anonymous_id() -> None:
    _, body = _messages.alias("old-id", "new-id")
    stored = strict_loads(body)
    assert stored["previousId"] == "old-id"
    assert stored["userId"] == "new-id"
    assert stored["anonymousId"] is None


@pytest.mark.parametrize("previous_id", [None, ""])
def test_alias_without_previous_id_is_rejected(previous_id: Any) -> None:
    with pytest.raises(ValidationError, match=r"^alias: previous_id is required"):
        _messages.alias(previous_id, "new-id")


@pytest.mark.parametrize("user_id", [None, ""])
def test_alias_without_user_id_is_rejected(user_id: Any) -> None:
    with pytest.raises(ValidationError, match=r"^alias: user_id is required"):
        _messages.alias("old-id", user_id)


@pytest.mark.parametrize("event", [None, "", 5, b"Signed Up", ["E"]])
def test_track_without_a_string_event_is_rejected(event: Any) -> None:
    with pytest.raises(ValidationError, match=r"^track: event is required"):
        _messages.track("u", event)


@pytest.mark.parametrize("group_id", [None, ""])
def test_group_without_group_id_is_rejected(group_id: Any) -> None:
    with pytest.raises(ValidationError, match=r"^group: group_id is required"):
        _messages.group("u", group_id)


@pytest.mark.parametrize(("call", "field"), MAPPING_FIELDS)
@pytest.mark.parametrize("value", [["a", 1], "text", 5, ("k", "v")], ids=repr)
def test_mapping_field_that_is_not_a_mapping_is_rejected(call: str, field: str, value: Any) -> None:
    func, kwargs = MINIMAL[call]
    with pytest.raises(ValidationError, match=rf"^{call}: {field} must be a dict"):
        func(**kwargs, **{field: value})


@pytest.mark.parametrize(("call", "field"), MAPPING_FIELDS)
def test_mapping_field_accepts_any_mapping_and_none(call: str, field: str) -> None:
    func, kwargs = MINIMAL[call]
    _, body = func(**kwargs, **{field: types.MappingProxyType({"k": "v"})})
    assert strict_loads(body)[field]["k"] == "v"
    _, body = func(**kwargs, **{field: None})
    assert isinstance(strict_loads(body)[field], dict)


@pytest.mark.parametrize("call", list(MINIMAL))
@pytest.mark.parametrize(
    "timestamp", ["2024-01-01T00:00:00Z", 1_700_000_000, date(2024, 1, 1)], ids=repr
)
def test_timestamp_that_is_not_a_datetime_is_rejected(call: str, timestamp: Any) -> None:
    func, kwargs = MINIMAL[call]
    with pytest.raises(ValidationError, match=rf"^{call}: timestamp must be a datetime"):
        func(**kwargs, timestamp=timestamp)


@pytest.mark.parametrize("call", list(MINIMAL))
@pytest.mark.parametrize("message_id", ["", True, float("nan"), ["id"], {"id": 1}, b"id"], ids=repr)
def test_bad_message_id_is_rejected(call: str, message_id: Any) -> None:
    func, kwargs = MINIMAL[call]
    with pytest.raises(ValidationError, match=rf"^{call}: message_id"):
        func(**kwargs, message_id=message_id)


def test_message_id_with_too_many_digits_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"^track: message_id: the integer has too many"):
        _messages.track("u", "E", message_id=10**5000)


@pytest.mark.parametrize(
    ("call", "field", "kwargs"),
    [
        ("track", "user_id", {"user_id": True, "event": "E"}),
        ("track", "anonymous_id", {"anonymous_id": False, "event": "E"}),
        ("identify", "user_id", {"user_id": False, "anonymous_id": "a"}),
        ("group", "group_id", {"user_id": "u", "group_id": True}),
        ("alias", "previous_id", {"previous_id": True, "user_id": "u"}),
        ("alias", "user_id", {"previous_id": "p", "user_id": True}),
    ],
)
def test_bool_ids_are_rejected(call: str, field: str, kwargs: dict[str, Any]) -> None:
    func = MINIMAL[call][0]
    with pytest.raises(ValidationError, match=rf"^{call}: {field} must be a string or a number"):
        func(**kwargs)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (123, "123"),
        (0, "0"),
        (-7, "-7"),
        (4.5, "4.5"),
        (Decimal("12.50"), "12.50"),
        (uuid.UUID(FIXED_ID), FIXED_ID),
    ],
    ids=repr,
)
@pytest.mark.parametrize(("call", "func", "extra"), USER_CALLS, ids=USER_CALL_IDS)
def test_numeric_user_and_anonymous_ids_become_strings(
    call: str, func: Callable[..., Any], extra: dict[str, Any], value: Any, text: str
) -> None:
    msg, body = func(user_id=value, **extra)
    assert msg["userId"] == text
    assert strict_loads(body)["userId"] == text
    msg, body = func(anonymous_id=value, **extra)
    assert msg["anonymousId"] == text
    assert strict_loads(body)["anonymousId"] == text
    assert call == msg["type"]


def test_alias_numeric_user_id_becomes_a_string_and_previous_id_is_kept() -> None:
    # As segment-analytics-python: userId is stringified, previousId and groupId are sent as given.
    stored = strict_loads(_messages.alias(1, 2)[1])
    assert stored["userId"] == "2"
    assert stored["previousId"] == 1
    assert strict_loads(_messages.group("u", 42)[1])["groupId"] == 42


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, Decimal("NaN"), Decimal("sNaN"), Decimal("-Infinity")],
    ids=repr,
)
def test_non_finite_ids_are_rejected(value: Any) -> None:
    with pytest.raises(ValidationError, match=r"^track: user_id must be a finite number"):
        _messages.track(value, "E")
    with pytest.raises(ValidationError, match=r"^group: group_id must be a finite number"):
        _messages.group("u", value)


@pytest.mark.parametrize("value", [[1], {"id": 1}, b"u", object(), 1j], ids=repr)
def test_ids_of_other_types_are_rejected(value: Any) -> None:
    with pytest.raises(ValidationError, match=r"^track: user_id must be a string or a number"):
        _messages.track(value, "E")
    with pytest.raises(ValidationError, match=r"^track: anonymous_id must be a string"):
        _messages.track("u", "E", anonymous_id=value)
    with pytest.raises(ValidationError, match=r"^alias: previous_id must be a string"):
        _messages.alias(value, "u")


@pytest.mark.parametrize(
    ("func", "args", "field"),
    [
        (_messages.track, (10**5000, "E"), "user_id"),
        (_messages.group, ("u", 10**5000), "group_id"),
        (_messages.alias, (10**5000, "u"), "previous_id"),
        (_messages.alias, ("p", 10**5000), "user_id"),
    ],
)
def test_ids_with_too_many_digits_are_rejected(
    func: Callable[..., Any], args: tuple[Any, ...], field: str
) -> None:
    with pytest.raises(ValidationError, match=rf": {field}: the integer has too many digits"):
        func(*args)


class _Unequal:
    def __eq__(self, other: object) -> bool:
        raise RuntimeError("compared")

    __hash__ = object.__hash__


def test_id_of_an_odd_type_is_rejected_before_it_is_compared() -> None:
    with pytest.raises(ValidationError, match=r"^group: group_id must be a string or a number"):
        _messages.group("u", _Unequal())
    with pytest.raises(ValidationError, match=r"^alias: user_id must be a string or a number"):
        _messages.alias("p", _Unequal())


@pytest.mark.parametrize("call", ["page", "screen"])
@pytest.mark.parametrize("field", ["name", "category"])
def test_page_name_and_category_must_be_strings(call: str, field: str) -> None:
    func, kwargs = MINIMAL[call]
    with pytest.raises(ValidationError, match=rf"^{call}: {field} must be a string"):
        func(**kwargs, **{field: 5})


# --------------------------------------------------------------------------- cleaning


def test_aware_datetime_becomes_iso8601_with_milliseconds_and_its_offset() -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, 123999, tzinfo=timezone(timedelta(hours=2)))
    assert stored_properties({"at": when}) == {"at": "2024-05-06T07:08:09.123+02:00"}


def test_naive_datetime_is_taken_as_utc() -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, 123000)
    assert stored_properties({"at": when}) == {"at": "2024-05-06T07:08:09.123+00:00"}


def test_date_becomes_iso8601_date() -> None:
    assert stored_properties({"on": date(2024, 2, 29)}) == {"on": "2024-02-29"}


def test_decimal_becomes_float() -> None:
    stored = stored_properties({"price": Decimal("19.99"), "n": Decimal(3)})
    assert stored == {"price": 19.99, "n": 3.0}
    assert isinstance(stored["n"], float)


def test_uuid_becomes_string() -> None:
    assert stored_properties({"id": uuid.UUID(FIXED_ID)}) == {"id": FIXED_ID}


def test_enum_becomes_its_value() -> None:
    stored = stored_properties({"color": Color.RED, "level": Level.HIGH, "plan": Plan.PRO})
    assert stored == {"color": "red", "level": 3, "plan": "pro"}


def test_set_tuple_and_frozenset_become_lists() -> None:
    stored = stored_properties({"s": {1}, "t": (1, "a"), "f": frozenset(["x"]), "e": ()})
    assert stored == {"s": [1], "t": [1, "a"], "f": ["x"], "e": []}


def test_bytes_become_utf8_text_with_invalid_bytes_replaced() -> None:
    stored = stored_properties(
        {
            "ok": "café".encode(),
            "bad": b"a\xffb",
            "ba": bytearray(b"xy"),
            "mv": memoryview(b"mv"),
        }
    )
    assert stored == {"ok": "café", "bad": "a\ufffdb", "ba": "xy", "mv": "mv"}


def test_non_string_keys_become_strings_as_json_dumps_makes_them() -> None:
    data = {7: "int", 2.5: "float", True: "bool", None: "none", -0.5: "negative", 1e16: "big"}
    expected = json.loads(json.dumps(data))
    assert stored_properties(data) == expected
    assert set(expected) == {"7", "2.5", "true", "null", "-0.5", "1e+16"}


def test_non_string_keys_are_stored_the_same_on_the_slow_path() -> None:
    # bytes cannot take the fast C-encoder path, so this message goes through the cleaner.
    data: dict[Any, Any] = {1: "int", 2.5: "float", False: "bool", None: "none", Level.HIGH: 3}
    fast = stored_properties(data)
    slow = stored_properties({**data, "force-slow-path": b"x"})
    del slow["force-slow-path"]
    assert fast == slow == {"1": "int", "2.5": "float", "false": "bool", "null": "none", "3": 3}


def test_str_enum_key_is_stored_as_its_value_on_both_paths() -> None:
    assert stored_properties({Plan.PRO: 1}) == {"pro": 1}
    assert stored_properties({Plan.PRO: 1, "b": b"x"}) == {"pro": 1, "b": "x"}


def test_other_hashable_keys_become_their_str() -> None:
    key = uuid.UUID(FIXED_ID)
    assert stored_properties({key: 1, date(2024, 1, 2): 2}) == {FIXED_ID: 1, "2024-01-02": 2}


def test_lone_surrogates_are_replaced_so_the_body_is_valid_utf8() -> None:
    msg, body = _messages.track(
        "user\ud800",
        "Event\udfff",
        {"text\udc80": "a\ud800b", "list": ["\udbff"]},
        context={"page": {"title": "t\ud834"}},
        anonymous_id="anon\udead",
        message_id="id\ud801",
    )
    stored = strict_loads(body)
    assert stored["userId"] == "user\ufffd"
    assert stored["event"] == "Event\ufffd"
    assert stored["anonymousId"] == "anon\ufffd"
    assert stored["messageId"] == "id\ufffd"
    assert stored["properties"] == {"text\ufffd": "a\ufffdb", "list": ["\ufffd"]}
    assert stored["context"]["page"] == {"title": "t\ufffd"}
    assert msg["properties"] == stored["properties"]


@pytest.mark.parametrize(
    "call",
    [
        lambda s: _messages.page("u", s, s),
        lambda s: _messages.screen("u", s, s),
        lambda s: _messages.group("u", s, {s: s}),
        lambda s: _messages.alias(s, s),
        lambda s: _messages.identify(s, {s: s}, integrations={s: True}),
    ],
    ids=["page", "screen", "group", "alias", "identify"],
)
def test_lone_surrogates_are_replaced_in_every_call(call: Callable[[str], Any]) -> None:
    _, body = call("x\ud800")
    assert "x\ufffd" in body.decode("utf-8")


def test_a_valid_surrogate_pair_is_joined_into_one_character() -> None:
    # "\ud83d\ude00" is how a UTF-16 round trip can leave 😀 in a Python str.
    assert stored_properties({"emoji": "\ud83d\ude00", "lone": "\ud800"}) == {
        "emoji": "😀",
        "lone": "\ufffd",
    }


def test_nul_and_control_characters_are_escaped_and_read_back_intact() -> None:
    text = "a\x00b\x01\x1f\n\t\r\x7f\u2028end"
    _, body = _messages.track("u", "E", {"k\x00": text})
    assert b"\x00" not in body
    assert b"\\u0000" in body
    assert strict_loads(body)["properties"] == {"k\x00": text}


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    "bad",
    [math.nan, math.inf, -math.inf, Decimal("NaN"), Decimal("sNaN"), Decimal("Infinity")],
    ids=repr,
)
def test_non_finite_number_is_rejected_with_its_path(bad: Any) -> None:
    items = [{"price": 1.0}, {"price": 2.0}, {"price": 3.0}, {"price": bad}]
    with pytest.raises(ValidationError, match=r"^track: properties\.items\[3\]\.price: "):
        _messages.track("u", "E", {"items": items})


@pytest.mark.parametrize(
    ("call", "kwargs", "path"),
    [
        ("identify", {"traits": {"a": [math.nan]}}, r"traits\.a\[0\]"),
        ("group", {"traits": {"n": {"m": math.inf}}}, r"traits\.n\.m"),
        ("page", {"context": {"app": {"x": -math.inf}}}, r"context\.app\.x"),
        ("screen", {"integrations": {"X": {"y": math.nan}}}, r"integrations\.X\.y"),
        ("alias", {"context": {"ids": (1, math.nan)}}, r"context\.ids\[1\]"),
    ],
)
def test_non_finite_number_path_names_the_field(
    call: str, kwargs: dict[str, Any], path: str
) -> None:
    func, base = MINIMAL[call]
    with pytest.raises(ValidationError, match=rf"^{call}: {path}: NaN and Infinity"):
        func(**base, **kwargs)


@pytest.mark.parametrize("key", [math.nan, math.inf, -math.inf], ids=repr)
def test_non_finite_key_is_rejected(key: float) -> None:
    with pytest.raises(ValidationError, match=r"^track: properties\.a: a NaN or Infinity key"):
        _messages.track("u", "E", {"a": {key: 1}})


def test_circular_dict_is_rejected_with_its_path() -> None:
    loop: dict[str, Any] = {"name": "x"}
    loop["self"] = loop
    with pytest.raises(ValidationError, match=r"^track: properties\.data\.self: circular"):
        _messages.track("u", "E", {"data": loop})


def test_circular_list_is_rejected_with_its_path() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(ValidationError, match=r"^identify: traits\.l\[1\]: circular reference"):
        _messages.identify("u", {"l": loop})


def test_properties_that_contain_themselves_are_rejected() -> None:
    props: dict[str, Any] = {}
    props["again"] = props
    with pytest.raises(ValidationError, match=r"^track: properties\.again: circular reference"):
        _messages.track("u", "E", props)


def test_shared_but_not_circular_references_are_accepted() -> None:
    shared = {"k": [1, 2]}
    stored = stored_properties({"a": shared, "b": shared, "c": [shared, shared]})
    assert stored == {"a": shared, "b": shared, "c": [shared, shared]}


@pytest.mark.parametrize("kind", ["dict", "list"])
def test_nesting_exactly_64_levels_is_accepted(kind: str) -> None:
    # The field's own mapping is level 1; MAX_DEPTH levels in all are allowed.
    assert MAX_DEPTH == 64
    props = {"deep": nested(MAX_DEPTH - 1, kind=kind)}
    assert stored_properties(props) == props


@pytest.mark.parametrize("kind", ["dict", "list"])
def test_nesting_deeper_than_64_levels_is_rejected(kind: str) -> None:
    props = {"deep": nested(MAX_DEPTH, kind=kind)}
    with pytest.raises(ValidationError, match=r"^track: properties\.deep.*nested deeper than 64"):
        _messages.track("u", "E", props)


@pytest.mark.parametrize("levels", [200, 5000, 100_000])
def test_very_deep_nesting_is_rejected_without_recursion_error(levels: int) -> None:
    with pytest.raises(ValidationError, match="nested deeper than 64"):
        _messages.track("u", "E", {"deep": nested(levels)})


def test_nesting_limit_counts_in_every_mapping_field() -> None:
    with pytest.raises(ValidationError, match=r"^identify: context\.deep"):
        _messages.identify("u", context={"deep": nested(MAX_DEPTH)})
    _messages.identify("u", context={"deep": nested(MAX_DEPTH - 1)})


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(object(), "object"), (1 + 2j, "complex"), (len, "builtin_function_or_method")],
    ids=["object", "complex", "function"],
)
def test_object_that_cannot_be_converted_is_rejected_with_its_path(
    value: Any, type_name: str
) -> None:
    with pytest.raises(
        ValidationError, match=rf"^track: properties\.a\[2\]\.b: cannot convert {type_name}"
    ):
        _messages.track("u", "E", {"a": [1, 2, {"b": value}]})


def test_int_over_the_digit_limit_is_rejected_with_its_path() -> None:
    with pytest.raises(ValidationError, match=r"^track: properties\.n: the integer has too many"):
        _messages.track("u", "E", {"n": 10**5000})
    with pytest.raises(ValidationError, match=r"^track: properties: the integer has too many"):
        _messages.track("u", "E", {10**5000: 1})


def test_int_at_the_digit_limit_is_accepted() -> None:
    limit = sys.get_int_max_str_digits()
    if limit == 0:
        pytest.skip("no int digit limit in this interpreter")
    big = 10 ** (limit - 1)
    assert len(str(big)) == limit
    assert stored_properties({"n": big}) == {"n": big}


# --------------------------------------------------------------------------- no mutation


def _callers_data() -> dict[str, Any]:
    """Plain JSON data that takes the fast path unless a test adds to it."""
    return {
        "properties": {
            "items": [{"sku": "A", "qty": 2}, {"sku": "B", "tags": ["x"]}],
            1: "int key",
            "nested": {"list": [[1, 2], {"k": None}]},
        },
        "context": {"ip": "203.0.113.5", "app": {"name": "app", "build": [1, 2]}},
        "traits": {"email": "a@example.com", "roles": ["admin", {"since": "2024"}]},
        "integrations": {"All": False, "Mixpanel": {"enabled": True}},
    }


SLOW_PATH_EXTRA = {
    "at": FIXED_TS,
    "on": date(2024, 1, 1),
    "set": {1, 2},
    "tags": ("x", ["y"]),
    "bytes": b"b",
    "items": [{"price": Decimal("1.5"), "id": uuid.UUID(FIXED_ID), "color": Color.RED}],
    "keys": {Plan.PRO: 1, 2.5: [frozenset({3})]},
}


@pytest.mark.parametrize(
    "extra",
    [{}, SLOW_PATH_EXTRA, {"surrogate": "\ud800", "l": ["\udc00"]}, {"deep": nested(70)}],
    ids=["fast-path", "slow-path", "surrogates", "rejected"],
)
def test_callers_dicts_and_lists_are_never_mutated(extra: dict[str, Any]) -> None:
    data = _callers_data()
    data["properties"].update(extra)
    data["traits"].update(extra)
    before = copy.deepcopy(data)
    calls: list[Callable[[], object]] = [
        lambda: _messages.track(
            "u", "E", data["properties"], data["context"], integrations=data["integrations"]
        ),
        lambda: _messages.identify("u", data["traits"], data["context"]),
        lambda: _messages.group("u", "g", data["traits"], data["context"]),
        lambda: _messages.page("u", "c", "n", data["properties"], data["context"]),
        lambda: _messages.alias("p", "u", data["context"], integrations=data["integrations"]),
    ]
    for call in calls:
        try:
            call()
        except ValidationError:
            assert "deep" in extra
        assert data == before


def test_context_library_is_added_only_to_the_stored_copy() -> None:
    context = {"ip": "203.0.113.5"}
    msg, body = _messages.track("u", "E", context=context)
    assert context == {"ip": "203.0.113.5"}
    assert msg["context"] is not context
    assert msg["context"]["library"] == {"name": "durable-analytics", "version": __version__}
    assert strict_loads(body)["context"] == {
        "ip": "203.0.113.5",
        "library": {"name": "durable-analytics", "version": __version__},
    }


def test_a_library_the_caller_put_in_context_is_replaced_in_the_stored_copy_only() -> None:
    context = {"library": {"name": "mine"}}
    _, body = _messages.identify("u", context=context)
    assert strict_loads(body)["context"]["library"]["name"] == "durable-analytics"
    assert context == {"library": {"name": "mine"}}


# --------------------------------------------------------------------------- shape

COMMON = {"type", "messageId", "timestamp", "context", "integrations"}
SHAPES = {
    "identify": COMMON | {"userId", "anonymousId", "traits"},
    "track": COMMON | {"userId", "anonymousId", "event", "properties"},
    "page": COMMON | {"userId", "anonymousId", "name", "category", "properties"},
    "screen": COMMON | {"userId", "anonymousId", "name", "category", "properties"},
    "group": COMMON | {"userId", "anonymousId", "groupId", "traits"},
    "alias": COMMON | {"userId", "anonymousId", "previousId"},
}


@pytest.mark.parametrize("call", list(MINIMAL))
def test_message_has_the_fields_of_its_type(call: str) -> None:
    func, kwargs = MINIMAL[call]
    msg, body = func(**kwargs)
    stored = strict_loads(body)
    assert set(stored) == SHAPES[call]
    assert stored["type"] == call
    assert UUID4_RE.match(stored["messageId"])
    assert ISO_MS_RE.match(stored["timestamp"])
    assert stored["context"] == {"library": {"name": "durable-analytics", "version": __version__}}
    assert stored["integrations"] == {}
    assert json.loads(json.dumps(msg)) == stored


def test_track_message_holds_event_properties_and_everything_given() -> None:
    msg, body = _messages.track(
        "user-1",
        "Signed Up",
        {"plan": "Enterprise", "seats": 5},
        {"ip": "203.0.113.5"},
        FIXED_TS,
        "anon-1",
        {"All": False, "Amplitude": True},
        "msg-1",
    )
    assert strict_loads(body) == {
        "type": "track",
        "messageId": "msg-1",
        "timestamp": "2024-05-06T07:08:09.123+00:00",
        "userId": "user-1",
        "anonymousId": "anon-1",
        "event": "Signed Up",
        "properties": {"plan": "Enterprise", "seats": 5},
        "context": {
            "ip": "203.0.113.5",
            "library": {"name": "durable-analytics", "version": __version__},
        },
        "integrations": {"All": False, "Amplitude": True},
    }
    assert msg == strict_loads(body)


def test_identify_and_group_hold_traits() -> None:
    stored = strict_loads(_messages.identify("u", {"email": "a@example.com"})[1])
    assert stored["traits"] == {"email": "a@example.com"}
    stored = strict_loads(_messages.group("u", "g-1", {"name": "Acme"})[1])
    assert stored["groupId"] == "g-1"
    assert stored["traits"] == {"name": "Acme"}


@pytest.mark.parametrize("call", ["page", "screen"])
def test_page_and_screen_hold_name_category_and_properties(call: str) -> None:
    func = MINIMAL[call][0]
    stored = strict_loads(func("u", "Docs", "Install", {"url": "https://x"})[1])
    assert (stored["category"], stored["name"]) == ("Docs", "Install")
    assert stored["properties"] == {"url": "https://x"}
    stored = strict_loads(func("u")[1])
    assert (stored["category"], stored["name"]) == (None, None)


def test_alias_holds_previous_id() -> None:
    stored = strict_loads(_messages.alias("anon-7", "user-7")[1])
    assert (stored["previousId"], stored["userId"]) == ("anon-7", "user-7")


@pytest.mark.parametrize(
    ("given", "stored"),
    [("custom-id", "custom-id"), (uuid.UUID(FIXED_ID), FIXED_ID), (42, "42")],
    ids=repr,
)
def test_given_message_id_is_kept_as_a_string(given: Any, stored: str) -> None:
    assert strict_loads(_messages.track("u", "E", message_id=given)[1])["messageId"] == stored


def test_message_ids_are_fresh_uuid4_for_each_call() -> None:
    ids = {strict_loads(_messages.track("u", "E")[1])["messageId"] for _ in range(100)}
    assert len(ids) == 100
    assert all(UUID4_RE.match(i) for i in ids)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (FIXED_TS, "2024-05-06T07:08:09.123+00:00"),
        (datetime(2024, 5, 6, 7, 8, 9, 999999), "2024-05-06T07:08:09.999+00:00"),
        (
            datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(-timedelta(hours=5, minutes=30))),
            "2024-05-06T07:08:09.000-05:30",
        ),
    ],
    ids=["utc", "naive-is-utc", "offset"],
)
def test_given_timestamp_is_stored_with_milliseconds_and_offset(
    given: datetime, stored: str
) -> None:
    assert strict_loads(_messages.track("u", "E", timestamp=given)[1])["timestamp"] == stored


def test_timestamp_defaults_to_the_time_of_the_call() -> None:
    before = datetime.now(timezone.utc) - timedelta(milliseconds=1)
    stored = strict_loads(_messages.track("u", "E")[1])["timestamp"]
    after = datetime.now(timezone.utc)
    assert ISO_MS_RE.match(stored)
    assert before <= datetime.fromisoformat(stored) <= after


def test_returned_message_matches_the_stored_body_after_cleaning() -> None:
    msg, body = _messages.track("u", "E", {"at": FIXED_TS, "b": b"x", "t": (1,)})
    assert msg == strict_loads(body)


TYPED_CASES = [
    (Identify, _messages.identify, ("u", {"t": 1}, {"ip": "1"}, FIXED_TS, "a", {"X": 1}, "m")),
    (Track, _messages.track, ("u", "E", {"p": 1}, {"ip": "1"}, FIXED_TS, "a", {"X": 1}, "m")),
    (Page, _messages.page, ("u", "C", "N", {"p": 1}, {"ip": "1"}, FIXED_TS, "a", {"X": 1}, "m")),
    (Screen, _messages.screen, ("u", "C", "N", {"p": 1}, {"i": "1"}, FIXED_TS, "a", {"X": 1}, "m")),
    (Group, _messages.group, ("u", "g", {"t": 1}, {"ip": "1"}, FIXED_TS, "a", {"X": 1}, "m")),
    (Alias, _messages.alias, ("p", "u", {"ip": "1"}, FIXED_TS, {"X": 1}, "m")),
]

TYPED_IDS = [cls.__name__ for cls, _, _ in TYPED_CASES]


@pytest.mark.parametrize(("cls", "func", "args"), TYPED_CASES, ids=TYPED_IDS)
def test_typed_message_encodes_like_the_call(
    cls: type, func: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    assert _messages.encode(cls(*args)) == func(*args)
    # The keyword form gives the same message too.
    params = [f.name for f in dataclasses.fields(cls)]
    kwargs = dict(zip(params, args, strict=True))
    assert _messages.encode(cls(**kwargs)) == func(**kwargs)


@pytest.mark.parametrize(("cls", "func", "args"), TYPED_CASES, ids=TYPED_IDS)
def test_typed_message_fields_are_the_calls_positional_order(
    cls: type, func: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    positional = [
        p.name
        for p in inspect.signature(func).parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    assert [f.name for f in dataclasses.fields(cls)] == positional
    assert len(args) == len(positional)


@pytest.mark.parametrize(("cls", "func", "args"), TYPED_CASES, ids=TYPED_IDS)
def test_typed_messages_are_frozen(
    cls: type, func: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    message = cls(*args)
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.user_id = "other"
    assert func is MINIMAL[cls.__name__.lower()][0]


def test_typed_message_is_validated_like_the_call() -> None:
    with pytest.raises(ValidationError, match=r"^track: user_id or anonymous_id is required"):
        _messages.encode(Track(event="E"))
    with pytest.raises(ValidationError, match=r"^track: event is required"):
        _messages.encode(Track(user_id="u"))
    with pytest.raises(MessageTooLarge):
        _messages.encode(Track("u", "E", {"x": "y" * 200}), max_bytes=100)


def test_encode_rejects_anything_but_the_six_types() -> None:
    with pytest.raises(ValidationError, match=r"^enqueue: expected Identify, Track"):
        _messages.encode({"type": "track"})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- size limit


def _track_of_size(size: int, *, max_bytes: int = 32_768) -> tuple[dict[str, Any], bytes]:
    """A track call whose body is exactly ``size`` bytes (an ASCII pad fills it up)."""
    _, base = _messages.track("u", "E", {"pad": ""}, timestamp=FIXED_TS, message_id=FIXED_ID)
    pad = "x" * (size - len(base))
    return _messages.track(
        "u", "E", {"pad": pad}, timestamp=FIXED_TS, message_id=FIXED_ID, max_bytes=max_bytes
    )


@pytest.mark.parametrize("limit", [1_000, 32_768])
def test_message_one_byte_over_the_limit_raises_message_too_large(limit: int) -> None:
    with pytest.raises(MessageTooLarge) as info:
        _track_of_size(limit + 1, max_bytes=limit)
    assert isinstance(info.value, ValidationError)
    assert info.value.size == limit + 1
    assert info.value.limit == limit
    assert str(info.value).startswith(f"track: the message is {limit + 1} bytes")
    assert str(limit) in str(info.value)


@pytest.mark.parametrize("limit", [1_000, 32_768])
def test_message_exactly_at_the_limit_is_accepted(limit: int) -> None:
    assert len(_track_of_size(limit, max_bytes=limit)[1]) == limit


@pytest.mark.parametrize("limit", [1_000, 32_768])
def test_message_one_byte_under_the_limit_is_accepted(limit: int) -> None:
    assert len(_track_of_size(limit - 1, max_bytes=limit)[1]) == limit - 1


def test_default_limit_is_32_kib() -> None:
    assert len(_track_of_size(32_768)[1]) == 32_768
    with pytest.raises(MessageTooLarge):
        _track_of_size(32_769)


def test_size_counts_utf8_bytes_not_characters() -> None:
    _, body = _messages.track("u", "E", {"s": "é" * 300}, max_bytes=10_000)
    with pytest.raises(MessageTooLarge) as info:
        _messages.track("u", "E", {"s": "é" * 300}, max_bytes=len(body) - 1)
    assert info.value.size == len(body)


def test_size_limit_applies_after_cleaning_on_the_slow_path() -> None:
    with pytest.raises(MessageTooLarge, match=r"^identify: "):
        _messages.identify("u", {"b": b"x" * 2000}, max_bytes=1000)


# --------------------------------------------------------------------------- hypothesis


# st.characters(codec=None) alone draws no surrogates in this Hypothesis version: name Cs.
_SURROGATE_TEXT = st.text(alphabet=st.characters(categories=["Cs", "Ll", "Nd", "Cc", "So"]))
_TEXT = st.text(alphabet=st.characters(codec=None), max_size=20) | _SURROGATE_TEXT


def _json_like() -> st.SearchStrategy[Any]:
    texts = _TEXT
    hashables = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        texts,
    )
    scalars = st.one_of(
        hashables,
        st.binary(max_size=20),
        st.datetimes(timezones=st.none() | st.just(timezone.utc)),
        st.dates(),
        st.decimals(allow_nan=True, allow_infinity=True),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=5),
            st.lists(children, max_size=5).map(tuple),
            st.sets(hashables, max_size=5),
            st.frozensets(hashables, max_size=5),
            st.dictionaries(hashables, children, max_size=5),
        ),
        max_leaves=30,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(properties=_json_like())
def test_any_json_like_input_is_stored_as_strict_json_or_rejected(properties: Any) -> None:
    try:
        msg, body = _messages.track("u", "E", properties=properties)
    except ValidationError:
        return
    stored = strict_loads(body)
    assert stored["properties"] == json.loads(json.dumps(msg["properties"], default=str))


@settings(max_examples=300, deadline=None)
@given(properties=st.dictionaries(st.text(), _json_like(), max_size=5))
def test_any_json_like_properties_mapping_is_stored_as_strict_json_or_rejected(
    properties: dict[str, Any],
) -> None:
    try:
        _, body = _messages.track("u", "E", properties=properties)
    except ValidationError:
        return
    assert isinstance(strict_loads(body)["properties"], dict)


_plain_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(properties=st.dictionaries(st.text(max_size=8), _plain_json, max_size=5))
def test_plain_json_properties_round_trip_exactly(properties: dict[str, Any]) -> None:
    # Text from st.text() has no surrogates; plain JSON is stored as is.
    assert stored_properties(properties) == properties


_anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    _TEXT,
    st.binary(max_size=4),
    st.decimals(),
    st.uuids(),
    st.lists(st.integers(), max_size=2),
    st.datetimes(),
)


@settings(max_examples=300, deadline=None)
@given(
    user_id=_anything,
    event=_anything,
    anonymous_id=_anything,
    message_id=_anything,
    timestamp=_anything,
    group_id=_anything,
)
def test_any_ids_event_and_timestamp_are_stored_as_strict_json_or_rejected(
    user_id: Any, event: Any, anonymous_id: Any, message_id: Any, timestamp: Any, group_id: Any
) -> None:
    builds: list[Callable[[], tuple[dict[str, Any], bytes]]] = [
        lambda: _messages.track(
            user_id, event, anonymous_id=anonymous_id, message_id=message_id, timestamp=timestamp
        ),
        lambda: _messages.group(user_id, group_id, anonymous_id=anonymous_id),
        lambda: _messages.page(anonymous_id, event, event, message_id=message_id),
        lambda: _messages.alias(group_id, user_id, timestamp=timestamp),
    ]
    for build in builds:
        try:
            _, body = build()
        except ValidationError:
            continue
        strict_loads(body)


# --------------------------------------------------------------------------- ids and time


def test_new_message_id_is_a_version_4_rfc_4122_uuid() -> None:
    for _ in range(1000):
        text = _messages.new_message_id()
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
        assert UUID4_RE.match(text)


def test_new_message_id_is_unique_over_100k_calls() -> None:
    ids = [_messages.new_message_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    # All four RFC 4122 variant digits occur: the variant nibble is not stuck.
    assert {i[19] for i in ids} == set("89ab")


def test_now_timestamp_is_utc_iso8601_with_milliseconds() -> None:
    text = _messages.now_timestamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", text)
    moment = datetime.fromisoformat(text)
    assert abs(moment - datetime.now(timezone.utc)) < timedelta(seconds=5)


def test_frozen_time_gives_the_frozen_timestamp() -> None:
    with freeze_time("2024-02-29 12:34:56.789"):
        assert _messages.now_timestamp() == "2024-02-29T12:34:56.789+00:00"
        stored = strict_loads(_messages.track("u", "E")[1])
        assert stored["timestamp"] == "2024-02-29T12:34:56.789+00:00"
    with freeze_time("2030-01-01 00:00:00.001"):
        assert _messages.now_timestamp() == "2030-01-01T00:00:00.001+00:00"


@pytest.mark.parametrize(
    ("offset_ns", "millis"),
    [(-501, "788"), (-500, "789"), (0, "789"), (999_499, "789"), (999_500, "790")],
)
def test_now_timestamp_rounds_to_the_microsecond_then_keeps_milliseconds(
    monkeypatch: pytest.MonkeyPatch, offset_ns: int, millis: str
) -> None:
    # 2024-02-29T12:34:56.789Z in ns; the one-entry cache must follow the clock both ways.
    base = 1_709_210_096_789_000_000
    for step in (0, offset_ns, -10_000_000, offset_ns):
        monkeypatch.setattr(time, "time_ns", lambda step=step: base + step)
        expected = millis if step == offset_ns else ("789" if step == 0 else "779")
        assert _messages.now_timestamp() == f"2024-02-29T12:34:56.{expected}+00:00"


def test_format_timestamp_truncates_to_milliseconds() -> None:
    assert (
        _messages.format_timestamp(datetime(2024, 1, 1, 0, 0, 0, 999_999))
        == "2024-01-01T00:00:00.999+00:00"
    )


def test_clean_json_converts_like_the_calls() -> None:
    assert _messages.clean_json({"a": (1, Decimal("2.5")), 3: {b"x"}}) == {
        "a": [1, 2.5],
        "3": ["x"],
    }
    with pytest.raises(ValidationError, match=r"^clean: value\.a: NaN"):
        _messages.clean_json({"a": math.nan})


# --------------------------------------------------------------------------- objects that raise


class Boom(Exception):
    """An application's own exception, raised by one method of a user object."""


class Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("not even printable")


_RAISES: list[Callable[[], BaseException]] = [
    Boom,
    Unprintable,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    RuntimeError,
    RecursionError,
    lambda: UnicodeEncodeError("utf-8", "x", 0, 1, "boom"),
]


class _Mapping(Mapping[Any, Any]):
    def __init__(self) -> None:
        self._data = {"k": 1}

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class _Sequence(Sequence[Any]):
    def __getitem__(self, index: Any) -> Any:
        return [1, 2][index]

    def __len__(self) -> int:
        return 2


class _Key:
    """A hashable key of a type JSON does not know: refused, never converted with str()."""


# (base class, arguments, methods that may raise): one bomb per base and method.
_BOMBS: list[tuple[type, tuple[Any, ...], tuple[str, ...]]] = [
    (_Mapping, (), ("items", "keys", "__iter__", "__getitem__", "__len__", "values")),
    (dict, ({"k": 1},), ("items", "keys", "__iter__", "__getitem__", "__len__")),
    (list, ([1, 2],), ("__iter__", "__getitem__", "__len__")),
    (_Sequence, (), ("__iter__", "__getitem__", "__len__")),
    (_Key, (), ("__str__", "__repr__")),
    (int, (7,), ("__str__", "__repr__", "__int__", "__index__")),
    (float, (1.5,), ("__float__", "__repr__", "__str__")),
    (datetime, (2024, 1, 2, 3, 4, 5), ("isoformat", "utcoffset", "replace")),
    (date, (2024, 1, 2), ("isoformat",)),
    (Decimal, ("1.5",), ("is_finite", "__float__", "__str__")),
    (uuid.UUID, ("12345678123456781234567812345678",), ("__str__",)),
]


def _bomb(
    base: type, args: tuple[Any, ...], method: str, error: Callable[[], BaseException]
) -> Any:
    def raising(self: Any, *a: Any, **k: Any) -> Any:
        raise error()

    cls = type(f"Bad{base.__name__.strip('_').title()}", (base,), {method: raising})
    return cls(*args)


# Where the object goes in a call, and the path the ValidationError must name.
_PLACES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "property value": ("properties.a.b[0]", lambda b: _messages.track("u", "E", {"a": {"b": [b]}})),
    "property key": ("properties.a", lambda b: _messages.track("u", "E", {"a": {b: 1}})),
    "properties": ("properties", lambda b: _messages.track("u", "E", b)),
    "context": ("context", lambda b: _messages.track("u", "E", context=b)),
    "context value": ("context.x", lambda b: _messages.track("u", "E", context={"x": b})),
    "traits value": ("traits.t", lambda b: _messages.identify("u", {"t": b})),
    "timestamp": ("timestamp", lambda b: _messages.track("u", "E", timestamp=b)),
    "user_id": ("user_id", lambda b: _messages.track(b, "E")),
    "group_id": ("group_id", lambda b: _messages.group("u", b)),
    "message_id": ("message_id", lambda b: _messages.track("u", "E", message_id=b)),
    "enqueued property": (
        "properties.p",
        lambda b: _messages.encode(Track(user_id="u", event="E", properties={"p": b})),
    ),
}


@settings(max_examples=400, deadline=None)
@given(
    bomb=st.sampled_from([(base, args, m) for base, args, ms in _BOMBS for m in ms]),
    error=st.sampled_from(_RAISES),
    place=st.sampled_from(sorted(_PLACES)),
)
def test_user_objects_that_raise_become_a_validation_error_naming_the_path(
    bomb: tuple[type, tuple[Any, ...], str], error: Callable[[], BaseException], place: str
) -> None:
    """An object whose __str__, items(), __iter__, __getitem__, __len__, isoformat… raises is
    either stored as strict JSON (the method was never needed) or refused with a
    ValidationError that names where it was: never the object's own exception."""
    path, call = _PLACES[place]
    try:
        value = _bomb(*bomb, error)
        hash(value)
    except Exception:
        if place == "property key":
            return  # cannot be a key at all: the user's own dict literal fails first
        value = _bomb(*bomb, error)
    try:
        _, body = call(value)
    except ValidationError as exc:
        message = str(exc)
    else:
        strict_loads(body)
        return
    assert path.split(".")[0].split("[")[0] in message, message
    if "raised" in message and place not in ("properties", "context"):
        assert path in message or path.rsplit(".", 1)[0] in message, message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (object(), "cannot convert object to JSON (use str, int"),
        (datetime(2024, 1, 1).time(), "cannot convert datetime.time to JSON (e.g. .isoformat()"),
        (timedelta(1), "cannot convert datetime.timedelta to JSON (e.g. .total_seconds()"),
        (numpy.bool_(True), "cannot convert numpy.bool to JSON (convert it with .tolist()"),
        (numpy.array([1]), "cannot convert numpy.ndarray to JSON (convert it with .tolist()"),
        (numpy.datetime64("2024-01-01"), "cannot convert numpy.datetime64 to JSON"),
    ],
    ids=["object", "time", "timedelta", "numpy-bool", "numpy-array", "numpy-datetime64"],
)
def test_a_value_json_cannot_hold_is_named_by_its_module_qualified_type(
    value: Any, message: str
) -> None:
    """``numpy.bool`` is never reported as ``bool``: the error names the type and the way out."""
    with pytest.raises(ValidationError) as raised:
        _messages.track("u", "E", {"a": [value]})
    assert str(raised.value).startswith(f"track: properties.a[0]: {message}"), raised.value


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ((1, 2), "the key (1, 2) (a tuple)"),
        (frozenset({1}), "the key frozenset({1}) (a frozenset)"),
    ],
)
def test_a_key_json_has_no_name_for_is_refused_naming_the_path(key: Any, shown: str) -> None:
    """A tuple key is never sent as the string "(1, 2)": the call fails naming the mapping."""
    with pytest.raises(ValidationError) as raised:
        _messages.identify("u", {"a": {"b": {key: 1}}})
    assert str(raised.value) == (
        f"identify: traits.a.b: {shown} cannot be a JSON name "
        "(use str, int, float, bool or None keys)"
    )


def test_a_key_of_a_user_type_is_refused_without_calling_its_str() -> None:
    """A key JSON has no name for is refused by type: its raising ``__str__`` is never run."""
    key = _bomb(_Key, (), "__str__", Boom)
    with pytest.raises(
        ValidationError,
        match=r"^track: properties\.a: a key of type test_messages\.BadKey cannot be a JSON name",
    ):
        _messages.track("u", "E", {"a": {key: 1}})


def test_a_dict_whose_items_raises_names_its_path() -> None:
    bad = _bomb(dict, ({"k": 1},), "items", RuntimeError)
    with pytest.raises(ValidationError, match=r"^track: properties\.a\[1\]: .*RuntimeError"):
        _messages.track("u", "E", {"a": [1, bad]})
