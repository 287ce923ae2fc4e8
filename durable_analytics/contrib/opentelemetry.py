"""OpenTelemetry metrics for a client: queue gauges and delivery counters (extra ``otel``).

::

    from durable_analytics.contrib.opentelemetry import instrument
    instrument(client)                      # the global MeterProvider, or meter_provider=...

Every instrument is observable: nothing is added to the call path. At each collection one
``client.stats()`` snapshot (a read of the queue file, shared by every process on it)
feeds the gauges ``durable_analytics.pending``, ``.leased``, ``.dead_letters``,
``.pending.size``, ``.oldest_message.age``, the per-destination gauges (attributes ``host``
and ``write_key``, its first 4 characters) and the counter ``durable_analytics.dropped``.
The counters ``durable_analytics.sent``, ``.dead_lettered``, ``.retries`` and ``.requests``
(attribute ``status``: the HTTP status, or ``"error"`` when no answer came) count the
deliveries of this process, whichever client or drain made them.
Only ``opentelemetry-api`` is needed; the SDK and exporters are the application's choice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from opentelemetry import metrics

from durable_analytics import Client, __version__
from durable_analytics._metrics import (
    METRICS,
    Sample,
    delivery_counters,
    delivery_samples,
    queue_samples,
)

__all__ = ["instrument"]

# How long one queue snapshot serves the callbacks of one collection (they run back to back).
_SNAPSHOT_SECONDS = 0.25


class _Snapshots:
    """One ``stats()`` read per collection, however many instruments ask for it."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._samples: list[Sample] = []

    def samples(self, key: str) -> list[Sample]:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= _SNAPSHOT_SECONDS:
                self._samples = queue_samples(self._client.stats(), now=time.time())
                self._at = now
            return [s for s in self._samples if s.key == key]


def _callback(
    source: Callable[[str], list[Sample]], key: str
) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
    def observe(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [metrics.Observation(s.value, dict(s.labels)) for s in source(key)]

    return observe


def _delivery(key: str) -> list[Sample]:
    return [s for s in delivery_samples(delivery_counters.snapshot()) if s.key == key]


def instrument(client: Client, *, meter_provider: metrics.MeterProvider | None = None) -> None:
    """Report ``client``'s queue health and this process's deliveries (see the module)."""
    meter = metrics.get_meter("durable_analytics", __version__, meter_provider=meter_provider)
    snapshots = _Snapshots(client)
    sources: dict[str, Callable[[str], list[Sample]]] = {}
    for key in (
        "pending",
        "leased",
        "dead_letters",
        "bytes",
        "oldest_age",
        "destination_pending",
        "destination_failures",
        "destination_backoff",
        "destination_window",
        "destination_in_flight",
        "last_error_time",
        "dropped",
    ):
        sources[key] = snapshots.samples
    for key in ("sent", "dead_lettered", "retries", "requests"):
        sources[key] = _delivery
    for key, source in sources.items():
        metric = METRICS[key]
        create = (
            meter.create_observable_counter
            if metric.kind == "counter"
            else meter.create_observable_gauge
        )
        create(
            metric.otel,
            callbacks=[_callback(source, key)],
            unit=metric.unit,
            description=metric.help,
        )
