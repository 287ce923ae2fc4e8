"""Fixtures for the CLI tests: a runner with a clean environment, a closed port, a corrupt queue."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from .helpers import ENV_NAMES


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env=dict.fromkeys(ENV_NAMES))


@pytest.fixture
def closed_port() -> str:
    """A URL on 127.0.0.1 where nothing listens (connections are refused at once)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def corrupt_queue(queue_path: Path) -> Path:
    queue_path.write_bytes(os.urandom(8192))
    queue_path.chmod(0o600)
    return queue_path
