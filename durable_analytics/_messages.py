"""The six message types: their builders, their typed form, and ``encode``.

Pure functions, no I/O. Each call checks its fields (``_message_fields``), builds its message
as a dict, serializes it once with the C JSON encoder (``_message_json``) and returns
``(message, body)``; the body is what is stored and later sent byte for byte (only the batch
envelope's ``sentAt`` differs between resends).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Union

from ._message_fields import (
    context_field,
    dict_field,
    message_id_text,
    new_message_id,
    now_timestamp,
    optional_id,
    optional_str,
    required_id,
    timestamp_text,
    user_ids,
)
from ._message_json import MAX_DEPTH, clean_json, format_timestamp, serialize, type_name
from .exceptions import ValidationError

__all__ = [
    "MAX_DEPTH",
    "Alias",
    "Group",
    "Identify",
    "Message",
    "Page",
    "Screen",
    "Track",
    "alias",
    "clean_json",
    "encode",
    "format_timestamp",
    "group",
    "identify",
    "new_message_id",
    "now_timestamp",
    "page",
    "screen",
    "track",
]


# --------------------------------------------------------------------------- the calls


def identify(
    user_id: Any = None,
    traits: Any = None,
    context: Any = None,
    timestamp: Any = None,
    anonymous_id: Any = None,
    integrations: Any = None,
    message_id: Any = None,
    *,
    max_bytes: int = 32_768,
) -> tuple[dict[str, Any], bytes]:
    """Build and serialize an identify message."""
    uid, aid = user_ids("identify", user_id, anonymous_id)
    msg = {
        "type": "identify",
        "messageId": message_id_text("identify", message_id),
        "timestamp": timestamp_text("identify", timestamp),
        "userId": uid,
        "anonymousId": aid,
        "traits": dict_field("identify", "traits", traits),
        "context": context_field("identify", context),
        "integrations": dict_field("identify", "integrations", integrations),
    }
    return serialize("identify", msg, max_bytes)


def track(
    user_id: Any = None,
    event: Any = None,
    properties: Any = None,
    context: Any = None,
    timestamp: Any = None,
    anonymous_id: Any = None,
    integrations: Any = None,
    message_id: Any = None,
    *,
    max_bytes: int = 32_768,
) -> tuple[dict[str, Any], bytes]:
    """Build and serialize a track message."""
    uid, aid = user_ids("track", user_id, anonymous_id)
    if type(event) is not str or not event:
        if not isinstance(event, str) or not event:
            raise ValidationError("track: event is required and must be a non-empty string")
        event = str.__str__(event)
    msg = {
        "type": "track",
        "messageId": message_id_text("track", message_id),
        "timestamp": timestamp_text("track", timestamp),
        "userId": uid,
        "anonymousId": aid,
        "event": event,
        "properties": dict_field("track", "properties", properties),
        "context": context_field("track", context),
        "integrations": dict_field("track", "integrations", integrations),
    }
    return serialize("track", msg, max_bytes)


def _page_like(
    call: str,
    user_id: Any,
    category: Any,
    name: Any,
    properties: Any,
    context: Any,
    timestamp: Any,
    anonymous_id: Any,
    integrations: Any,
    message_id: Any,
    max_bytes: int,
) -> tuple[dict[str, Any], bytes]:
    uid, aid = user_ids(call, user_id, anonymous_id)
    msg = {
        "type": call,
        "messageId": message_id_text(call, message_id),
        "timestamp": timestamp_text(call, timestamp),
        "userId": uid,
        "anonymousId": aid,
        "category": optional_str(call, "category", category),
        "name": optional_str(call, "name", name),
        "properties": dict_field(call, "properties", properties),
        "context": context_field(call, context),
        "integrations": dict_field(call, "integrations", integrations),
    }
    return serialize(call, msg, max_bytes)


def page(
    user_id: Any = None,
    category: Any = None,
    name: Any = None,
    properties: Any = None,
    context: Any = None,
    timestamp: Any = None,
    anonymous_id: Any = None,
    integrations: Any = None,
    message_id: Any = None,
    *,
    max_bytes: int = 32_768,
) -> tuple[dict[str, Any], bytes]:
    """Build and serialize a page message."""
    return _page_like(
        "page",
        user_id,
        category,
        name,
        properties,
        context,
        timestamp,
        anonymous_id,
        integrations,
        message_id,
        max_bytes,
    )


def screen(
    user_id: Any = None,
    category: Any = None,
    name: Any = None,
    properties: Any = None,
    context: Any = None,
    timestamp: Any = None,
    anonymous_id: Any = None,
    integrations: Any = None,
    message_id: Any = None,
    *,
    max_bytes: int = 32_768,
) -> tuple[dict[str, Any], bytes]:
    """Build and serialize a screen message."""
    return _page_like(
        "screen",
        user_id,
        category,
        name,
        properties,
        context,
        timestamp,
        anonymous_id,
        integrations,
        message_id,
        max_bytes,
    )


def group(
    user_id: Any = None,
    group_id: Any = None,
    traits: Any = None,
    context: Any = None,
    timestamp: Any = None,
    anonymous_id: Any = None,
    integrations: Any = None,
    message_id: Any = None,
    *,
    max_bytes: int = 32_768,
) -> tuple[dict[str, Any], bytes]:
    """Build and serialize a group message."""
    uid, aid = user_ids("group", user_id, anonymous_id)
    msg = {
        "type": "group",
        "messageId": message_id_text("group", message_id),
        "timestamp": timestamp_text("group", timestamp),
        "userId": uid,
        "anonymousId": aid,
        "groupId": required_id("group", "group_id", group_id),
        "traits": dict_field("group", "traits", traits),
        "context": context_field("group", context),
        "integrations": dict_field("group", "integrations", integrations),
    }
    return serialize("group", msg, max_bytes)


def alias(
    previous_id: Any = None,
    user_id: Any = None,
    context: Any = None,
    timestamp: Any = None,
    integrations: Any = None,
    message_id: Any = None,
    *,
    max_bytes: int = 32_768,
) -> tuple[dict[str, Any], bytes]:
    """Build and serialize an alias message."""
    msg: dict[str, Any] = {
        "type": "alias",
        "messageId": message_id_text("alias", message_id),
        "timestamp": timestamp_text("alias", timestamp),
        "previousId": required_id("alias", "previous_id", previous_id),
        "userId": required_id("alias", "user_id", user_id),
        # Always null: segment-analytics-python sends the field on alias too.
        "anonymousId": None,
        "context": context_field("alias", context),
        "integrations": dict_field("alias", "integrations", integrations),
    }
    msg["userId"] = optional_id("alias", "user_id", user_id)
    return serialize("alias", msg, max_bytes)


# --------------------------------------------------------------------------- typed form


@dataclass(frozen=True)
class Identify:
    """An identify message: who the user is (analytics-go's ``Identify``)."""

    user_id: str | int | None = None
    traits: Mapping[str, Any] | None = None
    context: Mapping[str, Any] | None = None
    timestamp: datetime | None = None
    anonymous_id: str | int | None = None
    integrations: Mapping[str, Any] | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class Track:
    """A track message: something the user did (analytics-go's ``Track``)."""

    user_id: str | int | None = None
    event: str | None = None
    properties: Mapping[str, Any] | None = None
    context: Mapping[str, Any] | None = None
    timestamp: datetime | None = None
    anonymous_id: str | int | None = None
    integrations: Mapping[str, Any] | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class Page:
    """A page message: a web page the user saw (analytics-go's ``Page``)."""

    user_id: str | int | None = None
    category: str | None = None
    name: str | None = None
    properties: Mapping[str, Any] | None = None
    context: Mapping[str, Any] | None = None
    timestamp: datetime | None = None
    anonymous_id: str | int | None = None
    integrations: Mapping[str, Any] | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class Screen:
    """A screen message: an app screen the user saw (analytics-go's ``Screen``)."""

    user_id: str | int | None = None
    category: str | None = None
    name: str | None = None
    properties: Mapping[str, Any] | None = None
    context: Mapping[str, Any] | None = None
    timestamp: datetime | None = None
    anonymous_id: str | int | None = None
    integrations: Mapping[str, Any] | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class Group:
    """A group message: the user belongs to a company or team (analytics-go's ``Group``)."""

    user_id: str | int | None = None
    group_id: str | int | None = None
    traits: Mapping[str, Any] | None = None
    context: Mapping[str, Any] | None = None
    timestamp: datetime | None = None
    anonymous_id: str | int | None = None
    integrations: Mapping[str, Any] | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class Alias:
    """An alias message: two ids are the same user (analytics-go's ``Alias``)."""

    previous_id: str | int | None = None
    user_id: str | int | None = None
    context: Mapping[str, Any] | None = None
    timestamp: datetime | None = None
    integrations: Mapping[str, Any] | None = None
    message_id: str | None = None


Message = Union[Identify, Track, Page, Screen, Group, Alias]  # noqa: UP007 - runtime alias on 3.10

_BUILDERS: dict[type, Any] = {
    Identify: identify,
    Track: track,
    Page: page,
    Screen: screen,
    Group: group,
    Alias: alias,
}


def encode(message: Message, max_bytes: int = 32_768) -> tuple[dict[str, Any], bytes]:
    """Validate and serialize a typed message (``Track(...)`` and friends)."""
    builder = _BUILDERS.get(type(message))
    if builder is None:
        raise ValidationError(
            f"enqueue: expected Identify, Track, Page, Screen, Group or Alias, "
            f"got {type_name(message)}"
        )
    values = [getattr(message, name) for name in message.__dataclass_fields__]
    result: tuple[dict[str, Any], bytes] = builder(*values, max_bytes=max_bytes)
    return result
