"""The six calls are written once, in ``_calls.CALLS``; every other copy must agree with it.

The builders in ``_messages``, ``Client``'s methods, the message dataclasses and the CLI's
enqueue commands each spell the parameter list out (the first three keep explicit signatures
for type checkers); the module-level calls take ``Client``'s signatures by forwarding. These
tests fail when one of them drifts from the table: a parameter added, dropped, renamed or
moved, or a field sent under another name.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

import durable_analytics
from durable_analytics import Client, _messages
from durable_analytics._calls import CALLS, CallField, CallSpec
from durable_analytics.cli import cli
from durable_analytics.exceptions import ValidationError

CALL_NAMES = sorted(CALLS)
WHEN = datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=timezone.utc)
DATACLASSES = {
    "identify": durable_analytics.Identify,
    "track": durable_analytics.Track,
    "page": durable_analytics.Page,
    "screen": durable_analytics.Screen,
    "group": durable_analytics.Group,
    "alias": durable_analytics.Alias,
}


def positional(function: Any) -> list[str]:
    """The names of the parameters that can be given by position (``self`` excluded)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.kind in kinds and p.name != "self"
    ]


def sample(spec: CallSpec, field: CallField) -> Any:
    """A value for ``field`` that is valid and tells the fields apart."""
    if field.kind == "object":
        return {"from": field.name}
    if field.kind == "timestamp":
        return WHEN
    return f"{spec.name}-{field.name}"


def expected_on_the_wire(spec: CallSpec, field: CallField, message: dict[str, Any]) -> Any:
    value = sample(spec, field)
    if field.name == "context":
        return {**value, "library": message["context"]["library"]}
    if field.kind == "timestamp":
        return "2024-05-01T12:00:00.123+00:00"
    return value


def assert_every_field_on_the_wire(spec: CallSpec, message: dict[str, Any]) -> None:
    assert message["type"] == spec.name
    for field in spec.fields:
        assert message[field.wire] == expected_on_the_wire(spec, field, message), field.name
    # alias carries a null anonymousId as segment-analytics-python does; nothing else is extra.
    extra = set(message) - {"type"} - {f.wire for f in spec.fields}
    assert extra <= ({"anonymousId"} if spec.name == "alias" else set())


def test_the_table_names_the_six_calls_with_unique_fields() -> None:
    assert set(CALLS) == {"identify", "track", "page", "screen", "group", "alias"}
    for name, spec in CALLS.items():
        assert spec.name == name
        assert len(set(spec.parameters)) == len(spec.parameters)
        assert len({f.wire for f in spec.fields}) == len(spec.fields)
        assert set(spec.one_of) <= set(spec.parameters)


@pytest.mark.parametrize("call", CALL_NAMES)
def test_builders_take_the_table_parameters_in_order(call: str) -> None:
    builder = getattr(_messages, call)
    assert positional(builder) == list(CALLS[call].parameters)
    keyword_only = [
        p.name
        for p in inspect.signature(builder).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    assert keyword_only == ["max_bytes"]


@pytest.mark.parametrize("call", CALL_NAMES)
def test_client_methods_take_the_table_parameters_in_order(call: str) -> None:
    assert positional(getattr(Client, call)) == list(CALLS[call].parameters)


@pytest.mark.parametrize("call", CALL_NAMES)
def test_message_dataclasses_have_the_table_fields_in_order(call: str) -> None:
    names = [f.name for f in dataclasses.fields(DATACLASSES[call])]
    assert names == list(CALLS[call].parameters)


@pytest.mark.parametrize("call", CALL_NAMES)
def test_cli_command_has_one_option_per_field(call: str) -> None:
    params = {p.name for p in cli.commands[call].params}
    assert params - {"queue_path", "verbose", "write_key", "host"} == set(CALLS[call].parameters)


@pytest.mark.parametrize("call", CALL_NAMES)
def test_builders_put_each_positional_argument_at_its_wire_name(call: str) -> None:
    spec = CALLS[call]
    message, _ = getattr(_messages, call)(*(sample(spec, f) for f in spec.fields))
    assert_every_field_on_the_wire(spec, message)


@pytest.fixture
def unsent_client() -> Iterator[Client]:
    client = Client("k", send=False)
    yield client
    client.close()


@pytest.mark.parametrize("call", CALL_NAMES)
def test_client_passes_each_positional_argument_to_its_field(
    call: str, unsent_client: Client
) -> None:
    spec = CALLS[call]
    stored, message = getattr(unsent_client, call)(*(sample(spec, f) for f in spec.fields))
    assert stored
    assert_every_field_on_the_wire(spec, message)


@pytest.mark.parametrize("call", CALL_NAMES)
def test_module_level_calls_pass_each_positional_argument_to_its_field(
    call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable_analytics, "default_client", None)
    monkeypatch.setattr(durable_analytics, "write_key", "k")
    monkeypatch.setattr(durable_analytics, "send", False)
    spec = CALLS[call]
    try:
        _, message = getattr(durable_analytics, call)(*(sample(spec, f) for f in spec.fields))
    finally:
        client = durable_analytics.default_client
        if client is not None:
            client.close()
    assert_every_field_on_the_wire(spec, message)


FORWARDED = [*CALL_NAMES, "flush", "join", "shutdown", "stats"]


@pytest.mark.parametrize("name", FORWARDED)
def test_module_level_functions_show_the_client_methods_signature_without_self(
    name: str,
) -> None:
    """inspect, help() and get_type_hints see the method's parameters, not ``*args``."""
    function = getattr(durable_analytics, name)
    method = getattr(Client, name)
    method_signature = inspect.signature(method)
    expected = method_signature.replace(parameters=list(method_signature.parameters.values())[1:])
    assert inspect.signature(function) == expected
    method_hints = typing.get_type_hints(method)

    def widened(hints: dict[str, Any]) -> dict[str, Any]:
        # Python 3.10's get_type_hints adds `| None` to a parameter whose default is
        # None, reading the defaults from the function's own code: the forwarder's are
        # *args/**kwargs. Widened on both sides, the hints mean the same on every version.
        return {
            n: h | None if getattr(expected.parameters.get(n), "default", 0) is None else h
            for n, h in hints.items()
        }

    assert widened(typing.get_type_hints(function)) == widened(method_hints)
    assert "args" not in method_hints
    assert (function.__name__, function.__qualname__) == (name, name)
    assert function.__module__ == "durable_analytics._default"
    assert "default client" in function.__doc__


def test_module_level_calls_go_to_the_default_clients_own_methods(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``default_client`` of a Client subclass has its overrides called, arguments as given."""
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    class Counting(Client):
        def track(self, *args: Any, **kwargs: Any) -> Any:
            seen.append((args, kwargs))
            return super().track(*args, **kwargs)

    with Counting("k", send=False) as client:
        monkeypatch.setattr(durable_analytics, "default_client", client)
        ok, message = durable_analytics.track("u", "E", properties={"a": 1})
        assert (ok, message["event"]) == (True, "E")
        assert durable_analytics.flush() == client.flush()
    assert seen == [(("u", "E"), {"properties": {"a": 1}})]


def test_a_module_level_call_with_an_unknown_keyword_raises_type_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with Client("k", send=False) as client:
        monkeypatch.setattr(durable_analytics, "default_client", client)
        with pytest.raises(TypeError, match="evnt"):
            durable_analytics.track("u", evnt="E")  # type: ignore[call-arg]


@pytest.mark.parametrize("call", CALL_NAMES)
def test_typed_messages_encode_each_field_at_its_wire_name(call: str) -> None:
    spec = CALLS[call]
    typed = DATACLASSES[call](**{f.name: sample(spec, f) for f in spec.fields})
    message, _ = _messages.encode(typed)
    assert_every_field_on_the_wire(spec, message)


@pytest.mark.parametrize(
    ("call", "field"),
    [(name, f.name) for name in CALL_NAMES for f in CALLS[name].fields if f.required],
)
def test_a_required_field_left_out_is_refused(call: str, field: str) -> None:
    spec = CALLS[call]
    args = {f.name: sample(spec, f) for f in spec.fields if f.name != field}
    with pytest.raises(ValidationError, match=f"{call}: {field} is required"):
        getattr(_messages, call)(**args)


@pytest.mark.parametrize("call", [name for name in CALL_NAMES if CALLS[name].one_of])
def test_leaving_out_every_one_of_field_is_refused_and_one_is_enough(call: str) -> None:
    spec = CALLS[call]
    others = {f.name: sample(spec, f) for f in spec.fields if f.name not in spec.one_of}
    with pytest.raises(ValidationError, match=f"{call}: {' or '.join(spec.one_of)} is required"):
        getattr(_messages, call)(**others)
    for name in spec.one_of:
        message, _ = getattr(_messages, call)(**others, **{name: "only-this"})
        assert "only-this" in message.values()


@pytest.mark.parametrize("call", CALL_NAMES)
def test_optional_fields_may_be_left_out(call: str) -> None:
    spec = CALLS[call]
    needed = {f.name: sample(spec, f) for f in spec.fields if f.required}
    if spec.one_of:
        needed[spec.one_of[0]] = "someone"
    message, _ = getattr(_messages, call)(**needed)
    assert message["type"] == call
