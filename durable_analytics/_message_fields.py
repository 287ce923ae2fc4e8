"""The checks of a message's fields, and the values of those left out (id, timestamp).

Private; ``_messages``' builders call these. Each check returns the value as it is sent, or
raises a ``ValidationError`` naming the call and the field.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

from ._message_json import format_timestamp, int_text, raised_text, safe_repr, type_name
from ._version import __version__
from .exceptions import ValidationError

__all__ = [
    "context_field",
    "dict_field",
    "message_id_text",
    "new_message_id",
    "now_timestamp",
    "optional_id",
    "optional_str",
    "required_id",
    "timestamp_text",
    "user_ids",
]

_LIBRARY_NAME = "durable-analytics"

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


# --------------------------------------------------------------------------- checks

# numbers.Real: numpy's integers and floats too, as segment-analytics-python takes any number.
_ID_TYPES = (str, numbers.Real, Decimal, UUID)


def _check_id(call: str, field: str, value: object) -> None:
    """Raise unless ``value`` is a usable id: a string, a finite number (not a bool) or a UUID."""
    if isinstance(value, bool) or not isinstance(value, _ID_TYPES):
        raise ValidationError(
            f"{call}: {field} must be a string or a number, got {safe_repr(value)}"
        )
    try:
        finite = not isinstance(value, (float, Decimal)) or (
            math.isfinite(value) if isinstance(value, float) else value.is_finite()
        )
        if isinstance(value, numbers.Integral):
            int_text(call, field, int(value))
        elif isinstance(value, numbers.Real) and not isinstance(value, float):
            finite = math.isfinite(float(value))  # numpy's floats, fractions
    except ValidationError:
        raise
    except Exception as exc:
        raise ValidationError(
            f"{call}: {field}: the {type_name(value)} raised {raised_text(exc)}"
        ) from None
    if not finite:
        raise ValidationError(f"{call}: {field} must be a finite number")


def optional_id(call: str, field: str, value: object) -> str | None:
    """A user or anonymous id as a string (numbers are converted), or None when absent."""
    if value is None:
        return None
    if type(value) is str:
        return value
    _check_id(call, field, value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, int):
        return str(int(value))  # numpy's integers
    try:
        return str(value)
    except Exception as exc:
        raise ValidationError(f"{call}: {field}: str() raised {raised_text(exc)}") from None


def required_id(call: str, field: str, value: object) -> str | int | float:
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
            raise ValidationError(f"{call}: {field}: str() raised {raised_text(exc)}") from None
    return value  # type: ignore[return-value]


def user_ids(call: str, user_id: object, anonymous_id: object) -> tuple[str | None, str | None]:
    uid = optional_id(call, "user_id", user_id)
    aid = optional_id(call, "anonymous_id", anonymous_id)
    if not uid and not aid:
        raise ValidationError(f"{call}: user_id or anonymous_id is required")
    return uid, aid


def dict_field(call: str, field: str, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if type(value) is dict:
        return value
    if isinstance(value, Mapping):
        try:
            return dict(value)
        except Exception as exc:
            raise ValidationError(
                f"{call}: {field}: reading the {type_name(value)} raised {raised_text(exc)}"
            ) from None
    raise ValidationError(f"{call}: {field} must be a dict, got {type_name(value)}")


def optional_str(call: str, field: str, value: object) -> str | None:
    if value is None or type(value) is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    raise ValidationError(f"{call}: {field} must be a string, got {type_name(value)}")


def timestamp_text(call: str, value: object) -> str:
    if value is None:
        return now_timestamp()
    if isinstance(value, datetime):
        try:
            return format_timestamp(value)
        except Exception as exc:
            raise ValidationError(
                f"{call}: timestamp: the {type_name(value)} raised {raised_text(exc)}"
            ) from None
    raise ValidationError(f"{call}: timestamp must be a datetime, got {type_name(value)}")


def message_id_text(call: str, value: object) -> str:
    if value is None:
        return new_message_id()
    if type(value) is str and value:
        return value
    if isinstance(value, (UUID, numbers.Real, Decimal)) and not isinstance(value, bool):
        # As segment-analytics-python sends it: str() of it (a number must be finite).
        if not isinstance(value, numbers.Integral):
            _check_id(call, "message_id", value)  # (an integer's check is int_text's)
        try:
            if isinstance(value, numbers.Integral):
                return int_text(call, "message_id", int(value))
            return str(value)
        except ValidationError:
            raise
        except Exception as exc:
            raise ValidationError(f"{call}: message_id: str() raised {raised_text(exc)}") from None
    if isinstance(value, str) and value:
        return str.__str__(value)
    raise ValidationError(f"{call}: message_id must be a non-empty string, got {safe_repr(value)}")


def context_field(call: str, context: object) -> dict[str, Any]:
    library = {"name": _LIBRARY_NAME, "version": __version__}
    if context is None:
        return {"library": library}
    ctx = dict_field(call, "context", context)
    # A copy: the caller's dict is never mutated (segment-analytics-python mutates it).
    return {**ctx, "library": library}
