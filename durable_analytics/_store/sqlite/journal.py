"""Journals: a producer's calls stored with one ``write()`` each, moved into the queue in bulk.

An append to the queue file is an SQLite transaction (~17 µs of SQLite, more around it); a
record appended to a file of this process's own is one ``write()`` (~3 µs). So a Client's
call goes first to its process's *journal*, ``<queue>.spool/<name>.<generation>.log`` (the
name is the process's spool name, ``spool.py``), and whoever delivers moves journals into
the queue in bulk, as it moves spools: this process's flusher before each lease, ``flush()``
and ``drain`` before they look at what is pending, every poll of a flusher, a ``worker`` or
a ``drain`` process (every process's journals, ``journal_moves.py``). Once ``write()``
returned, the record is in the kernel's page cache: a killed process loses nothing, as
with the queue's commits under ``durability="normal"`` (a power loss may take the last
seconds of both). With ``durability="full"`` calls never journal (each commit is synced).

A record is a header (a magic byte, the payload's length and its CRC-32) and a payload:
the call's ``enqueued_at``, its destination's host and write key, and the message body. A
reader takes the complete records from an offset: a record still being written (its length
says more than the file holds) ends the read, and is taken on a later one; a record whose
check fails marks the file damaged (left on disk as it is, warned about, never counted).

A move is exactly once, as a spool's: the transaction that inserts a chunk of records into
the queue records the offset after the last (``spool:<name>.<generation>`` in ``counters``),
and the next move starts there. A file takes ``ROTATE_BYTES``; the next call starts the next
generation, and the older file, *sealed*, is deleted by whoever moves its last record
(after the queue's ``-wal`` is synced: a power loss must not keep the deletion and lose what
was moved); its record stays a while as a tombstone (``journal_moves.TOMBSTONE_KEEP``). A
process killed inside a ``write()`` may leave part of a record at the end of its last file:
that call never returned; the part is dropped once the owner is gone. What bounds a journal:
a call journals only on the queue's fast path, and while this process's journal files not
yet deleted hold less than its share of ``MOST_JOURNALED`` (all of it while every process
on the queue can have its ``spool.SPOOL_MARGIN`` under ``max_queue_bytes``, less when more
processes share the queue or the file nears the cap: ``Spools.hold_share``); else it goes
to the queue file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .waits import owned

__all__ = [
    "LEAST_ROTATE_BYTES",
    "LOOK_BYTES",
    "MOST_JOURNALED",
    "MOST_PAYLOAD",
    "ROTATE_BYTES",
    "SUFFIX",
    "Entry",
    "Journal",
    "encode",
    "first_size",
    "open_journal",
    "owner_of",
    "parse",
    "read_at",
    "read_from",
]

logger = logging.getLogger("durable_analytics.queue")

#: The file name's suffix of a journal (``<name>.<generation>.log``).
SUFFIX = ".log"
#: A journal file's size at which the next call starts the next generation (smaller when
#: this process's share of ``MOST_JOURNALED`` is small: see ``Journal.append``). A quarter
#: of ``MOST_JOURNALED``: creating the next file is the costliest step of a journaled call
#: (0.1-0.3 ms in the kernel), so a file is as large as the bound lets it be.
ROTATE_BYTES = 2 << 20
#: The smallest file a journal rotates at (with a small share of ``MOST_JOURNALED``).
LEAST_ROTATE_BYTES = 4096
#: The most bytes this process's journal files (not yet deleted) hold before its calls go
#: to the queue file instead: a mover that stays away (a stopped flusher) bounds the disk.
MOST_JOURNALED = 8 << 20
#: How long a call waits for another thread's turn at the journal (one ``write()`` each).
LOCAL_WAIT = 0.002
#: How often a journal at its bound looks whether movers deleted its sealed files.
LOOK_EVERY = 0.05
#: The longest payload a record may have: a message (at most 32 KiB) with its names, and
#: room to spare. A longer length is damage, not a record still being written.
MOST_PAYLOAD = 1 << 20
#: The most bytes of one journal file a look (``pending()``, ``stats()``) reads: a file is
#: at most ``ROTATE_BYTES`` and one record; what lies beyond in a foreign file is not read.
LOOK_BYTES = 4 << 20

_MAGIC = 0xDA
_HEAD = struct.Struct("<BII")  # magic, payload length, CRC-32 of the payload
_WHEN = struct.Struct("<d")
_NAMES = struct.Struct("<HH")  # host and write key lengths (UTF-8 bytes)
_FIXED = _WHEN.size + _NAMES.size
_FIXED_PART = struct.Struct("<dHH")  # the payload's start: enqueued_at and the two lengths


class Entry(NamedTuple):
    """One complete record of a journal file (shaped as a spool's row is for a move)."""

    #: The offset just past the record in its file.
    end: int
    host: str
    write_key: str
    body: bytes
    size: int
    enqueued_at: float


def names_of(host: str, write_key: str) -> bytes:
    """A destination's names as a record carries them (kept per destination by the caller)."""
    h, k = host.encode(), write_key.encode()
    return _NAMES.pack(len(h), len(k)) + h + k


def encode(names: bytes, body: bytes, when: float) -> bytes:
    """One record: header, then ``enqueued_at``, the destination's ``names``, the body."""
    payload = _WHEN.pack(when) + names + body
    return _HEAD.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def parse(data: bytes, base: int) -> tuple[list[Entry], int, bool]:
    """The complete records of ``data`` (a file's bytes from offset ``base``): the entries,
    the offset after the last, and whether a record failed its check (the read stops
    there). A record cut short by the end of ``data`` ends the read, not damaged."""
    entries: list[Entry] = []
    add = entries.append
    view = memoryview(data)
    crc32 = zlib.crc32
    head_of = _HEAD.unpack_from
    fixed_of = _FIXED_PART.unpack_from
    # A journal holds one or a few destinations: their names are decoded once per read.
    known: dict[bytes, tuple[str, str]] = {}
    pos = 0
    size = len(data)
    head = _HEAD.size
    while pos + head <= size:
        magic, length, crc = head_of(data, pos)
        if magic != _MAGIC or not _FIXED <= length <= MOST_PAYLOAD:
            return entries, base + pos, True
        start = pos + head
        stop = start + length
        if stop > size:
            break  # still being written, or cut short by a killed writer
        if crc32(view[start:stop]) != crc:
            return entries, base + pos, True
        when, host_len, key_len = fixed_of(data, start)
        names_end = start + _FIXED + host_len + key_len
        if names_end > stop:
            return entries, base + pos, True
        raw = data[start + _FIXED : names_end]
        names = known.get(raw)
        if names is None:
            try:
                names = known[raw] = (
                    raw[:host_len].decode(),
                    raw[host_len:].decode(),
                )
            except UnicodeDecodeError:
                return entries, base + pos, True
        pos = stop
        add(Entry(base + stop, names[0], names[1], data[names_end:stop], stop - names_end, when))
    return entries, base + pos, False


def first_size(data: bytes) -> int:
    """The size of the record ``data`` starts with, as its header says (0: no whole header)."""
    if len(data) < _HEAD.size:
        return 0
    _, length, _ = _HEAD.unpack_from(data, 0)
    return int(_HEAD.size + length)


def open_journal(path: Path) -> int | None:
    """A descriptor to read the journal ``path``, or None when it is gone. Never follows a
    symbolic link; a file that is not a regular one is refused (``OSError``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_at(fd: int, offset: int, most: int | None = None) -> bytes:
    """The bytes of an open journal from ``offset`` to its end (at most ``most``)."""
    want = max(0, os.fstat(fd).st_size - offset)
    if most is not None:
        want = min(want, most)
    chunks: list[bytes] = []
    while want > 0:
        chunk = os.pread(fd, want, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        want -= len(chunk)
    return b"".join(chunks)


def read_from(path: Path, offset: int, most: int | None = None) -> bytes | None:
    """The bytes of the journal ``path`` from ``offset`` (at most ``most``); None when it
    is gone (see ``open_journal``)."""
    fd = open_journal(path)
    if fd is None:
        return None
    try:
        return read_at(fd, offset, most)
    finally:
        os.close(fd)


def owner_of(stem: str) -> tuple[str, int] | None:
    """The spool name and generation of a journal file's stem, or None if not one."""
    name, dot, gen = stem.rpartition(".")
    if not dot or not name or not gen.isdigit():
        return None
    return name, int(gen)


class Journal:
    """This process's journal of one queue: its calls' appends, and its files' sizes.

    ``claim`` gives this process's spool name (creating its owner lock), or None when it
    cannot; the files are ``dir / f"{name}.{generation}.log"``.
    """

    def __init__(self, directory: Path, claim: Callable[[], str | None]) -> None:
        self.dir = directory
        self._claim = claim
        self.lock = threading.RLock()
        #: The descriptor of the file being written, in a box the owner lock's release
        #: closes too (``spool._release_lock``: a dropped queue lets go of both).
        self.fd_box = [-1]
        self.stem = ""
        self._gen = 0
        self._size = 0
        self.off = False
        #: This process's files not yet deleted, by stem: the bytes written to each.
        self.files: dict[str, int] = {}
        #: By stem, the offset up to which this process's mover moved it.
        self.moved: dict[str, int] = {}
        self._names: dict[tuple[str, str], bytes] = {}
        self._looked = 0.0
        #: The length of the record this process's append is writing, between its checks
        #: and its booking (0 otherwise): see ``_append_nested``.
        self._writing = 0

    def append(
        self,
        names: tuple[str, str],
        body: bytes,
        when: float,
        *,
        past_bound: bool = False,
        share: float = 1.0,
    ) -> int | None:
        """Journal one call; the offset after its record (> 0), or None: the caller stores
        it elsewhere (journal off or at its bound, another thread's turn, a full disk).

        ``share`` (at most 1): the part of ``MOST_JOURNALED`` this process may hold now
        (``Spools.hold_share``: many processes on one queue each hold less, so that all of
        them together stay under ``max_queue_bytes``); its files then rotate sooner, so
        that what was moved is deleted within the smaller bound. ``past_bound``: journal
        it even past the bound (a signal handler's call inside a call of its own thread
        that waits for the queue's lock, see ``Spools.append``)."""
        prefix = self._names.get(names)
        if prefix is None:
            prefix = self._names[names] = names_of(*names)
        record = encode(prefix, body, when)
        lock = self.lock
        if owned(lock):
            # A signal handler inside this thread's own append (``_append_nested``).
            return self._append_nested(record)
        if not lock.acquire(timeout=LOCAL_WAIT):
            return None
        try:
            if self.off:
                return None
            bound = MOST_JOURNALED if share >= 1.0 else int(MOST_JOURNALED * share)
            # A quarter of the bound per file: sealed files (deleted once moved) and the
            # one being written fit in it together. Rotated before the bound is checked:
            # a share that shrank below the file being written (it grew under a larger
            # one) would otherwise refuse every call while that file, never sealed, stayed
            # on disk for good, moved or not.
            rotate = min(ROTATE_BYTES, max(bound // 4, LEAST_ROTATE_BYTES))
            if self.fd_box[0] >= 0 and self._size >= rotate and not self._next_file():
                return None
            if not past_bound and self._held() >= bound and not self._shrunk(bound):
                return None
            if self.fd_box[0] < 0 and not self._next_file():
                return None
            # From here to the booking a signal handler's call may write its own record
            # after this one (``_append_nested``).
            self._writing = len(record)
            try:
                written = os.write(self.fd_box[0], record)
            except OSError as exc:
                self._turn_off(exc)  # nothing was written (an error means no byte went)
                return None
            if written != len(record):
                self._take_back(written)
                return None
            self._size += written
            self.files[self.stem] = self._size
            return self._size
        finally:
            self._writing = 0
            lock.release()

    def _append_nested(self, record: bytes) -> int | None:
        """Journal the call of a signal handler that interrupted its thread's own append.

        Only right after that append's write (``_writing`` set, and the file ends right
        after the interrupted record: anything else is a write not made yet, or a short one
        the interrupted call is about to cut off, with whatever would follow it). Handlers
        run to their end before the interrupted call goes on, so this record is the file's
        last while it is written, and the two bookings add up. A handler inside this one's
        write or booking finds ``_writing`` cleared and goes to the queue file. Past
        ``MOST_JOURNALED`` too: the queue file's lock may be held by another thread that
        waits for something the interrupted call holds.
        """
        pending = self._writing
        fd = self.fd_box[0]
        if not pending or self.off or fd < 0:
            return None
        self._writing = 0
        try:
            start = os.fstat(fd).st_size
            if start != self._size + pending:
                return None
            written = os.write(fd, record)
            if written != len(record):
                self._cut(start)
                return None
            self._size += written
            self.files[self.stem] = self._size
            return start + written
        except OSError:
            return None  # nothing was written (an error means no byte went)
        finally:
            # Only now: a handler inside this one's write or its cut must not write after it.
            self._writing = pending

    def _cut(self, start: int) -> None:
        """A handler's short write: cut it off (its record is the last), or stop journaling
        (nothing more may follow a partial record)."""
        try:
            os.ftruncate(self.fd_box[0], start)
        except OSError as exc:
            self._turn_off(exc)

    def _held(self) -> int:
        return sum(self.files.values())

    def _shrunk(self, bound: int) -> bool:
        """At ``bound``: whether movers deleted sealed files meanwhile (looked at most every
        ``LOOK_EVERY``)."""
        now = time.monotonic()
        if now - self._looked < LOOK_EVERY:
            return False
        self._looked = now
        # A copy first (one C call, no thread switch inside): a mover's ``forget`` may drop
        # a file meanwhile, and a dict changed while iterated raised into the caller's call.
        for stem in [s for s in list(self.files) if s != self.stem]:
            if not (self.dir / f"{stem}{SUFFIX}").exists():
                self.forget(stem)
        return self._held() < bound

    def _next_file(self) -> bool:
        """Start the next generation (the first at the first call)."""
        name = self._claim()
        if name is None:
            return False
        self._gen += 1
        stem = f"{name}.{self._gen}"
        try:
            fd = os.open(
                self.dir / f"{stem}{SUFFIX}",
                os.O_WRONLY
                | os.O_CREAT
                | os.O_EXCL
                | os.O_APPEND
                | os.O_CLOEXEC
                | getattr(os, "O_NOFOLLOW", 0),
                0o600,
            )
        except OSError as exc:
            self._turn_off(exc)
            return False
        if self.fd_box[0] >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd_box[0])
        self.fd_box[0] = fd
        self.stem = stem
        self._size = 0
        self.files[stem] = 0
        return True

    def _take_back(self, written: int) -> None:
        """A short write (a full disk): cut the partial record off, or stop journaling."""
        try:
            fd = self.fd_box[0]
            end = os.fstat(fd).st_size
            os.ftruncate(fd, end - written)
        except OSError as exc:
            self._turn_off(exc)
            return
        logger.warning("a call to %s met a full disk in its journal; stored in the queue", self.dir)

    def _turn_off(self, exc: BaseException) -> None:
        if not self.off:
            self.off = True
            logger.warning(
                "calls to the queue of %s go to the queue file from now on in this process: "
                "its journal failed (%s)",
                self.dir,
                exc,
            )

    def sealed(self) -> list[str]:
        """This process's files that no call appends to any more."""
        return [stem for stem in list(self.files) if stem != self.stem]  # see ``_shrunk``

    def forget(self, stem: str) -> None:
        """A file of this process's was deleted (all of it moved)."""
        self.files.pop(stem, None)
        self.moved.pop(stem, None)

    def has_unmoved(self) -> bool:
        """Whether this process journaled bytes its own moves have not taken (no I/O)."""
        return any(size > self.moved.get(stem, 0) for stem, size in list(self.files.items()))

    def close_after_fork(self) -> None:
        """In a forked child: the parent's files are the parent's."""
        if self.fd_box[0] >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd_box[0])
        self.fd_box = [-1]
        self.stem = ""
        self._gen = 0
        self._size = 0
        self._writing = 0
        self.files = {}
        self.moved = {}
        self.lock = threading.RLock()
