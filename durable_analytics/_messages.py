"""The six message types: validation, JSON cleaning and one-time serialization.

Pure functions, no I/O. Each call builds its message as a dict, serializes it once with the
C JSON encoder and returns ``(message, body)``; the body is what is stored and later sent
byte for byte (only the batch envelope's ``sentAt`` differs between resends).

Serialization takes a fast path when the caller's data is plain JSON already (the common
case) and falls back to a careful cleaner that converts what it can and names the path of
what it cannot (``properties.items[3].price``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from typing import Any, Union
from uuid import UUID

from ._calls import CALLS
from ._version import __version__
from .exceptions import MessageTooLarge, ValidationError

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

#: Containers may nest this deep inside a field (the field's own mapping is level 1).
MAX_DEPTH = 64

_LIBRARY_NAME = "durable-analytics"

# One encoder for every call: ensure_ascii=False keeps the body compact and makes lone
# surrogates fail loudly at .encode("utf-8") so the cleaner can replace them.
# sort_keys: a mapping whose keys mix types (1 and "1", None and "null") cannot be sorted,
# so the fast path fails and the cleaner, which can tell when two keys become one name,
# takes over; costs about 0.6 us a call.
_encoder = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    check_circular=True,
    separators=(",", ":"),
    sort_keys=True,
)


def _refuse(value: object) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _make_fast_encoder() -> Any:
    """The C encoder, built once (``JSONEncoder.encode`` builds it again on every call).

    It runs without a circular-reference registry: a cycle ends in RecursionError, which
    sends the message to the cleaner, and the cleaner names the cycle. Saves about 1 us a
    call. Falls back to the ordinary encoder where the C accelerator is missing.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    basestring = getattr(json.encoder, "c_encode_basestring", None)
    if make is None or basestring is None:
        return _encoder.encode
    encode = make(None, _refuse, basestring, None, ":", ",", True, False, False)

    def fast(value: object) -> str:
        return "".join(encode(value, 0))

    return fast


_encode_json = _make_fast_encoder()

# Where the fast path can fail: unsupported types (TypeError), NaN / Infinity, circular
# references and huge ints (ValueError), deep recursion, and lone surrogates.
_FAST_PATH_ERRORS = (TypeError, ValueError, RecursionError, UnicodeEncodeError)

# If a serialized message holds at most this many "{" and "[" in total, no field can
# nest deeper than MAX_DEPTH, so the exact (slower) depth walk is skipped.
_DEPTH_SAFE_BRACKETS = MAX_DEPTH

_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def new_message_id() -> str:
    """A random (version 4) UUID string, about twice as fast as ``str(uuid.uuid4())``."""
    # os.urandom per call (not a buffered pool) so forked children never repeat ids.
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# (first ns, end ns, text) of the last millisecond formatted: a hit is two int comparisons.
_now_cache: tuple[int, int, str] = (0, -1, "")


def now_timestamp() -> str:
    """The current UTC time as ISO-8601 with milliseconds, cached per millisecond."""
    global _now_cache  # noqa: PLW0603 - a one-entry cache; a racing write stores the same value
    ns = time.time_ns()
    cached = _now_cache
    if cached[0] <= ns < cached[1]:
        return cached[2]
    # Rounded to the microsecond first (+500 ns), as datetime.now() is, so a clock that derives
    # nanoseconds from a float (freezegun's time_ns gives ...788999936 for .789) still yields
    # its own millisecond; integer arithmetic, so no float rounding either.
    ms = (ns + 500) // 1_000_000
    text = (_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")
    _now_cache = (ms * 1_000_000 - 500, ms * 1_000_000 + 999_500, text)
    return text


def format_timestamp(value: datetime) -> str:
    """ISO-8601 with milliseconds and offset. A naive datetime is taken to be UTC."""
    if value.tzinfo is None or value.utcoffset() is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- cleaning


def _fix_str(text: str) -> str:
    """Replace lone surrogates with U+FFFD (and join valid pairs) so the text is UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _int_text(call: str, path: str, value: int) -> str:
    """``str(value)``, or a ValidationError past Python's int-to-str digit limit (4300)."""
    try:
        return str(int(value))
    except ValueError:
        raise ValidationError(f"{call}: {path}: the integer has too many digits") from None


def _raised(exc: BaseException) -> str:
    """What a user object's method raised, for a ValidationError (never raising itself)."""
    try:
        text = one_line_text(str(exc))
    except Exception:
        text = "<unprintable>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def one_line_text(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _safe_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit``, or the type's name when the object's repr raises."""
    try:
        return repr(value)[:limit]
    except Exception:
        return f"<{type(value).__name__}>"


def _clean_key(key: object, path: str, call: str) -> str:
    # Mirrors json.dumps for the key types it converts itself, so the fast and the slow
    # path store the same bytes for the same input.
    if isinstance(key, str):
        # str.__str__: the string's own characters, as the C encoder writes a str subclass
        # (str() of a ``class E(str, Enum)`` member would give "E.A", not its value).
        return _fix_str(str.__str__(key))
    if key is None:
        return "null"
    if key is True:
        return "true"
    if key is False:
        return "false"
    if isinstance(key, Enum):
        return _clean_key(key.value, path, call)
    if isinstance(key, int):
        return _int_text(call, path, key)
    if isinstance(key, float):
        if not math.isfinite(key):
            raise ValidationError(f"{call}: {path}: a NaN or Infinity key is not valid JSON")
        return repr(float(key))
    if isinstance(key, datetime):
        return format_timestamp(key)
    if isinstance(key, date):
        return key.isoformat()
    if isinstance(key, (bytes, bytearray, memoryview)):
        return _fix_str(bytes(key).decode("utf-8", "replace"))
    return _fix_str(str(key))


def _clean(value: object, path: str, call: str, depth: int, active: set[int]) -> Any:
    """Return a JSON-native copy of ``value`` or raise ``ValidationError`` naming ``path``.

    A user object whose own methods raise (``__str__``, ``items()``, ``__iter__``,
    ``isoformat``…) is reported as a ValidationError at its path, never as its exception.
    """
    try:
        return _clean_value(value, path, call, depth, active)
    except ValidationError:
        raise
    except Exception as exc:
        raise ValidationError(
            f"{call}: {path}: cannot convert {type(value).__name__} to JSON: "
            f"it raised {_raised(exc)}"
        ) from None


def _clean_value(value: object, path: str, call: str, depth: int, active: set[int]) -> Any:
    if value is None or value is True or value is False:
        return value
    if isinstance(value, Enum):
        return _clean(value.value, path, call, depth, active)
    if isinstance(value, str):
        return _fix_str(str.__str__(value))
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        _int_text(call, path, value)
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{call}: {path}: NaN and Infinity are not valid JSON")
        return float(value)
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        # is_finite first: float(Decimal("sNaN")) raises ValueError instead of giving nan.
        number = float(value) if value.is_finite() else math.nan
        if not math.isfinite(number):
            raise ValidationError(f"{call}: {path}: {value} is not a finite JSON number")
        return number
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _fix_str(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, numbers.Integral):
        return _clean(int(value), path, call, depth, active)
    if isinstance(value, numbers.Real):
        return _clean(float(value), path, call, depth, active)
    is_mapping = isinstance(value, Mapping)
    if not is_mapping and not isinstance(value, (Sequence, set, frozenset)):
        raise ValidationError(
            f"{call}: {path}: cannot convert {type(value).__name__} to JSON "
            "(use str, int, float, bool, None, dict, list, datetime, Decimal, UUID or Enum)"
        )
    if depth >= MAX_DEPTH:
        raise ValidationError(f"{call}: {path}: nested deeper than {MAX_DEPTH} levels")
    marker = id(value)
    if marker in active:
        raise ValidationError(f"{call}: {path}: circular reference")
    active.add(marker)
    try:
        if is_mapping:
            out: dict[str, Any] = {}
            mapping: Mapping[Any, Any] = value  # type: ignore[assignment]
            for key, item in mapping.items():
                try:
                    name = _clean_key(key, path, call)
                except ValidationError:
                    raise
                except Exception as exc:
                    raise ValidationError(
                        f"{call}: {path}: a key of type {type(key).__name__} cannot become a "
                        f"JSON name: it raised {_raised(exc)}"
                    ) from None
                if name in out:
                    raise ValidationError(
                        f"{call}: {path}: the keys {_safe_repr(key, 40)} and another key both "
                        f"become the name {name!r:.40}; JSON names must be unique"
                    )
                out[name] = _clean(item, f"{path}.{name}", call, depth + 1, active)
            return out
        items: Iterable[Any] = value  # type: ignore[assignment]
        return [
            _clean(item, f"{path}[{index}]", call, depth + 1, active)
            for index, item in enumerate(items)
        ]
    finally:
        active.discard(marker)


def clean_json(value: object, path: str = "value", call: str = "clean") -> Any:
    """Convert ``value`` to plain JSON types as the calls do, or raise ``ValidationError``.

    ``datetime`` and ``date`` become ISO-8601 strings (a naive datetime is taken to be UTC),
    ``Decimal`` a float, ``UUID`` a string, an ``Enum`` its value, sets and tuples lists,
    ``bytes`` UTF-8 text (invalid bytes replaced), non-string keys strings, lone surrogates
    U+FFFD. NaN, Infinity, circular references, nesting deeper than 64 and objects of other
    types are rejected with the path of the offending value. The input is never mutated.
    """
    return _clean(value, path, call, 0, set())


# --------------------------------------------------------------------------- checks

_ID_TYPES = (str, int, float, Decimal, UUID)


def _check_id(call: str, field: str, value: object) -> None:
    """Raise unless ``value`` is a usable id: a string, a finite number (not a bool) or a UUID."""
    if isinstance(value, bool) or not isinstance(value, _ID_TYPES):
        raise ValidationError(
            f"{call}: {field} must be a string or a number, got {_safe_repr(value)}"
        )
    try:
        finite = not isinstance(value, (float, Decimal)) or (
            math.isfinite(value) if isinstance(value, float) else value.is_finite()
        )
        if isinstance(value, int):
            _int_text(call, field, value)
    except ValidationError:
        raise
    except Exception as exc:
        raise ValidationError(
            f"{call}: {field}: the {type(value).__name__} raised {_raised(exc)}"
        ) from None
    if not finite:
        raise ValidationError(f"{call}: {field} must be a finite number")


def _id(call: str, field: str, value: object) -> str | None:
    """A user or anonymous id as a string (numbers are converted), or None when absent."""
    if value is None:
        return None
    if type(value) is str:
        return value
    _check_id(call, field, value)
    if isinstance(value, str):
        return str.__str__(value)
    try:
        return str(value)
    except Exception as exc:
        raise ValidationError(f"{call}: {field}: str() raised {_raised(exc)}") from None


def _require_id(call: str, field: str, value: object) -> str | int | float:
    """A required id that is sent as given (segment-analytics-python does not convert it)."""
    if type(value) is str and value:
        return value
    if value is None or (isinstance(value, str) and not value):
        raise ValidationError(f"{call}: {field} is required")
    _check_id(call, field, value)
    if isinstance(value, (UUID, Decimal)):
        try:
            return str(value)
        except Exception as exc:
            raise ValidationError(f"{call}: {field}: str() raised {_raised(exc)}") from None
    return value  # type: ignore[return-value]


def _user(call: str, user_id: object, anonymous_id: object) -> tuple[str | None, str | None]:
    uid = _id(call, "user_id", user_id)
    aid = _id(call, "anonymous_id", anonymous_id)
    if not uid and not aid:
        raise ValidationError(f"{call}: user_id or anonymous_id is required")
    return uid, aid


def _mapping(call: str, field: str, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if type(value) is dict:
        return value
    if isinstance(value, Mapping):
        try:
            return dict(value)
        except Exception as exc:
            raise ValidationError(
                f"{call}: {field}: reading the {type(value).__name__} raised {_raised(exc)}"
            ) from None
    raise ValidationError(f"{call}: {field} must be a dict, got {type(value).__name__}")


def _optional_str(call: str, field: str, value: object) -> str | None:
    if value is None or type(value) is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    raise ValidationError(f"{call}: {field} must be a string, got {type(value).__name__}")


def _timestamp(call: str, value: object) -> str:
    if value is None:
        return now_timestamp()
    if isinstance(value, datetime):
        try:
            return format_timestamp(value)
        except Exception as exc:
            raise ValidationError(
                f"{call}: timestamp: the {type(value).__name__} raised {_raised(exc)}"
            ) from None
    raise ValidationError(f"{call}: timestamp must be a datetime, got {type(value).__name__}")


def _message_id(call: str, value: object) -> str:
    if value is None:
        return new_message_id()
    if type(value) is str and value:
        return value
    if isinstance(value, (UUID, int)) and not isinstance(value, bool):
        try:
            return _int_text(call, "message_id", value) if isinstance(value, int) else str(value)
        except ValidationError:
            raise
        except Exception as exc:
            raise ValidationError(f"{call}: message_id: str() raised {_raised(exc)}") from None
    if isinstance(value, str) and value:
        return str.__str__(value)
    raise ValidationError(f"{call}: message_id must be a non-empty string, got {_safe_repr(value)}")


def _context(call: str, context: object) -> dict[str, Any]:
    library = {"name": _LIBRARY_NAME, "version": __version__}
    if context is None:
        return {"library": library}
    ctx = _mapping(call, "context", context)
    # A copy: the caller's dict is never mutated (segment-analytics-python mutates it).
    return {**ctx, "library": library}


def _finish(call: str, msg: dict[str, Any], max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """Serialize once; on anything unusual, clean the message and serialize again."""
    try:
        text = _encode_json(msg)
        body = text.encode("utf-8")
    except Exception:
        # _FAST_PATH_ERRORS, or a user object's own method raising: the cleaner names the
        # path of what failed (as a ValidationError).
        msg, body = _slow_path(call, msg)
    else:
        if text.count("{") + text.count("[") > _DEPTH_SAFE_BRACKETS:
            msg, body = _slow_path(call, msg)
    if len(body) > max_bytes:
        raise MessageTooLarge(call, len(body), max_bytes)
    return msg, body


def _slow_path(call: str, msg: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    msg = _clean_fields(call, msg)
    try:
        return msg, _encode_json(msg).encode("utf-8")
    except Exception as exc:  # a backstop: the cleaned message should always encode
        raise ValidationError(f"{call}: the message cannot be serialized: {exc}") from None


# --------------------------------------------------------------------------- cleaning, per call

# What the slow path cleans, per call: the caller's objects (properties, traits, context,
# integrations) and the top-level strings the caller gave (lone surrogates become U+FFFD).
_CLEAN_PLAN: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    spec.name: (
        tuple(f.wire for f in spec.fields if f.kind == "object"),
        tuple(f.wire for f in spec.fields if f.kind in ("id", "string", "message_id")),
    )
    for spec in CALLS.values()
}


def _clean_fields(call: str, msg: dict[str, Any]) -> dict[str, Any]:
    objects, strings = _CLEAN_PLAN[call]
    out = dict(msg)
    for key in objects:
        if key in out:
            out[key] = _clean(out[key], key, call, 0, set())
    for key in strings:
        value = out.get(key)
        if isinstance(value, str):
            out[key] = _fix_str(str.__str__(value))
    return out


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
    uid, aid = _user("identify", user_id, anonymous_id)
    msg = {
        "type": "identify",
        "messageId": _message_id("identify", message_id),
        "timestamp": _timestamp("identify", timestamp),
        "userId": uid,
        "anonymousId": aid,
        "traits": _mapping("identify", "traits", traits),
        "context": _context("identify", context),
        "integrations": _mapping("identify", "integrations", integrations),
    }
    return _finish("identify", msg, max_bytes)


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
    uid, aid = _user("track", user_id, anonymous_id)
    if type(event) is not str or not event:
        if not isinstance(event, str) or not event:
            raise ValidationError("track: event is required and must be a non-empty string")
        event = str.__str__(event)
    msg = {
        "type": "track",
        "messageId": _message_id("track", message_id),
        "timestamp": _timestamp("track", timestamp),
        "userId": uid,
        "anonymousId": aid,
        "event": event,
        "properties": _mapping("track", "properties", properties),
        "context": _context("track", context),
        "integrations": _mapping("track", "integrations", integrations),
    }
    return _finish("track", msg, max_bytes)


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
    uid, aid = _user(call, user_id, anonymous_id)
    msg = {
        "type": call,
        "messageId": _message_id(call, message_id),
        "timestamp": _timestamp(call, timestamp),
        "userId": uid,
        "anonymousId": aid,
        "category": _optional_str(call, "category", category),
        "name": _optional_str(call, "name", name),
        "properties": _mapping(call, "properties", properties),
        "context": _context(call, context),
        "integrations": _mapping(call, "integrations", integrations),
    }
    return _finish(call, msg, max_bytes)


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
    uid, aid = _user("group", user_id, anonymous_id)
    msg = {
        "type": "group",
        "messageId": _message_id("group", message_id),
        "timestamp": _timestamp("group", timestamp),
        "userId": uid,
        "anonymousId": aid,
        "groupId": _require_id("group", "group_id", group_id),
        "traits": _mapping("group", "traits", traits),
        "context": _context("group", context),
        "integrations": _mapping("group", "integrations", integrations),
    }
    return _finish("group", msg, max_bytes)


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
        "messageId": _message_id("alias", message_id),
        "timestamp": _timestamp("alias", timestamp),
        "previousId": _require_id("alias", "previous_id", previous_id),
        "userId": _require_id("alias", "user_id", user_id),
        # Always null: segment-analytics-python sends the field on alias too.
        "anonymousId": None,
        "context": _context("alias", context),
        "integrations": _mapping("alias", "integrations", integrations),
    }
    msg["userId"] = _id("alias", "user_id", user_id)
    return _finish("alias", msg, max_bytes)


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
            f"got {type(message).__name__}"
        )
    values = [getattr(message, name) for name in message.__dataclass_fields__]
    result: tuple[dict[str, Any], bytes] = builder(*values, max_bytes=max_bytes)
    return result
