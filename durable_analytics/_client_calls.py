"""The write path of a ``Client``: the six calls and ``enqueue``, stored, staged or dropped.

A call validates and serializes its message (``_messages``), then ``_store`` appends it to
the queue and returns after the COMMIT, stages it in the caller's open transaction
(``connection=``), or reports it dropped by a queue cap (with a rate-limited warning).
Everything else about the client's life (start, fork, delivery, exit) is ``Client``'s, in
``_client``: this mixin reaches it only through the attributes and the two hooks it declares.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

from . import _messages
from ._store import QueueBackend
from .exceptions import ConfigError

if TYPE_CHECKING:
    from ._config import Config
    from ._flusher import Flusher

__all__ = ["ClientCalls", "Id", "JSONObject", "MessageId", "Result", "Staged"]

# The Client's logger: the calls' warnings read as the client's, as before the split.
log = logging.getLogger("durable_analytics.client")

#: At most one "the cap dropped messages" warning per client per this many seconds.
DROP_WARN_EVERY = 60.0

Result = tuple[bool, dict[str, Any]]
#: A user, anonymous, group or previous id: a string, or a number (sent as a string).
Id = str | int | float | Decimal | UUID
#: ``properties``, ``traits``, ``context`` and ``integrations``: any mapping of JSON values.
JSONObject = Mapping[str, Any]
MessageId = str | UUID | int


class Staged(tuple[bool, dict[str, Any]]):
    """``(True, message)`` of a call given ``connection=``: staged, not yet committed.

    The message was inserted in the caller's open transaction (the transactional outbox):
    it is delivered if and only if the caller commits. ``isinstance(result, Staged)``.
    """

    __slots__ = ()


class ClientCalls:
    """Mixin of ``Client``: segment's six calls and ``enqueue``, and the path that stores them.

    ``Client`` sets the attributes below and implements the two hooks: ``_start`` (the
    flusher and the exit handler, on the first call in a process) and ``_deliver_now``
    (``sync_mode``).
    """

    config: Config
    _queue: QueueBackend | None
    _dest: int
    _max_bytes: int
    _sync: bool
    _calling: threading.local
    _calls_here: int
    _started: bool
    _flusher: Flusher | None
    _drops: int
    _drop_warned_at: float

    def _start(self) -> None:
        raise NotImplementedError

    def _deliver_now(self, row_id: int) -> None:
        raise NotImplementedError

    def _store(self, msg: dict[str, Any], body: bytes, connection: Any = None) -> Result:
        queue = self._queue
        if queue is None:  # send=False: validated, queued nowhere (as segment does)
            return True, msg
        if connection is not None:
            return self._stage(queue, msg, body, connection)
        calling = self._calling
        if getattr(calling, "now", False):
            # A signal handler interrupted this thread inside another call, perhaps while it
            # held the flusher's wake-up lock (a plain lock): store only, the interrupted
            # call wakes the flusher. The queue's own locks are reentrant.
            row_id = queue.append(self._dest, body)
            if not row_id:
                self._dropped()
            self._calls_here += 1
            return bool(row_id), msg
        calling.now = True
        try:
            row_id = queue.append(self._dest, body)
            if not row_id:
                self._dropped()
            self._calls_here += 1
            if not self._started:
                self._start()
            flusher = self._flusher
            if flusher is not None:
                flusher.on_append()
            if self._sync and row_id:
                self._deliver_now(row_id)
        finally:
            calling.now = False
        return bool(row_id), msg

    def _stage(self, queue: QueueBackend, msg: dict[str, Any], body: bytes, conn: Any) -> Result:
        """The transactional outbox: the message joins the caller's open transaction."""
        stage = getattr(queue, "stage", None)
        if stage is None:
            raise ConfigError(
                "connection= (the transactional outbox) needs a PostgreSQL queue: "
                "Client(write_key, queue_url='postgresql://...'), in the database of that "
                "connection"
            )
        row_id = int(stage(self._dest, body, conn))
        self._calls_here += 1
        if not self._started:
            self._start()
        # No wake-up nor sync_mode delivery: it is not committed yet. A flusher sends it
        # within flush_interval of the caller's COMMIT.
        return Staged((True, msg)) if row_id else (False, msg)

    def _dropped(self) -> None:
        """The size cap refused a message: warn now, then at most once a minute, with counts."""
        self._drops += 1
        now = time.monotonic()
        if now - self._drop_warned_at < DROP_WARN_EVERY:
            return
        since = "" if self._drop_warned_at == -math.inf else " since the last warning"
        self._drop_warned_at = now
        count, self._drops = self._drops, 0
        caps = f"max_queue_bytes={self.config.max_queue_bytes}"
        if self.config.max_queue_size is not None:
            # segment's count cap refuses the same way; either may have been reached.
            caps += f", max_queue_size={self.config.max_queue_size}"
        log.warning(
            "the queue %s is full (%s): dropped %d new message%s%s "
            "(overflow=%r; the calls returned False). Is delivery failing?",
            self.config.queue_name,
            caps,
            count,
            "" if count == 1 else "s",
            since,
            self.config.overflow,
        )

    def identify(
        self,
        user_id: Id | None = None,
        traits: JSONObject | None = None,
        context: JSONObject | None = None,
        timestamp: datetime | None = None,
        anonymous_id: Id | None = None,
        integrations: JSONObject | None = None,
        message_id: MessageId | None = None,
        *,
        connection: Any = None,
    ) -> Result:
        """Queue an identify call: who the user is, with their ``traits``."""
        msg, body = _messages.identify(
            user_id,
            traits,
            context,
            timestamp,
            anonymous_id,
            integrations,
            message_id,
            max_bytes=self._max_bytes,
        )
        return self._store(msg, body, connection)

    def track(
        self,
        user_id: Id | None = None,
        event: str | None = None,
        properties: JSONObject | None = None,
        context: JSONObject | None = None,
        timestamp: datetime | None = None,
        anonymous_id: Id | None = None,
        integrations: JSONObject | None = None,
        message_id: MessageId | None = None,
        *,
        connection: Any = None,
    ) -> Result:
        """Queue a track call: the user did ``event``, with its ``properties``."""
        msg, body = _messages.track(
            user_id,
            event,
            properties,
            context,
            timestamp,
            anonymous_id,
            integrations,
            message_id,
            max_bytes=self._max_bytes,
        )
        return self._store(msg, body, connection)

    def page(
        self,
        user_id: Id | None = None,
        category: str | None = None,
        name: str | None = None,
        properties: JSONObject | None = None,
        context: JSONObject | None = None,
        timestamp: datetime | None = None,
        anonymous_id: Id | None = None,
        integrations: JSONObject | None = None,
        message_id: MessageId | None = None,
        *,
        connection: Any = None,
    ) -> Result:
        """Queue a page call: the user saw the web page ``name``."""
        msg, body = _messages.page(
            user_id,
            category,
            name,
            properties,
            context,
            timestamp,
            anonymous_id,
            integrations,
            message_id,
            max_bytes=self._max_bytes,
        )
        return self._store(msg, body, connection)

    def screen(
        self,
        user_id: Id | None = None,
        category: str | None = None,
        name: str | None = None,
        properties: JSONObject | None = None,
        context: JSONObject | None = None,
        timestamp: datetime | None = None,
        anonymous_id: Id | None = None,
        integrations: JSONObject | None = None,
        message_id: MessageId | None = None,
        *,
        connection: Any = None,
    ) -> Result:
        """Queue a screen call: the user saw the app screen ``name``."""
        msg, body = _messages.screen(
            user_id,
            category,
            name,
            properties,
            context,
            timestamp,
            anonymous_id,
            integrations,
            message_id,
            max_bytes=self._max_bytes,
        )
        return self._store(msg, body, connection)

    def group(
        self,
        user_id: Id | None = None,
        group_id: Id | None = None,
        traits: JSONObject | None = None,
        context: JSONObject | None = None,
        timestamp: datetime | None = None,
        anonymous_id: Id | None = None,
        integrations: JSONObject | None = None,
        message_id: MessageId | None = None,
        *,
        connection: Any = None,
    ) -> Result:
        """Queue a group call: the user belongs to ``group_id``, with the group's ``traits``."""
        msg, body = _messages.group(
            user_id,
            group_id,
            traits,
            context,
            timestamp,
            anonymous_id,
            integrations,
            message_id,
            max_bytes=self._max_bytes,
        )
        return self._store(msg, body, connection)

    def alias(
        self,
        previous_id: Id | None = None,
        user_id: Id | None = None,
        context: JSONObject | None = None,
        timestamp: datetime | None = None,
        integrations: JSONObject | None = None,
        message_id: MessageId | None = None,
        *,
        connection: Any = None,
    ) -> Result:
        """Queue an alias call: ``previous_id`` and ``user_id`` are the same user."""
        msg, body = _messages.alias(
            previous_id,
            user_id,
            context,
            timestamp,
            integrations,
            message_id,
            max_bytes=self._max_bytes,
        )
        return self._store(msg, body, connection)

    def enqueue(self, message: _messages.Message, *, connection: Any = None) -> Result:
        """Queue a typed message: ``Track(...)``, ``Identify(...)`` and the other four types."""
        msg, body = _messages.encode(message, self._max_bytes)
        return self._store(msg, body, connection)
