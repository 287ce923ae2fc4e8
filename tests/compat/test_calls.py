"""The six calls in every argument form: return values, errors and what reaches the server.

The fine print of message content (datetimes inside properties, odd id types, unusual
values) is compared message by message in ``tests/test_compat.py``; here each call goes
through a real client to a real collector.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from durable_analytics.testing import Collector

from .conftest import WRITE_KEY
from .harness import Lib, comparable, differs, wire

TS = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
TS_WIRE = "2024-05-06T07:08:09.123+00:00"
CONTEXT = {"ip": "203.0.113.5", "locale": "fr-FR"}
INTEGRATIONS = {"All": False, "Mixpanel": True}


def expect(kind: str, **fields: Any) -> dict[str, Any]:
    """The comparable form of a message: empty context and integrations unless given."""
    return {"type": kind, "context": {}, "integrations": {}, **fields}


# (call, args, kwargs, the message as both libraries must build it)
CASES: list[tuple[str, tuple[Any, ...], dict[str, Any], dict[str, Any]]] = [
    (
        "identify",
        ("u1", {"email": "a@example.com"}),
        {},
        expect("identify", userId="u1", traits={"email": "a@example.com"}),
    ),
    (
        "identify",
        (),
        {"anonymous_id": "a1", "traits": {"plan": "free"}},
        expect("identify", anonymousId="a1", traits={"plan": "free"}),
    ),
    (
        "identify",
        ("u", {"t": 1}, CONTEXT, TS, "anon", INTEGRATIONS, "mid-identify"),
        {},
        expect(
            "identify",
            userId="u",
            anonymousId="anon",
            traits={"t": 1},
            context=CONTEXT,
            integrations=INTEGRATIONS,
        ),
    ),
    (
        "track",
        ("u1", "Signed Up", {"plan": "Pro"}),
        {},
        expect("track", userId="u1", event="Signed Up", properties={"plan": "Pro"}),
    ),
    ("track", (42, "Numeric"), {}, expect("track", userId="42", event="Numeric", properties={})),
    (
        "track",
        (),
        {"anonymous_id": "a1", "event": "Anonymous", "properties": {"n": 1.5}},
        expect("track", anonymousId="a1", event="Anonymous", properties={"n": 1.5}),
    ),
    (
        "track",
        ("u", "E", {"p": [1, 2]}, CONTEXT, TS, "anon", INTEGRATIONS, "mid-track"),
        {},
        expect(
            "track",
            userId="u",
            anonymousId="anon",
            event="E",
            properties={"p": [1, 2]},
            context=CONTEXT,
            integrations=INTEGRATIONS,
        ),
    ),
    (
        "page",
        ("u1", "Docs", "Install", {"url": "https://example.com/docs"}),
        {},
        expect(
            "page",
            userId="u1",
            category="Docs",
            name="Install",
            properties={"url": "https://example.com/docs"},
        ),
    ),
    ("page", ("u1",), {}, expect("page", userId="u1", properties={})),
    (
        "page",
        (),
        {"anonymous_id": "a1", "name": "Home"},
        expect("page", anonymousId="a1", name="Home", properties={}),
    ),
    (
        "page",
        ("u", "C", "N", {"k": "v"}, CONTEXT, TS, "anon", INTEGRATIONS, "mid-page"),
        {},
        expect(
            "page",
            userId="u",
            anonymousId="anon",
            category="C",
            name="N",
            properties={"k": "v"},
            context=CONTEXT,
            integrations=INTEGRATIONS,
        ),
    ),
    (
        "screen",
        ("u1", "Onboarding", "Welcome", {"step": 1}),
        {},
        expect(
            "screen", userId="u1", category="Onboarding", name="Welcome", properties={"step": 1}
        ),
    ),
    (
        "screen",
        (7,),
        {"name": "Settings"},
        expect("screen", userId="7", name="Settings", properties={}),
    ),
    (
        "screen",
        ("u", "C", "N", {"k": "v"}, CONTEXT, TS, "anon", INTEGRATIONS, "mid-screen"),
        {},
        expect(
            "screen",
            userId="u",
            anonymousId="anon",
            category="C",
            name="N",
            properties={"k": "v"},
            context=CONTEXT,
            integrations=INTEGRATIONS,
        ),
    ),
    (
        "group",
        ("u1", "g1", {"name": "Acme"}),
        {},
        expect("group", userId="u1", groupId="g1", traits={"name": "Acme"}),
    ),
    ("group", ("u1", 42), {}, expect("group", userId="u1", groupId=42, traits={})),
    (
        "group",
        (),
        {"anonymous_id": "a1", "group_id": "g", "traits": {"plan": "pro"}},
        expect("group", anonymousId="a1", groupId="g", traits={"plan": "pro"}),
    ),
    (
        "group",
        ("u", "g", {"t": True}, CONTEXT, TS, "anon", INTEGRATIONS, "mid-group"),
        {},
        expect(
            "group",
            userId="u",
            anonymousId="anon",
            groupId="g",
            traits={"t": True},
            context=CONTEXT,
            integrations=INTEGRATIONS,
        ),
    ),
    ("alias", ("anon-1", "u1"), {}, expect("alias", previousId="anon-1", userId="u1")),
    ("alias", (1, 2), {}, expect("alias", previousId=1, userId="2")),
    (
        "alias",
        ("p", "u", CONTEXT, TS, INTEGRATIONS, "mid-alias"),
        {},
        expect("alias", previousId="p", userId="u", context=CONTEXT, integrations=INTEGRATIONS),
    ),
]
IDS = [f"{call}-{i}" for i, (call, *_) in enumerate(CASES)]


@pytest.mark.parametrize(("call", "args", "kwargs", "expected"), CASES, ids=IDS)
def test_call_returns_true_and_the_message_and_delivers_it(
    lib: Lib,
    collector: Collector,
    call: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    """Each call returns ``(True, message)``; the same message reaches the server once."""
    # segment writes context.library into the caller's dict: give each run its own copy.
    args, kwargs = copy.deepcopy(args), copy.deepcopy(kwargs)
    client = lib.client(WRITE_KEY, host=collector.url)
    result = getattr(client, call)(*args, **kwargs)
    client.flush()
    assert isinstance(result, tuple)
    ok, msg = result
    assert ok is True
    assert comparable(wire(msg)) == expected
    [arrived] = collector.messages()
    assert comparable(arrived) == expected
    assert arrived["messageId"] == msg["messageId"]
    assert arrived["timestamp"] == msg["timestamp"]
    if "mid-" in repr(args):
        assert arrived["messageId"] == f"mid-{call}"
        assert arrived["timestamp"] == TS_WIRE
    assert arrived["context"]["library"]["name"] == differs(
        lib, "library-name", segment="analytics-python", durable="durable-analytics"
    )


def test_the_request_envelope_and_headers(lib: Lib, collector: Collector) -> None:
    """One POST to /v1/batch with JSON, Basic auth with the key, and a ``sentAt``."""
    client = lib.client(WRITE_KEY, host=collector.url)
    client.track("u", "E")
    client.flush()
    [batch] = collector.batches
    assert batch.path == "/v1/batch"
    assert batch.authorized
    assert batch.headers["Content-Type"] == "application/json"
    assert "Content-Encoding" not in batch.headers
    assert "X-Retry-Count" not in batch.headers
    assert batch.headers["User-Agent"].split("/")[0] == differs(
        lib, "library-name", segment="analytics-python", durable="durable-analytics"
    )
    assert set(batch.body) == differs(
        lib,
        "no-write-key-in-body",
        segment={"batch", "sentAt", "writeKey"},
        durable={"batch", "sentAt"},
    )
    assert batch.body["sentAt"][:4].isdigit()
    # segment writes it with microseconds and "+00:00" (durable-analytics wrote ms and "Z").
    sent_at = datetime.fromisoformat(batch.body["sentAt"])
    assert sent_at.utcoffset() == timedelta(0)
    assert batch.body["sentAt"].endswith("+00:00")
    assert len(batch.body["sentAt"].split(".")[-1]) in (len("123456+00:00"), len("+00:00"))


@pytest.mark.parametrize(
    ("field", "value", "sent"),
    [
        ("user_id", "numpy.int64(42)", "42"),
        ("message_id", "1.5", "1.5"),
        ("message_id", "Decimal('5')", "5"),
    ],
)
def test_ids_of_other_number_types_are_sent_as_their_text(
    lib: Lib, collector: Collector, field: str, value: str, sent: str
) -> None:
    """numpy integers as ids (a data pipeline's), a float or ``Decimal`` message id:
    segment sends ``str()`` of them; durable-analytics raised ``ValidationError``."""
    numpy = pytest.importorskip("numpy")
    given = eval(value, {"numpy": numpy, "Decimal": Decimal})
    client = lib.client(WRITE_KEY, host=collector.url)
    kwargs = {"user_id": "u", "event": "E", field: given}
    assert client.track(**kwargs)[0] is True
    client.flush()
    [batch] = collector.batches
    key = {"user_id": "userId", "message_id": "messageId"}[field]
    assert batch.body["batch"][0][key] == sent


def test_gzip_compresses_the_body(lib: Lib, collector: Collector) -> None:
    """``gzip=True``: ``Content-Encoding: gzip`` and a body that decodes to the batch."""
    client = lib.client(WRITE_KEY, host=collector.url, gzip=True)
    client.track("u", "Zipped", {"text": "x" * 1000})
    client.flush()
    [batch] = collector.batches
    assert batch.headers["Content-Encoding"] == "gzip"
    assert len(batch.raw_body) < 1000
    assert [m["event"] for m in batch.messages] == ["Zipped"]


INVALID: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("track", ("u", 123), {}),
    ("track", (None, "E"), {}),
    ("track", ("u", None), {}),
    ("track", ("u", "E", "not a dict"), {}),
    ("track", ("u", "E"), {"context": "not a dict"}),
    ("track", ("u", "E"), {"timestamp": "2024-01-01"}),
    ("track", ("u", "E"), {"integrations": "not a dict"}),
    ("identify", ("u", "not a dict"), {}),
    ("identify", (), {"traits": {"a": 1}}),
    ("page", ("u",), {"name": 5}),
    ("page", ("u",), {"category": 5}),
    ("screen", ("u", None, 5), {}),
    ("group", ("u", None), {}),
    ("group", ("u", "g", "not a dict"), {}),
    ("alias", (None, "u"), {}),
    ("alias", ("p", None), {}),
]


@pytest.mark.parametrize(("call", "args", "kwargs"), INVALID, ids=[c for c, *_ in INVALID])
def test_invalid_call_raises_and_sends_nothing(
    lib: Lib, collector: Collector, call: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """A call with a missing or mistyped argument raises at the call; nothing is sent."""
    client = lib.client(WRITE_KEY, host=collector.url)
    expected = differs(lib, "validation-error-type", segment=AssertionError, durable=ValueError)
    with pytest.raises(expected):
        getattr(client, call)(*args, **kwargs)
    client.track("u", "After")
    client.flush()
    assert [m["event"] for m in collector.messages()] == ["After"]


def test_oversized_message_raises(lib: Lib, collector: Collector) -> None:
    """A message over 32 KB raises at the call; nothing is sent."""
    client = lib.client(WRITE_KEY, host=collector.url)
    expected = differs(lib, "validation-error-type", segment=RuntimeError, durable=ValueError)
    with pytest.raises(expected):
        client.track("u", "Big", {"blob": "x" * 40_000})
    client.flush()
    assert collector.requests == 0


def test_message_of_31_kb_is_accepted(lib: Lib, collector: Collector) -> None:
    """A message just under the limit goes through on both."""
    client = lib.client(WRITE_KEY, host=collector.url)
    ok, _ = client.track("u", "Large", {"blob": "x" * 31_000})
    client.flush()
    assert ok is True
    assert [m["event"] for m in collector.messages()] == ["Large"]
