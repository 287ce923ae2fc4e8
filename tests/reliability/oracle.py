"""The reliability oracle: what every producer was told, what the server got, and the verdict.

Producers record each call's outcome in a *call log*, one line per event, written with one
``write(2)`` on an ``O_APPEND`` descriptor, so a line is never torn and is in the kernel (it
survives a SIGKILL of the writer) before the code goes on::

    <messageId> start      before the call
    <messageId> ok         the call returned (True, ...): the message must be delivered
    <messageId> drop       the call returned (False, ...): the cap dropped it, never delivered
    <messageId> err        the call raised: the message must not be delivered

A ``start`` without an outcome is a call killed mid-way: it may be delivered or not.

The Collector counts every messageId it answered 2xx (``message_ids()``) and every one it
was sent at all (``message_ids(accepted_only=False)``). ``check`` compares the two sides and
returns a `Report`: lost, duplicated (and the extra copies), unexpected, maybe.

This module is imported by child processes too (``CHILD_PRELUDE`` makes it importable there),
so it imports only the standard library at the top and the package inside functions.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from durable_analytics._drain import DrainResult
    from durable_analytics.testing import Collector

__all__ = [
    "CHILD_PRELUDE",
    "CallLog",
    "Calls",
    "Report",
    "check",
    "drain",
    "integrity_check",
    "produce",
    "queued_message_ids",
    "read_calls",
    "trace_leases",
    "unsettled_leases",
    "wait_answered",
    "wait_until",
]

TESTS_DIR = str(Path(__file__).resolve().parent.parent)

#: Put first in a child script so ``from reliability.oracle import ...`` works there.
CHILD_PRELUDE = f"import sys; sys.path.insert(0, {TESTS_DIR!r})\n"

_OUTCOMES = ("start", "ok", "drop", "err")


# --------------------------------------------------------------------------- producer side


class CallLog:
    """The append-only outcome log of one producer process (thread-safe, kill-safe)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def record(self, message_id: str, outcome: str) -> None:
        """Write ``<messageId> <outcome>`` as one line, in one system call."""
        os.write(self._fd, f"{message_id} {outcome}\n".encode())

    def call(self, message_id: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Call ``fn(*args, message_id=..., **kwargs)`` and record its outcome.

        Returns True when the call returned (True, ...); an Exception raised by the call is
        recorded and swallowed (the producer goes on), anything else is re-raised.
        """
        self.record(message_id, "start")
        try:
            stored, _ = fn(*args, message_id=message_id, **kwargs)
        except Exception:
            self.record(message_id, "err")
            return False
        except BaseException:
            self.record(message_id, "err")
            raise
        self.record(message_id, "ok" if stored else "drop")
        return bool(stored)

    def close(self) -> None:
        os.close(self._fd)


def produce(
    queue_path: str,
    host: str,
    write_key: str,
    log_path: str,
    prefix: str,
    count: int | None,
    threads: int = 8,
    *,
    ready: Callable[[], object] | None = None,
    stop: threading.Event | None = None,
    settings: dict[str, Any] | None = None,
    client: Any = None,
) -> Any:
    """Track from ``threads`` threads, each ``count`` events (None: until killed or ``stop``).

    The messageIds are ``<prefix>-t<thread>-<i>``; every call goes through a `CallLog` at
    ``log_path``. ``ready`` is called once every thread runs. Builds a Client with
    ``settings`` unless one is given; returns it (not closed: exit decides what happens).
    Importable by reference, so it is a valid ``multiprocessing`` target.
    """
    if client is None:
        from durable_analytics import Client

        client = Client(write_key, host=host, queue_path=queue_path, **(settings or {}))
    log = CallLog(log_path)
    started = threading.Barrier(threads + 1)

    def run(k: int) -> None:
        started.wait()
        i = 0
        while (count is None or i < count) and not (stop is not None and stop.is_set()):
            log.call(
                f"{prefix}-t{k}-{i}",
                client.track,
                f"user-{k}",
                "Oracle Event",
                {"thread": k, "i": i},
            )
            i += 1

    workers = [
        threading.Thread(target=run, args=(k,), name=f"producer-{k}", daemon=count is None)
        for k in range(threads)
    ]
    for t in workers:
        t.start()
    started.wait()
    if ready is not None:
        ready()
    if count is None and stop is None:
        while True:  # until killed
            time.sleep(3600)
    for t in workers:
        # Joined in slices, not one blocking wait: CPython runs a signal handler (the SIGTERM
        # that sets ``stop``) only in the main thread, and only once that thread wakes; the
        # kernel may hand the signal to any of the process's threads, which leaves a main
        # thread blocked in an endless join() asleep with the handler never run.
        while t.is_alive():
            t.join(0.05)
    return client


def trace_leases(path: str | os.PathLike[str]) -> None:
    """Log, in this process, every lease taken and every lease acked or released.

    Lines ``L <token> <messageId>...``, ``A <token>``, ``R <token>``, each written after the
    operation returned: after a SIGKILL, `unsettled_leases` names the batches that were in
    flight (and possibly a batch whose ack committed just before the kill).
    """
    from durable_analytics._store.sqlite import SqliteQueue as Queue

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    real_lease, real_ack, real_release = Queue.lease, Queue.ack, Queue.release
    real_ack_and_lease = Queue.ack_and_lease

    def took(got: Any) -> Any:
        if got is not None:
            ids = " ".join(str(json.loads(b).get("messageId")) for b in got.bodies)
            os.write(fd, f"L {got.token} {ids}\n".encode())
        return got

    def lease(self: Queue, *args: Any, **kwargs: Any) -> Any:
        return took(real_lease(self, *args, **kwargs))

    def ack(self: Queue, lease: Any, *args: Any, **kwargs: Any) -> int:
        done = real_ack(self, lease, *args, **kwargs)
        os.write(fd, f"A {lease.token}\n".encode())
        return done

    def ack_and_lease(self: Queue, lease: Any, *args: Any, **kwargs: Any) -> Any:
        done, got = real_ack_and_lease(self, lease, *args, **kwargs)
        os.write(fd, f"A {lease.token}\n".encode())
        return done, took(got)

    def release(self: Queue, lease: Any, *args: Any, **kwargs: Any) -> int:
        done = real_release(self, lease, *args, **kwargs)
        os.write(fd, f"R {lease.token}\n".encode())
        return done

    Queue.lease, Queue.ack, Queue.release = lease, ack, release  # type: ignore[method-assign]
    Queue.ack_and_lease = ack_and_lease  # type: ignore[method-assign]


def unsettled_leases(path: str | os.PathLike[str]) -> list[list[str]]:
    """The messageIds of each lease `trace_leases` saw taken and never acked nor released."""
    leases: dict[str, list[str]] = {}
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            kind, token, *ids = line.split()
            if kind == "L":
                leases[token] = ids
            else:
                leases.pop(token, None)
    return list(leases.values())


# --------------------------------------------------------------------------- checker side


@dataclass(frozen=True)
class Calls:
    """The outcomes read back from call logs, as sets of messageIds."""

    started: frozenset[str]
    ok: frozenset[str]
    dropped: frozenset[str]
    failed: frozenset[str]

    @property
    def maybe(self) -> frozenset[str]:
        """Started and never finished: the producer was killed in the call."""
        return self.started - self.ok - self.dropped - self.failed


def read_calls(paths: Iterable[str | os.PathLike[str]]) -> Calls:
    """Parse call logs (a directory's ``*.calls`` files, or the files given)."""
    sets: dict[str, set[str]] = {name: set() for name in _OUTCOMES}
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        files.extend(sorted(path.glob("*.calls")) if path.is_dir() else [path])
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            mid, _, outcome = line.rpartition(" ")
            if outcome not in sets:
                raise AssertionError(f"{path}: malformed call-log line {line!r}")
            sets[outcome].add(mid)
    return Calls(
        started=frozenset(sets["start"]),
        ok=frozenset(sets["ok"]),
        dropped=frozenset(sets["drop"]),
        failed=frozenset(sets["err"]),
    )


@dataclass(frozen=True)
class Report:
    """The verdict of one run; ``str()`` is the one-line figure a test prints."""

    #: calls started (every line ``start``)
    calls: int
    #: calls that returned (True, ...): each must be received
    sent: int
    #: calls that raised, or the cap dropped: none may be received
    failed: int
    #: calls killed mid-way: may be received or not
    maybe: int
    #: of the maybe calls, how many were received
    maybe_received: int
    #: distinct messageIds the server answered 2xx
    received: int
    #: sent calls whose message the server answered 2xx (sent = acknowledged + lost)
    acknowledged: int
    #: sent calls never answered 2xx
    lost: int
    #: messageIds answered 2xx more than once, and the extra copies beyond the first
    duplicated: int
    extra_copies: int
    #: received, though the call raised, was dropped, or was never started
    unexpected: int
    #: messageIds that appeared in more than one request whatever the answer (None: unknown)
    resent: int | None
    #: messages still in the queue file, and PRAGMA integrity_check (None: not looked at)
    pending: int | None
    integrity: str | None
    lost_ids: tuple[str, ...] = field(default=(), repr=False)
    unexpected_ids: tuple[str, ...] = field(default=(), repr=False)
    copies: dict[str, int] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        parts = [
            f"calls={self.calls}",
            f"sent={self.sent}",
            f"failed={self.failed}",
            f"maybe={self.maybe}({self.maybe_received} received)",
            f"received={self.received}",
            f"acknowledged={self.acknowledged}",
            f"lost={self.lost}",
            f"duplicated={self.duplicated}(+{self.extra_copies} copies)",
            f"unexpected={self.unexpected}",
        ]
        if self.resent is not None:
            parts.append(f"resent={self.resent}")
        if self.pending is not None:
            parts.append(f"pending={self.pending}")
        if self.integrity is not None:
            parts.append(f"integrity={self.integrity}")
        return " ".join(parts)

    def show(self, label: str, **figures: object) -> None:
        """Print the report with the test's own figures (visible with ``pytest -s``)."""
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in figures.items())
        print(f"\n[{label}] {extra}{' ' if extra else ''}{self}", flush=True)

    def assert_sound(self) -> None:
        """lost = 0, unexpected = 0, and the file is healthy (when it was looked at)."""
        assert self.lost == 0, f"{self.lost} lost, e.g. {self.lost_ids[:5]}: {self}"
        assert self.unexpected == 0, (
            f"{self.unexpected} unexpected, e.g. {self.unexpected_ids[:5]}: {self}"
        )
        assert self.integrity in (None, "ok"), self.integrity


def _fmt(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def check(
    logs: Iterable[str | os.PathLike[str]],
    received: Collector | Counter[str],
    *,
    queue_path: str | os.PathLike[str] | None = None,
) -> Report:
    """Compare the call logs with what the server received (and the queue file, if given)."""
    calls = read_calls(logs)
    resent: int | None = None
    if isinstance(received, Counter):
        got = received
    else:
        got = received.message_ids()
        resent = sum(1 for n in received.message_ids(accepted_only=False).values() if n > 1)
    ids = set(got)
    lost = calls.ok - ids
    unexpected = ids - calls.ok - calls.maybe
    copies = {mid: n for mid, n in got.items() if n > 1}
    pending = integrity = None
    if queue_path is not None:
        pending = len(queued_message_ids(queue_path))
        integrity = integrity_check(queue_path)
    return Report(
        calls=len(calls.started),
        sent=len(calls.ok),
        failed=len(calls.failed | calls.dropped),
        maybe=len(calls.maybe),
        maybe_received=len(calls.maybe & ids),
        received=len(ids),
        acknowledged=len(calls.ok & ids),
        lost=len(lost),
        duplicated=len(copies),
        extra_copies=sum(n - 1 for n in copies.values()),
        unexpected=len(unexpected),
        resent=resent,
        pending=pending,
        integrity=integrity,
        lost_ids=tuple(sorted(lost)),
        unexpected_ids=tuple(sorted(unexpected)),
        copies=copies,
    )


# --------------------------------------------------------------------------- the queue file


def _connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    if not Path(path).exists():
        raise FileNotFoundError(path)
    return sqlite3.connect(str(path), timeout=30)


def integrity_check(path: str | os.PathLike[str]) -> str:
    """``PRAGMA integrity_check`` of a queue file ("ok" when healthy), with a plain connection."""
    conn = _connect(path)
    try:
        return "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall())
    finally:
        conn.close()


def queued_message_ids(path: str | os.PathLike[str]) -> Counter[str]:
    """The messageIds of the messages still on disk: in the queue file (leased or not), and
    in the spools of its producers past what was moved from them (each spool's record).

    A spool removed between the look at the queue file and the look at it (a mover took
    all it held into the file, after that look, then deleted it) starts the look over: its
    messages are in the file now, and a look that skipped it would miss them."""
    for _ in range(20):
        try:
            return _queued_message_ids(path)
        except _SpoolGone:
            continue
    return _queued_message_ids(path)


class _SpoolGone(Exception):
    """A spool listed a moment ago no longer exists."""


def _queued_message_ids(path: str | os.PathLike[str]) -> Counter[str]:
    conn = _connect(path)
    try:
        rows = conn.execute("SELECT body FROM messages").fetchall()
        records = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    finally:
        conn.close()
    spools = Path(path).with_name(Path(path).name + ".spool")
    for spool in sorted(spools.glob("*.db")) if spools.is_dir() else []:
        moved = records.get("spool:" + spool.stem, 0)
        if not spool.exists():
            raise _SpoolGone(spool)
        try:
            # Read-only: a spool deleted since the check above must not be created again.
            conn = sqlite3.connect(spool.as_uri() + "?mode=ro", uri=True, timeout=30)
        except sqlite3.OperationalError:
            if not spool.exists():
                raise _SpoolGone(spool) from None
            conn = _connect(spool)  # there, but not readable read-only (no -shm yet)
        try:
            rows += conn.execute("SELECT body FROM messages WHERE id > ?", (moved,)).fetchall()
        except sqlite3.OperationalError:
            pass  # created an instant ago, its schema not committed yet: nothing in it
        finally:
            conn.close()
    for journal in sorted(spools.glob("*.log")) if spools.is_dir() else []:
        moved = records.get("spool:" + journal.stem, 0)
        if moved < 0:
            continue  # a tombstone: moved in whole, the file deleted after the snapshot
        try:
            data = journal.read_bytes()[moved:]
        except FileNotFoundError:
            raise _SpoolGone(journal) from None
        rows += [(body,) for body in _journal_bodies(data)]
    return Counter(str(json.loads(r[0]).get("messageId")) for r in rows)


def _journal_bodies(data: bytes) -> list[bytes]:
    """The message bodies of a journal's complete records (the format written down in
    ``durable_analytics/_store/sqlite/journal.py``, read here on its own): a header of a
    magic byte 0xDA, the payload's length and CRC-32 (little-endian), then the payload:
    ``enqueued_at`` (a double), the host's and write key's lengths (two u16), both, the body.
    A record cut short at the end (being written, or its writer killed) is left out."""
    import struct
    import zlib

    bodies = []
    pos = 0
    while pos + 9 <= len(data):
        magic, length, crc = struct.unpack_from("<BII", data, pos)
        payload = data[pos + 9 : pos + 9 + length]
        if len(payload) < length:
            break
        assert magic == 0xDA, f"not a journal record at {pos}"
        assert zlib.crc32(payload) == crc, f"damaged journal record at {pos}"
        host_len, key_len = struct.unpack_from("<HH", payload, 8)
        bodies.append(payload[12 + host_len + key_len :])
        pos += 9 + length
    return bodies


# --------------------------------------------------------------------------- helpers


def drain(queue_path: str | os.PathLike[str], timeout: float = 60.0) -> DrainResult:
    """What ``durable-analytics drain`` does, in this process; asserts nothing is left.

    A lease whose holder is gone is reclaimed at once; one whose holder lives is waited for.
    """
    from durable_analytics._config import DEFAULT_HOST, Config
    from durable_analytics._drain import drain_queue
    from durable_analytics._store.sqlite import SqliteQueue as Queue

    queue = Queue(queue_path)
    # Each message goes to its stored destination: the key and host here are placeholders.
    config = Config.build("-", host=DEFAULT_HOST, queue_path=queue_path, timeout=5.0)
    try:
        result = drain_queue(queue, config, timeout=timeout, concurrency=2)
    finally:
        queue.close()
    assert result.left == 0, result
    return result


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, step: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last verdict."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(step)


def wait_answered(collector: Collector, timeout: float = 10.0) -> bool:
    """Wait until every request the collector got has been answered (delayed replies too)."""
    return wait_until(lambda: all(b.status for b in collector.batches), timeout)
