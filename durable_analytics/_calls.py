"""The six calls' parameters, written once: their order, wire names, kinds and required flags.

Pure data. ``_messages`` builds and checks each call by hand for speed, and
``_message_json`` derives its cleaning lists from this table; the CLI generates its enqueue
commands from it; and ``tests/test_calls.py`` holds the builders, ``Client``'s methods, the
module-level calls and the message dataclasses to it, so that none of those copies can drift.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

__all__ = ["CALLS", "CallField", "CallSpec", "FieldKind"]

#: What a field holds, which decides how it is checked (and how the CLI reads it):
#: ``id`` a string, number or UUID; ``string`` text; ``object`` a JSON object (a dict);
#: ``timestamp`` a datetime; ``message_id`` a non-empty string, an int or a UUID.
FieldKind = Literal["id", "string", "object", "timestamp", "message_id"]


@dataclass(frozen=True)
class CallField:
    """One parameter of a call: its keyword, its JSON name on the wire, what it holds."""

    name: str
    wire: str
    kind: FieldKind
    doc: str
    required: bool = False
    #: What an absent (None) value becomes, for the docs; "" when it is simply left out.
    default: str = ""


@dataclass(frozen=True)
class CallSpec:
    """One of the six calls: its parameters in their positional order.

    ``one_of`` names fields of which at least one must be given (the user's ids).
    """

    name: str
    fields: tuple[CallField, ...]
    one_of: tuple[str, ...] = ()

    @property
    def parameters(self) -> tuple[str, ...]:
        """The keywords of the call, in positional order."""
        return tuple(f.name for f in self.fields)


_USER_ID = CallField("user_id", "userId", "id", "The user's id")
_ANONYMOUS_ID = CallField("anonymous_id", "anonymousId", "id", "An id for a user not known yet")
_CONTEXT = CallField("context", "context", "object", "The context (ip, locale, app...)")
_TIMESTAMP = CallField("timestamp", "timestamp", "timestamp", "When it happened", default="now")
_INTEGRATIONS = CallField(
    "integrations",
    "integrations",
    "object",
    'Destinations to turn on or off ({"All": false}: all off)',
)
_MESSAGE_ID = CallField(
    "message_id",
    "messageId",
    "message_id",
    "The messageId, for deduplication",
    default="a new UUID",
)
_USER_IDS = ("user_id", "anonymous_id")


def _page_like_spec(call: str, seen: str) -> CallSpec:
    return CallSpec(
        call,
        (
            _USER_ID,
            CallField("category", "category", "string", f"The category of the {seen}"),
            CallField("name", "name", "string", f"The name of the {seen}"),
            CallField("properties", "properties", "object", f"Properties of the {seen}"),
            _CONTEXT,
            _TIMESTAMP,
            _ANONYMOUS_ID,
            _INTEGRATIONS,
            _MESSAGE_ID,
        ),
        _USER_IDS,
    )


#: The six calls and their parameters, in the positional order of segment-analytics-python 2.x.
#: The builders in ``_messages``, ``Client``'s methods, the message dataclasses and the CLI's
#: enqueue commands all follow it; tests/test_calls.py fails when one of them does not.
CALLS: Mapping[str, CallSpec] = MappingProxyType(
    {
        "identify": CallSpec(
            "identify",
            (
                _USER_ID,
                CallField("traits", "traits", "object", "Traits of the user"),
                _CONTEXT,
                _TIMESTAMP,
                _ANONYMOUS_ID,
                _INTEGRATIONS,
                _MESSAGE_ID,
            ),
            _USER_IDS,
        ),
        "track": CallSpec(
            "track",
            (
                _USER_ID,
                CallField("event", "event", "string", "What the user did", required=True),
                CallField("properties", "properties", "object", "Properties of the event"),
                _CONTEXT,
                _TIMESTAMP,
                _ANONYMOUS_ID,
                _INTEGRATIONS,
                _MESSAGE_ID,
            ),
            _USER_IDS,
        ),
        "page": _page_like_spec("page", "web page"),
        "screen": _page_like_spec("screen", "app screen"),
        "group": CallSpec(
            "group",
            (
                _USER_ID,
                CallField("group_id", "groupId", "id", "The group's id", required=True),
                CallField("traits", "traits", "object", "Traits of the group"),
                _CONTEXT,
                _TIMESTAMP,
                _ANONYMOUS_ID,
                _INTEGRATIONS,
                _MESSAGE_ID,
            ),
            _USER_IDS,
        ),
        "alias": CallSpec(
            "alias",
            (
                CallField(
                    "previous_id", "previousId", "id", "The user's previous id", required=True
                ),
                CallField("user_id", "userId", "id", "The user's new id", required=True),
                _CONTEXT,
                _TIMESTAMP,
                _INTEGRATIONS,
                _MESSAGE_ID,
            ),
        ),
    }
)
