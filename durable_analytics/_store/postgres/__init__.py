"""The PostgreSQL queue backend: one queue shared by a fleet, and the transactional outbox.

Optional: it needs psycopg 3 (``pip install 'durable-analytics[postgres]'``). This package
imports without it, so that a URL can be recognised anywhere; importing ``._queue`` without
psycopg raises ``ConfigError`` naming the extra. ``open_queue`` chooses it for a
``postgresql://`` queue URL.
"""

from __future__ import annotations

from durable_analytics._config import is_queue_url as is_postgres_url

__all__ = ["DEFAULT_SCHEMA", "is_postgres_url"]

DEFAULT_SCHEMA = "durable_analytics"
