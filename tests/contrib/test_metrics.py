"""Metrics: Prometheus text parsed back, and OpenTelemetry read through the SDK's reader."""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

from durable_analytics import Client, QueueStats
from durable_analytics._metrics import (
    METRICS,
    DeliveryCounts,
    delivery_counters,
    delivery_samples,
    queue_samples,
    render_prometheus,
)
from durable_analytics.contrib import opentelemetry as otel_contrib
from durable_analytics.contrib.opentelemetry import instrument
from durable_analytics.contrib.prometheus import CONTENT_TYPE, render
from durable_analytics.testing import Collector, Reply
from tests.conftest import WRITE_KEY

FAILING_KEY = "failing-key-0002"


@pytest.fixture
def busy_queue(tmp_path: Path, collector: Collector) -> Iterator[tuple[Client, Path]]:
    """A queue with delivered, pending, dead-lettered, dropped and backing-off messages."""
    directory = tmp_path / 'q "odd" \\ dir'  # label values must be escaped
    directory.mkdir(mode=0o700)
    path = directory / "queue.sqlite3"
    good = Client(WRITE_KEY, host=collector.url, queue_path=path, flusher="none", on_exit="none")
    _, bad = good.track("u", "Rejected")
    collector.reject_message_ids(bad["messageId"])
    for i in range(4):
        good.track(f"u{i}", "Sent")
    assert good.flush(timeout=10).dead_lettered == 1
    for i in range(3):
        good.track(f"u{i}", "Waiting")
    with Collector() as down:
        down.set_default(Reply(503, headers={"Retry-After": "30"}))
        failing = Client(
            FAILING_KEY,
            host=down.url,
            queue_path=path,
            flusher="none",
            on_exit="none",
            max_retries=0,
        )
        failing.track("u", "Failing")
        failing.track("u", "Failing")
        failing.flush()
        failing.close(timeout=0)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE counters SET value = 7 WHERE name = 'dropped_newest'")
    conn.close()
    yield good, path
    good.close(timeout=0)


def _check_against(stats: QueueStats, values: dict[tuple[str, frozenset[Any]], float]) -> None:
    def value(name: str, **labels: str) -> float:
        return values[(name, frozenset(labels.items()))]

    assert (stats.pending, stats.leased, stats.dead_letters, stats.dropped) == (5, 0, 1, 7)
    assert stats.bytes > 0
    assert value("pending") == 5
    assert value("leased") == 0
    assert value("dead_letters") == 1
    assert value("bytes") == stats.bytes
    assert value("dropped") == 7
    assert value("oldest_age") >= 0
    good, bad = sorted(stats.destinations, key=lambda d: d.write_key != WRITE_KEY[:4] + "…")
    assert value("destination_pending", host=good.host, write_key=good.write_key) == 3
    assert value("destination_failures", host=good.host, write_key=good.write_key) == 0
    assert value("destination_backoff", host=good.host, write_key=good.write_key) == 0
    assert value("destination_pending", host=bad.host, write_key=bad.write_key) == 2
    assert value("destination_failures", host=bad.host, write_key=bad.write_key) == 1
    # Retry-After: 30 (the stored time has whole seconds)
    assert 28 <= value("destination_backoff", host=bad.host, write_key=bad.write_key) <= 31
    assert value("last_error_time") > 0


def test_prometheus_text_parses_and_carries_the_queue_stats(
    busy_queue: tuple[Client, Path],
) -> None:
    """Every queue figure comes through the official parser with the value stats() has."""
    client, path = busy_queue
    stats = client.stats()
    text = render_prometheus(queue_samples(stats, now=time.time()), {"queue": str(path)})
    assert text.endswith("\n")
    by_name = {m.prometheus.removesuffix("_total"): k for k, m in METRICS.items()}
    values: dict[tuple[str, frozenset[Any]], float] = {}
    families = list(text_string_to_metric_families(text))
    for family in families:
        assert family.type == METRICS[by_name[family.name]].kind
        assert family.documentation
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("queue") == str(path)  # escaped and parsed back whole
            key = by_name[sample.name.removesuffix("_total")]
            values[(key, frozenset(labels.items()))] = sample.value
    _check_against(stats, values)
    assert WRITE_KEY not in text
    assert FAILING_KEY not in text


def test_delivery_counters_render_by_status() -> None:
    """Requests are counted by status, a network error as status="error"."""
    counts = DeliveryCounts(sent=40, dead_lettered=1, retries=3, requests={200: 2, 500: 3, None: 1})
    text = render_prometheus(delivery_samples(counts))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples == {
        ("durable_analytics_sent_messages_total", ()): 40,
        ("durable_analytics_dead_lettered_messages_total", ()): 1,
        ("durable_analytics_retries_total", ()): 3,
        ("durable_analytics_requests_total", (("status", "200"),)): 2,
        ("durable_analytics_requests_total", (("status", "500"),)): 3,
        ("durable_analytics_requests_total", (("status", "error"),)): 1,
    }


def test_an_empty_render_is_empty() -> None:
    """No samples, no text (a textfile collector reads an empty file as no metrics)."""
    assert render_prometheus([]) == ""


def test_opentelemetry_instruments_read_back_through_the_sdk(
    busy_queue: tuple[Client, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's in-memory reader sees every gauge and the dropped counter, with values."""
    client, _ = busy_queue
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrument(client, meter_provider=provider)
    data = reader.get_metrics_data()
    assert data is not None
    by_otel = {m.otel: k for k, m in METRICS.items()}
    values: dict[tuple[str, frozenset[Any]], float] = {}
    kinds: dict[str, str] = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            assert scope_metrics.scope.name == "durable_analytics"
            for metric in scope_metrics.metrics:
                key = by_otel[metric.name]
                assert metric.unit == METRICS[key].unit
                kinds[key] = type(metric.data).__name__
                for point in metric.data.data_points:
                    labels = frozenset((k, str(v)) for k, v in point.attributes.items())
                    values[(key, labels)] = point.value
    _check_against(client.stats(), values)
    assert kinds["dropped"] == "Sum"
    assert kinds["pending"] == "Gauge"
    # A later collection sees new messages (the snapshot is not kept forever).
    client.track("u", "Later")
    monkeypatch.setattr(otel_contrib, "_SNAPSHOT_SECONDS", 0.0)
    again = reader.get_metrics_data()
    assert again is not None
    pending = [
        p.value
        for rm in again.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "durable_analytics.pending"
        for p in m.data.data_points
    ]
    assert pending == [6]
    provider.shutdown()


def test_contrib_prometheus_renders_a_clients_queue(busy_queue: tuple[Client, Path]) -> None:
    """``render(client)`` is the queue's text, labelled with the queue path."""
    client, path = busy_queue
    text = render(client)
    [pending] = [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "durable_analytics_pending_messages"
    ]
    assert (pending.value, pending.labels) == (5, {"queue": str(path)})
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def _otel_values(reader: InMemoryMetricReader) -> dict[tuple[str, frozenset[Any]], float]:
    data = reader.get_metrics_data()
    assert data is not None
    by_otel = {m.otel: k for k, m in METRICS.items()}
    return {
        (by_otel[m.name], frozenset((k, str(v)) for k, v in p.attributes.items())): p.value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for p in m.data.data_points
    }


def test_delivery_counters_match_what_the_collector_answered(
    collector: Collector, queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent, dead-lettered, retries and requests by status agree with the server's log."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    client = Client(
        WRITE_KEY,
        host=collector.url,
        queue_path=queue_path,
        flusher="none",
        on_exit="none",
        flush_at=10,
    )
    instrument(client, meter_provider=provider)
    before = _otel_values(reader)
    ids = [client.track(f"u{i}", "Counted")[1]["messageId"] for i in range(30)]
    collector.script(503)  # the first request fails once, then its quick retry succeeds
    collector.reject_message_ids(ids[25])  # one bad message: split, then dead-lettered
    result = client.flush(timeout=30)
    assert (result.sent, result.dead_lettered, result.pending) == (29, 1, 0)
    monkeypatch.setattr(otel_contrib, "_SNAPSHOT_SECONDS", 0.0)
    after = _otel_values(reader)

    def delta(key: str, **labels: str) -> float:
        at = (key, frozenset(labels.items()))
        return after.get(at, 0) - before.get(at, 0)

    answered = Counter(b.status for b in collector.batches)
    assert answered[503] == 1
    assert answered[400] >= 1
    for status, n in answered.items():
        assert delta("requests", status=str(status)) == n
    assert delta("sent") == 29 == len(collector.message_ids())
    assert delta("dead_lettered") == 1
    assert delta("retries") == 1
    # The Prometheus rendering of the same process counters agrees.
    text = render(client)
    [sent] = [
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "durable_analytics_sent_messages_total"
    ]
    assert sent == after[("sent", frozenset())]
    provider.shutdown()
    client.close(timeout=0)


def test_a_forked_child_counts_from_zero() -> None:
    """After fork the child's counters start at zero; the parent's are unchanged."""
    delivery_counters.sent(5)
    before = delivery_counters.snapshot().sent
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its count and leave at once
        os.close(r)
        os.write(w, str(delivery_counters.snapshot().sent).encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert child == "0"
    assert delivery_counters.snapshot().sent == before
