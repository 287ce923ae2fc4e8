"""The client's health as metrics: one table of names, rendered for Prometheus or OpenTelemetry.

``queue_samples`` turns a ``QueueStats`` snapshot (what ``Client.stats()`` and ``status``
read from the queue file, shared by every process on it) into samples; ``delivery_samples``
does the same for one process's delivery counters. ``render_prometheus`` writes them in the
Prometheus text format (0.0.4), as node-exporter's textfile collector reads it. The
OpenTelemetry integration (``durable_analytics.contrib.opentelemetry``) reports the same
samples under the OpenTelemetry names.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from ._store import QueueStats

__all__ = [
    "METRICS",
    "DeliveryCounters",
    "DeliveryCounts",
    "Metric",
    "Sample",
    "delivery_counters",
    "delivery_samples",
    "queue_samples",
    "render_prometheus",
]

Kind = Literal["gauge", "counter"]


@dataclass(frozen=True)
class Metric:
    """One metric: its Prometheus and OpenTelemetry names, kind, unit and meaning."""

    key: str
    prometheus: str
    otel: str
    kind: Kind
    unit: str
    help: str


_TABLE = [
    Metric("pending", "durable_analytics_pending_messages", "durable_analytics.pending",
           "gauge", "{message}", "Messages stored and not yet delivered (leased or not)."),
    Metric("leased", "durable_analytics_leased_messages", "durable_analytics.leased",
           "gauge", "{message}", "Pending messages under a live lease (being delivered)."),
    Metric("dead_letters", "durable_analytics_dead_letters", "durable_analytics.dead_letters",
           "gauge", "{message}", "Messages the server rejected, kept in the dead letters."),
    Metric("bytes", "durable_analytics_pending_bytes", "durable_analytics.pending.size",
           "gauge", "By", "Size of the pending messages as stored."),
    Metric("oldest_age", "durable_analytics_oldest_message_age_seconds",
           "durable_analytics.oldest_message.age", "gauge", "s",
           "Age of the oldest pending message (0 when none is pending)."),
    Metric("dropped", "durable_analytics_dropped_messages_total", "durable_analytics.dropped",
           "counter", "{message}", "Messages dropped by the max_queue_bytes cap."),
    Metric("destination_pending", "durable_analytics_destination_pending_messages",
           "durable_analytics.destination.pending", "gauge", "{message}",
           "Pending messages of one destination (host and write key prefix)."),
    Metric("destination_failures", "durable_analytics_destination_consecutive_failures",
           "durable_analytics.destination.consecutive_failures", "gauge", "{failure}",
           "Failed deliveries to the destination since its last success."),
    Metric("destination_backoff", "durable_analytics_destination_backoff_seconds",
           "durable_analytics.destination.backoff", "gauge", "s",
           "Seconds until the destination is tried again (0 when not backing off)."),
    Metric("destination_window", "durable_analytics_destination_window_requests",
           "durable_analytics.destination.window", "gauge", "{request}",
           "The destination's in-flight window stored for the fleet (PostgreSQL queue only)."),
    Metric("destination_in_flight", "durable_analytics_destination_live_leases",
           "durable_analytics.destination.live_leases", "gauge", "{lease}",
           "The destination's live leases: slots of its stored window in use."),
    Metric("last_error_time", "durable_analytics_last_error_timestamp_seconds",
           "durable_analytics.last_error.time", "gauge", "s",
           "Unix time of the most recent delivery failure (absent when none)."),
    Metric("sent", "durable_analytics_sent_messages_total", "durable_analytics.sent",
           "counter", "{message}", "Messages this process delivered (answered 2xx)."),
    Metric("dead_lettered", "durable_analytics_dead_lettered_messages_total",
           "durable_analytics.dead_lettered", "counter", "{message}",
           "Messages this process moved to the dead letters."),
    Metric("retries", "durable_analytics_retries_total", "durable_analytics.retries",
           "counter", "{request}", "Requests this process made again after a failure."),
    Metric("requests", "durable_analytics_requests_total", "durable_analytics.requests",
           "counter", "{request}",
           "Batch requests this process made, by HTTP status (\"error\": no answer)."),
]  # fmt: skip

#: Every metric, by key.
METRICS: dict[str, Metric] = {m.key: m for m in _TABLE}


@dataclass(frozen=True)
class Sample:
    """One value of a metric, with its labels (``host``, ``write_key``, ``status``)."""

    key: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DeliveryCounts:
    """Delivery counters of one process, since it started.

    ``requests`` maps an HTTP status (None: no answer, a network error or timeout) to how
    many batch requests got it.
    """

    sent: int = 0
    dead_lettered: int = 0
    retries: int = 0
    requests: Mapping[int | None, int] = field(default_factory=dict)


class DeliveryCounters:
    """This process's delivery counters, added to by every Deliverer in it (thread-safe).

    A forked child starts from zero (its parent's counts are the parent's), so each
    process reports only its own work and a sum over processes counts nothing twice.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent = 0
        self._dead_lettered = 0
        self._retries = 0
        self._requests: dict[int | None, int] = {}

    def request(self, status: int | None, *, retry: bool) -> None:
        """Count one batch request and its answer (None: none came); ``retry``: a resend."""
        with self._lock:
            self._requests[status] = self._requests.get(status, 0) + 1
            if retry:
                self._retries += 1

    def sent(self, messages: int) -> None:
        """Count messages the server accepted."""
        with self._lock:
            self._sent += messages

    def dead_lettered(self, messages: int) -> None:
        """Count messages moved to the dead letters."""
        with self._lock:
            self._dead_lettered += messages

    def snapshot(self) -> DeliveryCounts:
        """The counts so far."""
        with self._lock:
            return DeliveryCounts(
                self._sent, self._dead_lettered, self._retries, dict(self._requests)
            )

    def reset(self) -> None:
        """Start from zero (after a fork)."""
        self._lock = threading.Lock()
        self._sent = self._dead_lettered = self._retries = 0
        self._requests = {}


#: The counters of this process.
delivery_counters = DeliveryCounters()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=delivery_counters.reset)


def _timestamp(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def queue_samples(stats: QueueStats, *, now: float) -> list[Sample]:
    """The queue-file metrics of ``stats``; ``now`` (Unix time) dates the backoffs."""
    out = [
        Sample("pending", stats.pending),
        Sample("leased", stats.leased),
        Sample("dead_letters", stats.dead_letters),
        Sample("bytes", stats.bytes),
        Sample("oldest_age", stats.oldest_age_seconds or 0.0),
        Sample("dropped", stats.dropped),
    ]
    # Two destinations can share a host and a 4-character key prefix: add them up rather
    # than write the same series twice (which a scraper rejects).
    per_dest: dict[tuple[tuple[str, str], ...], list[float]] = {}
    for d in stats.destinations:
        labels: tuple[tuple[str, str], ...] = (("host", d.host), ("write_key", d.write_key))
        until = _timestamp(d.backoff_until)
        backoff = max(0.0, until - now) if until is not None else 0.0
        acc = per_dest.setdefault(labels, [0.0, 0.0, 0.0])
        acc[0] += d.pending
        acc[1] = max(acc[1], d.failures)
        acc[2] = max(acc[2], backoff)
    for labels, (pending, failures, backoff) in per_dest.items():
        out.append(Sample("destination_pending", pending, labels))
        out.append(Sample("destination_failures", failures, labels))
        out.append(Sample("destination_backoff", round(backoff, 3), labels))
    # Only where the queue stores the window for the fleet (PostgreSQL).
    windows: dict[tuple[tuple[str, str], ...], list[float]] = {}
    for d in stats.destinations:
        if d.window is not None:
            labels = (("host", d.host), ("write_key", d.write_key))
            acc = windows.setdefault(labels, [0.0, 0.0])
            acc[0] += d.window
            acc[1] += d.live_leases or 0
    for labels, (window, live) in windows.items():
        out.append(Sample("destination_window", window, labels))
        out.append(Sample("destination_in_flight", live, labels))
    if stats.last_error is not None:
        at = _timestamp(stats.last_error.get("at"))
        if at is not None:
            out.append(Sample("last_error_time", at))
    return out


def delivery_samples(counts: DeliveryCounts) -> list[Sample]:
    """The delivery counters of one process."""
    out = [
        Sample("sent", counts.sent),
        Sample("dead_lettered", counts.dead_lettered),
        Sample("retries", counts.retries),
    ]
    for status, n in sorted(counts.requests.items(), key=lambda kv: (kv[0] is None, kv[0])):
        out.append(Sample("requests", n, (("status", "error" if status is None else str(status)),)))
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def render_prometheus(samples: Iterable[Sample], labels: Mapping[str, str] | None = None) -> str:
    """The samples in the Prometheus text format, each with ``labels`` added (e.g. ``queue``).

    Families come in the table's order, each with its ``# HELP`` and ``# TYPE`` lines; the
    text ends with a newline, as the textfile collector requires.
    """
    common = tuple((labels or {}).items())
    by_key: dict[str, list[Sample]] = {}
    for sample in samples:
        by_key.setdefault(sample.key, []).append(sample)
    lines: list[str] = []
    for metric in _TABLE:
        family = by_key.get(metric.key)
        if not family:
            continue
        lines.append(f"# HELP {metric.prometheus} {metric.help}")
        lines.append(f"# TYPE {metric.prometheus} {metric.kind}")
        for sample in family:
            pairs = common + sample.labels
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
            name = f"{metric.prometheus}{{{text}}}" if text else metric.prometheus
            lines.append(f"{name} {_number(sample.value)}")
    return "\n".join(lines) + "\n" if lines else ""
