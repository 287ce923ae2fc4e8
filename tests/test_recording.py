"""Tests of durable_analytics.testing.RecordingTransport and Client(transport=...).

Delivery runs through the real queue (a SQLite file in tmp_path) and the real Deliverer;
only the network is replaced, by the public in-memory transport under test. Quick retries
sleep through an injected no-op.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import WRITE_KEY

from durable_analytics import Client
from durable_analytics._config import Config
from durable_analytics._delivery import Deliverer, make_deliverer
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._transport import DestinationOverride
from durable_analytics.exceptions import ConfigError
from durable_analytics.testing import RecordingTransport, Reply, SentBatch


def test_a_client_with_a_recording_transport_delivers_every_message_once(
    queue_path: Path,
) -> None:
    transport = RecordingTransport()
    # flusher="none": flush() sends all five itself, so its count is exact (a flusher thread
    # may deliver some first, and flush() would then rightly count fewer).
    client = Client(
        WRITE_KEY, queue_path=queue_path, transport=transport, flush_at=2, flusher="none"
    )
    ids = [client.track(user_id="u", event=f"e{i}")[1]["messageId"] for i in range(5)]
    result = client.flush(timeout=10)
    client.close()
    # The flusher thread may have sent some before flush() looked: they are not flush's.
    assert (result.pending, result.dead_lettered) == (0, 0)
    assert transport.message_ids() == dict.fromkeys(ids, 1)
    # Batches are in flight side by side: they may arrive in any order.
    assert sorted(m["event"] for m in transport.messages()) == [f"e{i}" for i in range(5)]
    assert all(
        b.host == "https://api.segment.io" and b.write_key == WRITE_KEY for b in transport.batches
    )
    assert all(len(b.messages) <= 2 for b in transport.batches)
    assert client.stats().pending == 0


def test_sync_mode_delivers_through_the_transport_before_the_call_returns(
    queue_path: Path,
) -> None:
    transport = RecordingTransport()
    client = Client(
        WRITE_KEY, queue_path=queue_path, transport=transport, sync_mode=True, flusher="none"
    )
    ok, message = client.track(user_id="u", event="now")
    assert ok
    assert transport.message_ids() == {message["messageId"]: 1}
    client.close()


def test_the_recorded_body_is_the_segment_envelope(queue_path: Path) -> None:
    transport = RecordingTransport()
    client = Client(WRITE_KEY, queue_path=queue_path, transport=transport, flusher="none")
    client.track(user_id="u", event="e")
    client.flush(timeout=10)
    client.close()
    [batch] = transport.batches
    assert batch.body.startswith(b'{"batch":[{')
    assert b'"sentAt":"' in batch.body
    assert batch.status == 200


def _deliverer(
    queue_path: Path, transport: RecordingTransport, **settings: Any
) -> tuple[Queue, int, Deliverer]:
    config = Config.build(WRITE_KEY, queue_path=queue_path, **settings)
    queue = Queue(config.queue_path)
    dest = queue.destination(config.host, config.write_key)
    return queue, dest, make_deliverer(config, queue, transport, sleep=lambda _s: None)


def test_a_retryable_answer_is_retried_then_the_batch_is_kept_with_a_backoff(
    queue_path: Path,
) -> None:
    transport = RecordingTransport(lambda batch: 503)
    queue, dest, deliverer = _deliverer(queue_path, transport, max_retries=2)
    for i in range(3):
        queue.append(dest, b'{"messageId":"m%d"}' % i)
    stats = deliverer.deliver_next()
    assert stats is not None
    assert (stats.sent, stats.kept) == (0, 3)
    assert transport.requests == 3  # the first try and max_retries=2 quick retries
    assert transport.messages() == []  # nothing was accepted
    assert queue.pending() == 3
    assert queue.backoff(dest)[1] == 1  # one failure recorded for the destination
    queue.close()


def test_a_rejected_message_is_split_out_and_dead_lettered_the_rest_delivered(
    queue_path: Path,
) -> None:
    def handler(batch: SentBatch) -> int:
        return 400 if any(m["messageId"] == "bad" for m in batch.messages) else 200

    transport = RecordingTransport(handler)
    queue, dest, deliverer = _deliverer(queue_path, transport)
    for mid in ("a", "b", "bad", "c"):
        queue.append(dest, b'{"messageId":"%s"}' % mid.encode())
    stats = deliverer.deliver_next()
    assert stats is not None
    assert (stats.sent, stats.dead_lettered) == (3, 1)
    assert transport.message_ids() == {"a": 1, "b": 1, "c": 1}
    assert [d.body for d in queue.dead_letters()] == [b'{"messageId":"bad"}']
    queue.close()


def test_a_network_error_from_the_handler_is_a_retryable_outcome() -> None:
    def handler(batch: SentBatch) -> int:
        raise ConnectionRefusedError("refused")

    transport = RecordingTransport(handler)
    outcome = transport.send(_Dest("https://h", "key"), [b"{}"])
    assert (outcome.kind, outcome.status) == ("retry", None)
    assert "network error" in outcome.error
    assert transport.requests == 1
    assert transport.batches[0].status == 0


def test_a_reply_gives_its_retry_after_and_a_scrubbed_excerpt() -> None:
    transport = RecordingTransport(
        lambda batch: Reply(429, body="bad key secret-key", headers={"retry-after": "7"})
    )
    outcome = transport.send(_Dest("https://h", "secret-key"), [b"{}"])
    assert (outcome.kind, outcome.status, outcome.retry_after) == ("retry", 429, 7.0)
    assert "secret-key" not in outcome.excerpt + outcome.error
    assert "<write key>" in outcome.excerpt


def test_a_destination_override_replaces_host_and_write_key() -> None:
    transport = RecordingTransport()
    override = DestinationOverride(transport, host="https://other", write_key="k2")
    assert override.send(_Dest("https://h", "k1"), [b"{}"]).ok
    [batch] = transport.batches
    assert (batch.host, batch.write_key) == ("https://other", "k2")
    assert override.envelope_overhead() == transport.envelope_overhead()
    override.close()
    assert transport.closed == 1


def test_a_transport_cannot_cross_into_another_process(queue_path: Path) -> None:
    with pytest.raises(ConfigError, match="transport"):
        Client(WRITE_KEY, queue_path=queue_path, transport=RecordingTransport(), flusher="process")
    with pytest.raises(ConfigError, match="transport"):
        Client(WRITE_KEY, queue_path=queue_path, transport=RecordingTransport(), on_exit="spawn")


def test_an_object_that_is_not_a_transport_is_refused(queue_path: Path) -> None:
    with pytest.raises(ConfigError, match="send"):
        Client(WRITE_KEY, queue_path=queue_path, transport=object())  # type: ignore[arg-type]


def test_a_status_outside_http_is_a_clear_error() -> None:
    transport = RecordingTransport(lambda batch: 42)
    with pytest.raises(ValueError, match="100-599"):
        transport.send(_Dest("https://h", "k"), [b"{}"])


class _Dest:
    def __init__(self, host: str, write_key: str) -> None:
        self.host = host
        self.write_key = write_key
