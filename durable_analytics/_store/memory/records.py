"""The rows of the in-memory queue: destinations, messages, lease records, dead letters."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ROW_OVERHEAD", "Dead", "Dest", "LeaseRecord", "Message"]

# What one message costs against max_queue_bytes beyond its body: the same estimate the
# SQLite queue uses for a row, so a cap means about as many messages in either.
ROW_OVERHEAD = 48


@dataclass
class Dest:
    host: str
    write_key: str
    not_before: float = 0.0
    failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


@dataclass
class Message:
    dest: int
    body: bytes
    enqueued_at: float
    attempts: int = 0
    not_before: float | None = None


@dataclass
class LeaseRecord:
    dest: int
    ids: list[int]
    mono_expires: float


@dataclass
class Dead:
    dest: int
    body: bytes
    enqueued_at: float
    dead_at: float
    attempts: int
    status: int | None
    reason: str
    excerpt: str = field(default="")
