"""Messages to JSON: the cleaner for the caller's data and the one-time serialization.

Private; ``_messages`` builds the messages and re-exports ``clean_json``,
``format_timestamp`` and ``MAX_DEPTH``. Serialization takes a fast path when the caller's
data is plain JSON already (the common case) and falls back to a careful cleaner that
converts what it can and names the path of what it cannot (``properties.items[3].price``).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from ._calls import CALLS
from .exceptions import MessageTooLarge, ValidationError

__all__ = [
    "MAX_DEPTH",
    "clean_json",
    "clean_key",
    "format_timestamp",
    "int_text",
    "raised_text",
    "safe_repr",
    "serialize",
    "type_name",
]

#: Containers may nest this deep inside a field (the field's own mapping is level 1).
MAX_DEPTH = 64

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


def int_text(call: str, path: str, value: int) -> str:
    """``str(value)``, or a ValidationError past Python's int-to-str digit limit (4300)."""
    try:
        return str(int(value))
    except ValueError:
        raise ValidationError(f"{call}: {path}: the integer has too many digits") from None


def raised_text(exc: BaseException) -> str:
    """What a user object's method raised, for a ValidationError (never raising itself)."""
    try:
        text = one_line_text(str(exc))
    except Exception:
        text = "<unprintable>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def one_line_text(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def type_name(value: object) -> str:
    """The name of ``value``'s type for an error: ``tuple``, ``datetime.time``, ``numpy.bool``.

    Qualified by its module unless it is a builtin, so that ``numpy.bool`` is not taken
    for ``bool`` nor numpy's ``ndarray`` for something of the caller's.
    """
    kind = type(value)
    name = getattr(kind, "__qualname__", kind.__name__)
    module = getattr(kind, "__module__", None)
    return name if module in (None, "builtins") else f"{module}.{name}"


def safe_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit``, or the type's name when the object's repr raises."""
    try:
        return repr(value)[:limit]
    except Exception:
        return f"<{type(value).__name__}>"


def clean_key(key: object, path: str, call: str) -> str:
    """The JSON name for a mapping key, or a ``ValidationError`` naming ``path``.

    ``str``, ``int``, ``float``, ``bool`` and ``None`` keys become what ``json.dumps`` makes
    of them, so the fast and the slow path store the same bytes for the same input; the
    values the calls convert to one string (``Enum``, ``datetime``, ``date``, ``UUID``,
    ``bytes``, other numbers) become that string. Anything else (a tuple, a frozenset, an
    object) has no JSON name: ``str()`` of it would be a guess the server cannot undo.
    """
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
        return clean_key(key.value, path, call)
    if isinstance(key, int):
        return int_text(call, path, key)
    if isinstance(key, float):
        if not math.isfinite(key):
            raise ValidationError(f"{call}: {path}: a NaN or Infinity key is not valid JSON")
        return repr(float(key))
    if isinstance(key, datetime):
        return format_timestamp(key)
    if isinstance(key, date):
        return key.isoformat()
    if isinstance(key, UUID):
        return str(key)
    if isinstance(key, (bytes, bytearray, memoryview)):
        return _fix_str(bytes(key).decode("utf-8", "replace"))
    if isinstance(key, Decimal):
        if not key.is_finite():
            raise ValidationError(f"{call}: {path}: a NaN or Infinity key is not valid JSON")
        return str(key)
    if isinstance(key, numbers.Integral):
        return int_text(call, path, int(key))
    if isinstance(key, numbers.Real):
        return clean_key(float(key), path, call)
    # The key itself when its repr is short, like (1, 2); its type alone otherwise.
    shown = safe_repr(key, 41)
    what = f"the key {shown} (a {type_name(key)})" if len(shown) <= 40 else None
    raise ValidationError(
        f"{call}: {path}: {what or f'a key of type {type_name(key)}'} cannot be a JSON name "
        "(use str, int, float, bool or None keys)"
    )


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
            f"{call}: {path}: cannot convert {type_name(value)} to JSON: "
            f"it raised {raised_text(exc)}"
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
        int_text(call, path, value)
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
            f"{call}: {path}: cannot convert {type_name(value)} to JSON "
            f"({_conversion_hint(value)}str, int, float, bool, None, dict, list, datetime, "
            "Decimal, UUID or Enum)"
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
                    name = clean_key(key, path, call)
                except ValidationError:
                    raise
                except Exception as exc:
                    raise ValidationError(
                        f"{call}: {path}: a key of type {type_name(key)} cannot become a "
                        f"JSON name: it raised {raised_text(exc)}"
                    ) from None
                if name in out:
                    raise ValidationError(
                        f"{call}: {path}: the keys {safe_repr(key, 40)} and another key both "
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


def _conversion_hint(value: object) -> str:
    """How to convert ``value`` first, where there is an obvious way, before the type list."""
    try:
        numpy_like = callable(getattr(value, "tolist", None))  # numpy scalars and arrays
    except Exception:
        numpy_like = False  # a user object whose __getattr__ raises: no hint, the same error
    if numpy_like:
        return "convert it with .tolist() first; use "
    if isinstance(value, timedelta):
        return "e.g. .total_seconds(); use "
    if isinstance(value, time):
        return "e.g. .isoformat(); use "
    return "use "


def clean_json(value: object, path: str = "value", call: str = "clean") -> Any:
    """Convert ``value`` to plain JSON types as the calls do, or raise ``ValidationError``.

    ``datetime`` and ``date`` become ISO-8601 strings (a naive datetime is taken to be UTC),
    ``Decimal`` a float, ``UUID`` a string, an ``Enum`` its value, sets and tuples lists,
    ``bytes`` UTF-8 text (invalid bytes replaced), number, ``None`` and those keys strings
    (as ``json`` names them), lone surrogates U+FFFD. NaN, Infinity, circular references,
    nesting deeper than 64, keys JSON has no name for (a tuple) and objects of other types
    are rejected with the path of the offending value. The input is never mutated.
    """
    return _clean(value, path, call, 0, set())


# --------------------------------------------------------------------------- serialization


def serialize(call: str, msg: dict[str, Any], max_bytes: int) -> tuple[dict[str, Any], bytes]:
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
