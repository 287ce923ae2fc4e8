"""The in-memory backend as a user selects it: ``queue_path=":memory:"``.

The queue behaviour itself is proved by the contract suite (test_contract.py); here, what
is particular to this backend: how it is chosen, that delivery runs on it end to end, and
what it refuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import WRITE_KEY

from durable_analytics import Client
from durable_analytics._config import Config
from durable_analytics._store import MemoryQueue, open_queue
from durable_analytics.exceptions import ConfigError
from durable_analytics.testing import Collector


def test_memory_path_opens_the_in_memory_backend_and_writes_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    queue = open_queue(Config.build("k", queue_path=":memory:", max_queue_bytes=1 << 20))
    assert isinstance(queue, MemoryQueue)
    assert queue.max_queue_bytes == 1 << 20
    queue.close()
    assert list(tmp_path.iterdir()) == []


def test_client_on_a_memory_queue_delivers_every_message_once(collector: Collector) -> None:
    client = Client(WRITE_KEY, host=collector.url, queue_path=":memory:", flush_at=7)
    for i in range(50):
        client.track(user_id="u", event="E", properties={"i": i})
    result = client.flush(timeout=10)
    client.shutdown()
    received = sorted(m["properties"]["i"] for m in collector.messages())
    assert received == list(range(50))
    assert result.pending == 0


@pytest.mark.parametrize("settings", [{"flusher": "process"}, {"on_exit": "spawn"}])
def test_memory_queue_refuses_settings_that_need_another_process(
    settings: dict[str, str],
) -> None:
    with pytest.raises(ConfigError, match="this process only"):
        open_queue(Config.build("k", queue_path=":memory:", **settings))
