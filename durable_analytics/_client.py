"""The Client: the lifecycle around the queue, under the six calls and the typed ``enqueue``.

A call validates and serializes its message, appends it to the SQLite queue and returns
after the COMMIT: the calls and that storing path are ``_client_calls``. The flusher (a
thread, a child process, or nobody) starts on the first call, not when the Client is built;
after ``os.fork()`` the child starts its own. At exit, ``on_exit`` decides what happens to
what is still queued. How the client lives across processes (fork, the flusher process, the
exit hook) is ``_client_processes``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from . import _flusher_process
from ._client_calls import ClientCalls, Staged
from ._client_processes import ExitHook, FlusherProcess, live_clients, spawn_drain
from ._client_settings import SettingsAttributes
from ._config import SEGMENT_PARAMETERS, Config, OnError, Settings
from ._delivery import Deliverer, FlushResult, make_deliverer
from ._drain import deliver_until
from ._flusher import Flusher, burst_age_for
from ._oauth import DEFAULT_AUTH_SERVER, DEFAULT_SCOPE
from ._pass import passed
from ._reports import Reported, ReportGate, report_until
from ._store import DeadLetterMark, QueueBackend, QueueStats, open_queue
from ._sync import deliver_now
from ._transport.base import Transport
from ._urls import is_loopback_host
from .exceptions import ConfigError, DurableAnalyticsError, QueueBusy, QueueError, ValidationError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Client", "Staged"]

log = logging.getLogger("durable_analytics.client")
#: An id above every message's: ``pending(up_to_id=_ANY_ID)`` counts the file alone.
_ANY_ID = 1 << 62
# The package logger: where log_handler and debug=True apply, for every module's logger.
_package_log = logging.getLogger("durable_analytics")


class Client(ClientCalls, SettingsAttributes):
    """A Segment-compatible analytics client whose queue lives on disk.

    ``Client(write_key, host, ...)`` takes segment-analytics-python's 22 parameters in its
    positional order (``debug``, ``max_queue_size``, ``send``, ``on_error``, ``gzip``,
    ``max_retries``, ``sync_mode``, ``timeout``, ``proxies``, ``thread``, ``upload_size``,
    ``upload_interval``, ``log_handler``, the five ``oauth_*`` settings,
    ``max_total_backoff_duration``, ``max_rate_limit_duration``), then durable-analytics'
    own settings, keyword-only (see ``Settings`` and the README's settings table):
    ``queue_path``, ``flush_at`` (20), ``flush_interval`` (5 s), ``max_batch_bytes``,
    ``max_message_bytes``, ``durability``, ``flusher``, ``on_exit``, ``shutdown_timeout``,
    ``busy_timeout``, ``lease_timeout``, ``max_in_flight`` (32), ``max_batch_messages``,
    ``max_queue_bytes``, ``overflow``. None means the default;
    ``max_retries`` and ``timeout`` default to 3 and 10 s, and a value passed is used as
    given. Invalid settings raise ``ConfigError``; a queue file that cannot be used raises a
    ``QueueError`` here, not at the first call. The settings are also read-only attributes
    (``client.host``, ``client.timeout``, ...).

    ``transport`` replaces the HTTP transport in this process (the flusher thread,
    ``flush()``, ``sync_mode``, exit): ``durable_analytics.testing.RecordingTransport`` lets
    a test see every batch without a socket. It may be called from two threads at once (the
    flusher thread and ``flush()``) and is closed by ``close()``. It cannot cross into
    another process, so it requires ``flusher="thread"`` or ``"none"`` and ``on_exit="flush"``
    or ``"none"``.

    Each call returns ``(True, message)`` once the message is committed to disk, or
    ``(False, message)`` when a queue cap (``max_queue_bytes``, ``max_queue_size``) dropped
    it. With ``sync_mode=True`` a call also delivers its message before returning and
    raises ``APIError`` when that fails.
    Besides ``ValidationError`` for bad input, a call raises ``QueueDiskFull`` (the disk is
    full) or ``QueueBusy`` (another process held the queue's write lock longer than
    ``busy_timeout``, 10 s by default); then its message was not stored, and nothing stored
    before is lost.
    """

    def __init__(
        self,
        write_key: str | None = None,
        host: str | None = None,
        debug: bool | None = None,
        max_queue_size: int | None = None,
        send: bool = True,
        on_error: OnError | Literal[False] | None = None,
        gzip: bool = False,
        max_retries: int | None = None,
        sync_mode: bool = False,
        timeout: float | None = None,
        proxies: Mapping[str, str] | None = None,
        thread: int | None = None,
        upload_size: int | None = None,
        upload_interval: float | None = None,
        log_handler: logging.Handler | None = None,
        oauth_client_id: str | None = None,
        oauth_client_key: str | None = None,
        oauth_key_id: str | None = None,
        oauth_auth_server: str = DEFAULT_AUTH_SERVER,
        oauth_scope: str = DEFAULT_SCOPE,
        max_total_backoff_duration: float = 43200,
        max_rate_limit_duration: float = 1800,
        *,
        transport: Transport | None = None,
        _recover: bool = True,
        **settings: Unpack[Settings],
    ) -> None:
        # _recover is private: the CLI's one-shot commands report a damaged file (exit 3)
        # rather than repair it; an application's Client moves it aside and carries on.
        recover = _recover
        given = locals()
        peer = {name: given[name] for name in SEGMENT_PARAMETERS[1:]}
        self.config = config = Config.build(write_key, **peer, **settings)
        if transport is not None:
            for name in ("send", "envelope_overhead", "close"):
                if not callable(getattr(transport, name, None)):
                    raise ConfigError(f"transport must have a {name}() method (see Transport)")
            if config.flusher == "process" or config.on_exit == "spawn":
                raise ConfigError(
                    "transport= only works in this process: use flusher='thread' or 'none' "
                    "and on_exit='flush' or 'none'"
                )
        self._transport = transport
        self._max_bytes = config.max_message_bytes
        self._send = config.send
        self._sync = config.sync_mode
        self._configure_logging()
        if config.host.startswith("http://") and not is_loopback_host(config.host):
            log.warning(
                "host %s uses plain http://: events and the write key travel unencrypted",
                config.host,
            )
        self._lock = threading.RLock()
        self._report_gate = ReportGate()
        self._calling = threading.local()  # inside _store on this thread (signal handlers)
        self._queue: QueueBackend | None = None
        self._dest = 0
        if self._send:
            # sync_mode delivers up to the id its append returned: no spool for it.
            self._queue = open_queue(config, recover=recover, spool=not config.sync_mode)
            self._dest = self._queue.destination(config.host, config.write_key)
        self._flusher: Flusher | None = None
        self._process: FlusherProcess | None = None
        self._sync_deliverer: Deliverer | None = None
        self._started = False
        self._calls_here = 0
        self._exited = False
        self._exit_hook = ExitHook()
        self._closed = False
        self._drops = 0
        self._drop_warned_at = -math.inf
        live_clients.add(self)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Client(write_key={c.redacted_key!r}, host={c.host!r}, "
            f"queue={c.queue_name!r}, flusher={c.flusher!r})"
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- set-up

    def _configure_logging(self) -> None:
        c = self.config
        pkg = _package_log
        if c.log_handler is not None and c.log_handler not in pkg.handlers:
            pkg.addHandler(c.log_handler)
        if c.debug:
            pkg.setLevel(logging.DEBUG)
            if not any(not isinstance(h, logging.NullHandler) for h in pkg.handlers):
                pkg.addHandler(logging.StreamHandler())

    @property
    def queue(self) -> QueueBackend:
        """The underlying queue (raises when ``send=False``: nothing is queued then)."""
        if self._queue is None:
            raise DurableAnalyticsError("send=False: this client keeps no queue")
        return self._queue

    def _new_deliverer(self) -> Deliverer:
        # One gate for all of this client's deliverers: its on_error calls never overlap.
        return make_deliverer(
            self.config, self.queue, self._transport, report_gate=self._report_gate
        )

    def _start(self) -> None:
        """Start the flusher and the exit handler: on the first call, once per process."""
        with self._lock:
            if self._started or self._exited:
                # After the exit handler ran (a later atexit handler calling in) the
                # interpreter is shutting down: Python 3.12 refuses new threads, and nothing
                # would be left to stop them. The message stays on disk for the next run.
                return
            mode = self.config.flusher
            try:
                if mode == "thread":
                    config = self.config
                    flusher = Flusher(
                        self._new_deliverer(),
                        flush_interval=config.flush_interval,
                        burst_age=burst_age_for(
                            config.flush_interval, config.max_queue_bytes, config.max_queue_size
                        ),
                    )
                    flusher.start()
                    self._flusher = flusher
                elif mode == "process":
                    self._start_child()
            except RuntimeError as exc:
                # "can't create new thread at interpreter shutdown": a first call made from
                # an atexit handler. The call itself succeeded: its message stays on disk.
                log.debug("no flusher started (%s); messages stay queued", exc)
                self._exited = True
                return
            self._exit_hook.register(self._at_exit)
            self._started = True

    def _start_child(self) -> None:
        """Start the flusher process (see ``FlusherProcess``: it is replaced if it dies)."""
        self._process = FlusherProcess(self._spawn_flusher_process)
        self._process.start()

    @property
    def _child(self) -> subprocess.Popen[bytes] | None:
        """The flusher process running now, if any."""
        process = self._process
        return None if process is None else process.child

    def _spawn_flusher_process(self) -> subprocess.Popen[bytes]:
        return _flusher_process.start("flusher", self.config)

    def _reset_after_fork(self) -> None:
        # The parent's thread, child process, locks and HTTP sessions do not exist (or are not
        # ours) in a forked child: start fresh on the child's first call.
        self._lock = threading.RLock()
        self._report_gate = ReportGate()
        self._calling = threading.local()
        self._flusher = None
        self._process = None
        self._sync_deliverer = None
        self._started = False
        self._calls_here = 0
        self._exited = False
        self._exit_hook.after_fork()

    # ---------------------------------------------------------------- delivery control

    def _deliver_now(self, row_id: int) -> None:
        """sync_mode: deliver up to ``row_id`` before returning; ``APIError`` if it failed."""
        with self._lock:
            if self._sync_deliverer is None:
                self._sync_deliverer = self._new_deliverer()
            deliverer = self._sync_deliverer
        deadline = time.monotonic() + self.config.timeout * (1 + self.config.max_retries)
        deliver_now(self.queue, deliverer, self._dest, row_id, deadline)

    def _dead_lettered_since(self, mark: DeadLetterMark, own: int) -> int:
        """Messages of this destination dead-lettered since ``mark`` (``dead_letter_mark``),
        by any process; a flush whose queue cannot be read for it any more (a lock holder
        stuck past its deadline) counts ``own``, the dead letters its own deliveries moved,
        and reports the rest as sent or pending."""
        try:
            return self.queue.dead_lettered_since(mark, destination=self._dest)
        except QueueError as exc:
            log.warning(
                "flush: could not count the dead letters (counting this flush's own, %d): %s",
                own,
                exc,
            )
            return own

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Deliver every message this client's destination had queued when flush was called.

        Up to ``max_in_flight`` batches are in flight at once. Returns
        ``FlushResult(sent, pending, dead_lettered)`` once every one of those messages was
        delivered, dead-lettered, or failed its quick retries (it then stays on disk with
        its backoff, counts in ``pending``, and ``on_error`` was called once for its batch):
        it never waits out a backoff without bound. A quick retry waits out a ``Retry-After``
        of up to 4 seconds (and ``max_rate_limit_duration``) that fits its budget. Messages
        whose destination is already backing off (a failure met earlier, here or in another
        process) are not sent before their time: a backoff ending within 5 seconds is waited
        for, until this flush meets a failure of its own; a longer one leaves them in
        ``pending``. With ``timeout`` it returns by then; within it, a backoff that ends
        before the deadline is waited for, a longer one is not, and so is an ``on_error``
        callback (which then runs on a helper thread, waited for at least 0.1 s).

        The counts are of the messages pending when flush was called, whoever delivered them
        meanwhile (this call, the flusher thread, another process): ``sent + dead_lettered +
        pending`` is how many were pending at the call.
        """
        timeout = call_timeout("flush", timeout)
        if not self._send:
            return FlushResult(0, 0, 0)
        if self._report_gate.running_here():
            # Called from this client's on_error, on its thread: the batch being reported
            # still holds its slot of the window, so a delivery here could wait for itself
            # for ever. Counted, not delivered (the next flush or the flusher sends them).
            log.warning("flush() called from on_error delivers nothing; counting only")
            with self.queue.bounded(timeout):
                return FlushResult(0, self.queue.pending(destination=self._dest), 0)
        flusher = self._flusher
        # Every wait on the queue ends by the deadline, even behind a stuck lock holder.
        with (
            self.queue.bounded(timeout),
            contextlib.nullcontext() if flusher is None else flusher.stepping_aside(self._dest),
        ):
            return self._flush(timeout)

    def _flush(self, timeout: float | None) -> FlushResult:
        queue = self.queue
        dest = self._dest
        # Set first: moving the calls in may itself wait (a lock holder that is stuck), and
        # that wait is part of the timeout, not before it.
        deadline = None if timeout is None else time.monotonic() + timeout
        # Where the calls not in the file yet end, taken before they are moved in: a call
        # journaled after this was not pending at the call (taken after the move, it was
        # counted and delivered, ``sent`` then above what was queued).
        marks = queue.held_back(destination=dest)
        top = queue.max_id()  # (moves in every journaled and spooled call it can)
        with self._lock:
            if self._sync_deliverer is None:
                self._sync_deliverer = self._new_deliverer()
            deliverer = self._sync_deliverer
        # Dead letters are counted from the queue, whoever moved them there: a process that
        # waited for a delivery slot saw its messages dead-lettered by the holder's flush.
        dead_mark = queue.dead_letter_mark()
        before = queue.pending(up_to_id=top, destination=dest)
        # Those still out of the file after the move were pending at the call too: the file
        # had no room for them under ``max_queue_bytes``. They move in as deliveries make room.
        held = held_at_call = queue.held_back_left(marks, destination=dest)
        if not held:
            marks = {}  # all of them moved in, at or below ``top``
        before += held
        pending = before
        last_held: int | None = None
        own_dead = 0  # what this flush's deliveries dead-lettered (counted if the read fails)
        # What this flush reports to on_error (every thread of its pass): the rest of what it
        # did not send is reported after, once its destination backs off (``_report_unsent``).
        with self._report_gate.recording() as reported:
            try:
                while True:
                    own_dead += deliver_until(
                        queue,
                        deliverer,
                        destination=dest,
                        up_to_id=top,
                        deadline=deadline,
                        wait_for_backoff=True,
                    ).dead_lettered
                    pending = queue.pending(up_to_id=top, destination=dest)
                    if not marks or pending or passed(deadline):
                        break
                    held = queue.held_back_left(marks, destination=dest)
                    if held and last_held is not None and held >= last_held:
                        # A whole round took none of them in (others' calls keep taking the
                        # room): they stay held, counted pending, and flush ends.
                        break
                    last_held = held
                    if not held:
                        # Every held-back call is in the file now (moved in by this flush or
                        # another mover): one last round delivers what is left of them.
                        marks = {}
                    # Moves in what has room now. (Not ``moved_to > top`` as the test of it:
                    # a file that deliveries emptied gives new rows ids from 1 again, at or
                    # below ``top``, where the next round finds them too.)
                    top = max(top, queue.max_id())
            except QueueBusy as exc:
                # Another process holds the queue's lock (stopped inside a transaction, a
                # backup): an operational state, said without a traceback.
                log.warning("flush: the queue stayed busy; the messages stay queued: %s", exc)
                pending = queue.pending(up_to_id=top, destination=dest)
            except DurableAnalyticsError:
                log.exception("flush: delivery failed; the messages stay queued")
                pending = queue.pending(up_to_id=top, destination=dest)
            else:
                if held_at_call:
                    # Counted again: calls moved in since may have taken ids at or below ``top``.
                    pending = queue.pending(up_to_id=top, destination=dest)
            # Still recording: what another flush of this client reports meanwhile is not
            # reported again here.
            if dest in reported.kept and pending and not passed(deadline):
                try:
                    self._report_unsent(deliverer, reported, top, deadline)
                except DurableAnalyticsError as exc:  # the counts stand; the reports did not
                    log.warning("flush: could not read the messages left to report: %s", exc)
        left = queue.held_back_left(marks, destination=dest)
        if marks and left < held_at_call:
            # Held-back calls another mover took in meanwhile got ids past ``top``: until
            # delivered they are pending, and so is what the file holds past ``top``, up
            # to how many of them were taken in (newer calls may be counted among them;
            # never a call not delivered among the sent).
            past_top = queue.pending(up_to_id=_ANY_ID, destination=dest) - pending
            left += min(held_at_call - left, max(0, past_top))
        pending = min(before, pending + left)
        dead = min(self._dead_lettered_since(dead_mark, own_dead), max(0, before - pending))
        # What left the queue and was not dead-lettered was delivered, by us or by another.
        return FlushResult(max(0, before - pending - dead), pending, dead)

    def _report_unsent(
        self, deliverer: Deliverer, reported: Reported, top: int, deadline: float | None
    ) -> None:
        """``on_error`` for what this flush did not send: its destination backs off after a
        failure of the flush's own, so the rest of what was pending at the call stays queued
        unsent (trying each batch against a dead server would not end). Each such batch is
        reported once, with that failure's error, as segment reports every batch it could
        not deliver. Not those another holder has leased (they are on their way), nor those
        reported meanwhile by any deliverer of this client (``reported``: another flush at
        once reports under the same lock, one after the other); by the flush's deadline.
        """
        exc = reported.kept.get(self._dest)
        if exc is None:
            return
        gate = self._report_gate
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not gate.unsent.acquire(timeout=wait):
            return
        try:
            # Cut as requests are (``Deliverer.split``); the last, maybe partial, batch of
            # a page waits for the next page's messages.
            left: list[tuple[int, bytes]] = []
            after = 0
            while not passed(deadline):
                page = self.queue.unleased(
                    self._dest, up_to_id=top, after_id=after, limit=deliverer.batch_messages * 25
                )
                if page:
                    after = page[-1][0]
                left += [row for row in page if row[0] not in reported.ids]
                parts = deliverer.split([body for _, body in left])
                for part in parts if not page else parts[:-1]:
                    if passed(deadline):
                        return
                    rows = [left[i] for i in part]
                    deliverer.report_unsent(exc, self._dest, rows, report_until(deadline))
                if not page:
                    return
                left = [left[i] for i in parts[-1]] if parts else []
        finally:
            gate.unsent.release()

    def close(self, timeout: float | None = None) -> FlushResult:
        """Flush (for up to ``timeout``, default ``shutdown_timeout``) and stop the flusher.

        What could not be delivered stays on disk for the next process, worker or drain.
        Calls made after ``close()`` are still queued and start a new flusher; without such
        calls the exit handler does nothing more for this client.
        """
        checked = call_timeout("close", timeout)
        budget = self.config.shutdown_timeout if checked is None else checked
        if self._queue is None:
            return self._close(budget)
        # No queue wait of any thread (the flusher's included) outlasts the budget.
        with self._queue.bounded(budget):
            return self._close(budget)

    def _close(self, budget: float) -> FlushResult:
        deadline = time.monotonic() + budget
        # Settled here: the exit handler has nothing to do unless calls come after this
        # (it would otherwise flush and report again, touching a queue the caller may have
        # shut down meanwhile, such as a PostgreSQL server stopped after close()).
        self._calls_here = 0
        try:
            return self.flush(timeout=budget) if self._started else self._idle_result()
        finally:
            # Also when the flush raised (a queue that did not answer in time): close()
            # stops the flusher whatever the queue said, and the error reaches the caller.
            self._stop_flushers(deadline)

    def _stop_flushers(self, deadline: float) -> None:
        with self._lock:
            flusher, self._flusher = self._flusher, None
            process, self._process = self._process, None
            self._started = False
        if flusher is not None:
            flusher.stop(max(0.0, deadline - time.monotonic()))
            flusher.deliverer.transport.close()
        if process is not None:
            # What is left of the budget, no more: a child still busy then (a server that
            # hangs) is killed, and the holder-is-gone rule hands its leases on at once.
            process.stop(max(0.0, deadline - time.monotonic()))

    def _idle_result(self) -> FlushResult:
        if not self._send:
            return FlushResult(0, 0, 0)
        return FlushResult(0, self.queue.pending(destination=self._dest), 0)

    def join(self) -> None:
        """segment-analytics-python's ``join``: deliver what is queued and stop the flusher."""
        self.close()

    def shutdown(self) -> None:
        """segment-analytics-python's ``shutdown``: flush and stop."""
        self.close()

    def stats(self) -> QueueStats:
        """Counts and health of the queue file (see ``QueueStats``)."""
        if not self._send:
            return QueueStats(0, 0, 0, 0, None, 0, None, [])
        return self.queue.stats()

    # ---------------------------------------------------------------- exit

    def _pending_at_exit(self) -> bool:
        """Whether this client's destination has pending messages, looked at within
        ``shutdown_timeout``; True when the queue did not answer by then (a server process
        or a lock holder that is stopped): the drain then finds out, past the exit."""
        try:
            with self.queue.bounded(self.config.shutdown_timeout):
                return bool(self.queue.pending(destination=self._dest))
        except QueueBusy:
            return True

    def _at_exit(self) -> None:
        """Run once at interpreter exit, by ``on_exit``; never longer than shutdown_timeout."""
        if not self._send or not self._calls_here or self._exited:
            return
        self._exited = True
        mode = self.config.on_exit
        try:
            if mode == "flush":
                result = self.close(self.config.shutdown_timeout)
                if result.pending:
                    log.warning(
                        "%d %s queued in %s for the next run or `durable-analytics drain`",
                        result.pending,
                        "message stays" if result.pending == 1 else "messages stay",
                        self.config.queue_name,
                    )
            elif mode == "spawn":
                if self._flusher is not None:
                    self._flusher.stop(0)
                if self._pending_at_exit():
                    spawn_drain(self.config)
            elif self._flusher is not None:
                self._flusher.stop(0)
        except Exception:
            log.exception("durable-analytics exit handler failed; messages stay queued")


def call_timeout(call: str, timeout: object) -> float | None:
    """``timeout`` of ``flush`` / ``close``: None, or a finite number of seconds >= 0.

    ``ValidationError`` otherwise, at the call: a NaN deadline is never reached and is
    never past either, so ``flush(timeout=float("nan"))`` against a failing server looped
    without a pause and never returned; infinity waited on backoffs without end.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValidationError(
            f"{call}: timeout must be a number of seconds or None, got {type(timeout).__name__}"
        )
    if not math.isfinite(timeout) or timeout < 0:
        raise ValidationError(
            f"{call}: timeout must be a finite number of seconds >= 0, or None "
            f"(flush: no deadline), got {timeout!r}"
        )
    return float(timeout)
