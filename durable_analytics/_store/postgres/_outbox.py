"""The transactional outbox: a message inserted on the caller's own connection.

The message is inserted inside the caller's open transaction and not committed: it exists
(and any flusher delivers it) if and only if the caller commits. A connection is first
checked to reach the very database holding the queue (the queue's instance id), using only
statements that cannot fail, so a refused connection's transaction is left as it was.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Protocol

from durable_analytics.exceptions import ConfigError, QueueError

from . import _sql as q
from ._caps import Caps
from ._schema import Sql

__all__ = ["DBAPIConnection", "Outbox"]


class DBAPIConnection(Protocol):
    """A DB-API 2 connection with the ``%s`` paramstyle (psycopg 3, psycopg2, Django's)."""

    def cursor(self) -> Any: ...


class Outbox:
    """Stages messages of one PostgreSQL queue on callers' connections."""

    def __init__(self, sql: Sql, identity: str, caps: Caps, instance: str) -> None:
        self._sql = sql
        self.identity = identity
        self._caps = caps
        self.instance = instance
        self._checked: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()

    def stage(self, dest_id: int, body: bytes, connection: DBAPIConnection) -> int:
        """Insert the message in the caller's open transaction (see ``PostgresQueue.stage``)."""
        body = bytes(body)
        self.check(connection)
        if not self._caps.room_for(len(body)):
            return 0
        if self._caps.count_due() and not self._caps.count_room():
            return 0
        return self._insert(connection, dest_id, body, None)

    def _insert(
        self, connection: DBAPIConnection, dest_id: int, body: bytes, enqueued_at: float | None
    ) -> int:
        cur = connection.cursor()
        try:
            cur.execute(self._sql(q.INSERT).decode(), (dest_id, body, len(body), enqueued_at))
            row = cur.fetchone()
        except Exception as exc:
            # On the caller's connection: their transaction is now aborted, say why.
            raise QueueError(
                f"staging the message in your transaction on {self.identity} failed: {exc}"
            ) from exc
        finally:
            with contextlib.suppress(Exception):
                cur.close()
        self._caps.appended(len(body))
        return int(row[0]) if row else 0

    def check(self, connection: DBAPIConnection) -> None:
        """Refuse a connection that does not reach this queue's database (checked once).

        Only statements that cannot fail run on the caller's connection, so a refused
        connection's transaction is left as it was.
        """
        with contextlib.suppress(TypeError):
            if self._checked.get(connection):
                return
        refusal = ConfigError(
            f"connection= must reach the database holding the queue ({self.identity}): "
            "this one does not; the message was not staged"
        )
        try:
            cur = connection.cursor()
        except Exception as exc:
            raise refusal from exc
        try:
            cur.execute("SELECT to_regclass(%s)::text", (f"{self._sql.quoted}.meta",))
            found = cur.fetchone()
            if found is None or found[0] is None:
                raise refusal
            cur.execute(self._sql(q.INSTANCE).decode())
            row = cur.fetchone()
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"{refusal} (checking it failed: {exc})") from exc
        finally:
            with contextlib.suppress(Exception):
                cur.close()
        if row is None or row[0] != self.instance:
            raise refusal
        with contextlib.suppress(TypeError):
            self._checked[connection] = True
