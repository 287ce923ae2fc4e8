"""The SQLite backend: one queue file shared by any number of threads and processes.

Modules, lowest first (each imports only those above it): ``errors`` (SQLite codes and
their ``QueueError``), ``schema``, ``holders`` (lease holders' identity and liveness),
``forks`` (this process's queues across ``fork()``, the raw-read lock), ``files`` (the
file and its directory on disk), ``probe`` (raw header checks), ``rawpages`` and
``salvage`` (reading a damaged file), ``transactions`` (write, read, busy retries) and
``connections`` (per-thread connections and fork, inheriting them), ``leases`` (taking a
batch and the fence), ``inspect`` (stats), ``dead_letters``, ``append`` (the cap),
``recovery`` (damaged files) and ``queue`` (``SqliteQueue``, which composes them).
"""

from __future__ import annotations

from .queue import SqliteQueue
from .recovery import RecoveryReport
from .schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "RecoveryReport", "SqliteQueue"]
