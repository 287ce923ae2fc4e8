"""The two libraries side by side: what a scenario needs to run against either one.

A scenario is written once and parametrized over ``lib`` (``segment`` and ``durable``); it
makes the same calls a user would make after changing only the import line, then asserts
what the user sees. Where the libraries differ on purpose the expected value comes from
``differs(lib, key, segment=..., durable=...)``, which insists that ``key`` is a row of the
table in ``differences.py``.
"""

from __future__ import annotations

import atexit
import copy
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

import segment.analytics as segment_analytics
import segment.analytics.request as segment_request

import durable_analytics

from .differences import BY_KEY

T = TypeVar("T")

#: Message fields that legitimately differ between two runs or two libraries.
VOLATILE = frozenset({"messageId", "timestamp"})


@dataclass
class Lib:
    """One of the two libraries, as a user's code sees it."""

    name: str
    module: ModuleType
    Client: Any
    library_name: str
    made: list[Any] = field(default_factory=list)

    def __repr__(self) -> str:
        return self.name

    @property
    def is_segment(self) -> bool:
        """True for segment-analytics-python, the reference."""
        return self.name == "segment"

    def client(self, *args: Any, **kwargs: Any) -> Any:
        """``Client(*args, **kwargs)``, stopped when the test ends."""
        client = self.Client(*args, **kwargs)
        self.made.append(client)
        return client

    def api_error(self) -> type[Exception]:
        """The exception ``sync_mode`` raises when the server refuses a batch."""
        if self.is_segment:
            return segment_request.APIError
        found = getattr(durable_analytics, "APIError", None)
        if found is None:
            raise AttributeError("durable_analytics has no APIError yet")
        return found  # type: ignore[no-any-return]

    def stop(self, client: Any) -> None:
        """End a client's background work without waiting for a dead server."""
        if self.is_segment:
            # Paused consumers end within upload_interval on their own (daemon threads);
            # not joining them keeps each scenario from waiting for that.
            for consumer in getattr(client, "consumers", None) or []:
                consumer.pause()
        else:
            client.close(timeout=0)
            # What a scenario left queued lives in its tmp_path: nothing to deliver at exit.
            atexit.unregister(client._at_exit)


def make_libs() -> dict[str, Callable[[], Lib]]:
    """Factories of the two ``Lib`` objects, by parameter id."""
    return {
        "segment": lambda: Lib(
            "segment", segment_analytics, segment_analytics.Client, "analytics-python"
        ),
        "durable": lambda: Lib(
            "durable", durable_analytics, durable_analytics.Client, "durable-analytics"
        ),
    }


def differs(lib: Lib, key: str, *, segment: T, durable: T) -> T:
    """The expected value on ``lib`` for an intended difference listed as ``key``."""
    if key not in BY_KEY:
        raise KeyError(f"{key!r} is not a row of tests/compat/differences.py")
    return segment if lib.is_segment else durable


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    """A message as both libraries must produce it: volatile fields and the library gone.

    Keys whose value is None are dropped too: segment's returned message keeps
    ``anonymousId: None`` and its cleaner drops other Nones; what matters is the value.
    """
    out = {k: copy.deepcopy(v) for k, v in message.items() if k not in VOLATILE}
    context = dict(out.get("context") or {})
    context.pop("library", None)
    out["context"] = context
    return {k: v for k, v in out.items() if v is not None}


def wire(message: dict[str, Any]) -> dict[str, Any]:
    """A returned message as it goes on the wire (segment serializes datetimes late)."""
    return json.loads(json.dumps(message, cls=segment_request.DatetimeSerializer))  # type: ignore[no-any-return]


def received(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """What reached the collector, comparable, in arrival order."""
    return [comparable(m) for m in messages]


def sorted_by_event(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages ordered by their ``event``/``name``/``type`` (batches may interleave)."""
    return sorted(
        messages,
        key=lambda m: (str(m.get("type")), str(m.get("event") or m.get("name") or "")),
    )
