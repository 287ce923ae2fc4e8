"""Delivery slots: how many processes deliver from one queue file at once.

SQLite lets one connection write at a time, and every delivery step (a lease, an ack, a
move of the journals) is a write. A few processes delivering side by side share that lock
well. Twenty of them (a worker pool shut down at once, each exit or ``close()`` flushing
the one shared queue) spent their time waiting for it: threads polled the lock, and
whoever held it was preempted among them. 20 processes closing with 6,000 messages queued
delivered 3,000-3,800 of them in ``shutdown_timeout`` (5 s) and sent up to 60 twice
(requests dropped at the deadline with their answers unread).

So a flush loop (``flush()``, ``close()``, exit, the detached exit drain, a flusher
process's last delivery, ``drain`` without ``--host``/``--write-key``; not ``sync_mode``'s
one message) delivers only while its process holds one of ``SLOTS`` slots: an exclusive
``flock`` on ``<queue>.slot<k>.lock``. With ``SLOTS`` or fewer processes
flushing at once, each takes one at once. A process that has none waits, polling every
``POLL`` seconds, while another process has a lease out on its destination: the holders
deliver that destination's messages (up to what each of their own loops was asked for),
and a slot comes free as each of them ends; its loop ends as soon as nothing it waits
for is pending. It does not wait when nobody delivers its destination (the holders
deliver others), nor when the destination's messages in the file stopped going down for
``PATIENCE`` seconds (a holder stopped with ``SIGSTOP``, hung), nor past 5 s in all or
half the time its deadline left it (the holders may work through older messages for
long): then it delivers without a slot, as every loop did before. The kernel releases a
slot whose holder died. The background flusher threads and ``worker`` take no slot.
A process holds one slot at a time: its threads and its queue handles on the file (two
Clients of two write keys) share it. Where no slot file can ever be opened (another user's,
not a file), loops deliver without slots; an open that fails for a passing reason (out of
descriptors) counts as a taken slot that once.

Slots are taken whenever a loop runs, not only once many processes share the file: an
earlier rule (slots past ``SLOTS`` processes with journals or spools, counted from the
spool directory) let a loop that looked just after the others' flushes had moved their
journals into the file count itself alone and deliver beside the slot holder.

A child forked while its parent held one closes its copy of the descriptor at once
(``os.register_at_fork``): the slot stays the parent's, freed when the parent leaves it. A
fork waits for a thread that is taking or giving back a slot (``FORK_WAIT`` at most):
forked between the ``flock`` and the record of its descriptor, the child kept a copy it
did not know of, and held the slot for its life.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["FORK_WAIT", "LOCK_WAIT", "PATIENCE", "POLL", "SLOTS", "DeliverySlots"]

#: Processes whose flush loops deliver from one queue file at once.
SLOTS = 4
#: How often a process without a slot tries for one (seconds).
POLL = 0.02
#: How long a flush loop waits for a slot while its destination's messages in the file do
#: not go down (seconds); past it, it delivers without one.
PATIENCE = 2.0
#: How long a pass waits for another thread of its process to finish counting holders.
LOCK_WAIT = 0.01
#: How long a fork waits for a thread taking or giving back a slot (seconds): a moment's
#: work (non-blocking ``flock``s, a ``close``), unless that thread was stopped in it; past
#: this the fork goes on (a child forked inside it may then keep the slot, as before).
FORK_WAIT = 1.0


class DeliverySlots:
    """The delivery slots of one queue file, as one queue handle sees them (the module).

    The handles of one process on one file share their hold on the slots (``_Turn``): two
    Clients on the file take turns as one process, as threads of one Client do.
    ``own_turn`` gives this handle a hold of its own, as another process would have (for
    tests that play several processes in one).
    """

    def __init__(
        self, path: Path, working: Callable[[int | None], bool], *, own_turn: bool = False
    ) -> None:
        #: How often a loop without a slot tries again, and how long it waits without
        #: progress (read by ``_drain``).
        self.poll = POLL
        self.patience = PATIENCE
        #: Whether a lease is out on a destination (None: on any), read from the file.
        self.working = working
        files = [path.with_name(f"{path.name}.slot{k}.lock") for k in range(SLOTS)]
        if own_turn:
            self._turn = _Turn(files)
        else:
            key = os.path.realpath(path)
            with _turns_lock:
                turn = _turns.get(key)
                if turn is None:
                    turn = _turns[key] = _Turn(files)
            self._turn = turn

    def needed(self) -> bool:
        """Whether a flush loop takes turns on the slots: on POSIX, unless no slot file
        can ever be opened (then every loop delivers without one)."""
        return self._turn.usable

    def holding(self) -> bool:
        """Whether this process (this handle's turn) holds a slot now."""
        return self._turn.holders > 0

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """Hold a slot inside the block if one is free (or this process holds one); yields
        whether it does."""
        turn = self._turn
        taken = turn.take()
        try:
            yield taken
        finally:
            if taken:
                turn.give()


class _Turn:
    """One process's hold on the slots of one queue file: the slot's descriptor and how
    many passes of its threads are inside ``held()``."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        #: False once no slot file could ever be opened: loops then deliver without.
        self.usable = fcntl is not None
        self.lock = threading.Lock()
        self.fd = -1
        self.holders = 0
        _everyone.add(self)

    def forget_after_fork(self) -> None:
        """In a child just forked (only the forking thread runs): the slot is the parent's.
        The child's copy of its descriptor is closed at once, so that the parent's release
        frees the slot (a copy left open would keep the flock held while the child lives);
        closed, not unlocked, which would release the parent's slot now. The lock is new:
        a thread of the parent may have held it at the fork."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.lock = threading.Lock()
        self.fd, self.holders = -1, 0

    def take(self) -> bool:
        """Take a slot, or ride on the one this process holds; False if none is free."""
        # A moment at most: another thread holds it only to count, and a signal handler's
        # flush inside this thread's own count must not wait for itself (its loop then
        # waits for a slot like any other).
        if not self.lock.acquire(timeout=LOCK_WAIT):
            return False
        try:
            if self.holders:
                self.holders += 1
                return True
            opened = False
            for file in self.files:
                fd = _try_lock(file)
                if fd >= 0:
                    self.fd, self.holders = fd, 1
                    return True
                opened = opened or fd == _TAKEN
            # Every file refused to open for good: nobody can hold these slots, so none is
            # waited for.
            self.usable = opened
            return False
        finally:
            self.lock.release()

    def give(self) -> None:
        """Give back what ``take`` took; the last pass out closes the slot's descriptor."""
        with self.lock:
            if self.holders == 0:
                return  # taken in the parent, before a fork: not this process's
            self.holders -= 1
            if self.holders == 0 and self.fd >= 0:
                fd, self.fd = self.fd, -1
                with contextlib.suppress(OSError):
                    os.close(fd)  # releases the flock


#: This process's turn on each queue file (by its real path), while a handle uses it.
_turns: weakref.WeakValueDictionary[str, _Turn] = weakref.WeakValueDictionary()
_turns_lock = threading.Lock()
#: Every turn of this process, forgotten in a forked child.
_everyone: weakref.WeakSet[_Turn] = weakref.WeakSet()
#: The turns whose lock ``_before_fork`` took, per forking thread (two threads may fork at
#: once), for the parent to let go after the fork.
_forking = threading.local()


def _before_fork() -> None:
    # Every slot's lock, so that no other thread is between its flock and the record of
    # its descriptor (or between clearing that record and the close) at the fork: the
    # child's copy of the descriptor is then always the one ``forget_after_fork`` closes.
    # The forking thread itself may hold one (a fork from a signal handler that interrupted
    # ``take``): a timed wait, never a deadlock.
    # The registry's lock too: another thread may be looking a turn up.
    _forking.registry = _turns_lock.acquire(timeout=FORK_WAIT)
    _forking.held = [t for t in list(_everyone) if t.lock.acquire(timeout=FORK_WAIT)]


def _after_fork_in_parent() -> None:
    held: list[_Turn] = getattr(_forking, "held", [])
    _forking.held = []
    for turn in held:
        turn.lock.release()
    _let_go_of_the_registry()


def _after_fork_in_child() -> None:
    _forking.held = []  # the child makes new locks (``forget_after_fork``)
    for turn in list(_everyone):
        turn.forget_after_fork()
    _let_go_of_the_registry()


def _let_go_of_the_registry() -> None:
    if getattr(_forking, "registry", False):
        _forking.registry = False
        _turns_lock.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


#: What ``_try_lock`` returns when another process holds the file's flock (or the file could
#: not be opened for a passing reason), and when it can never be opened.
_TAKEN, _UNOPENED = -1, -2
#: Why an open fails for good (slots are then off): the file is not ours to open, or not a
#: file. Others (out of descriptors, ``EINTR``) pass: the slot counts as taken this once.
_LASTING = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ELOOP, errno.ENOTDIR}
)


def _try_lock(file: Path) -> int:
    """A descriptor of ``file`` holding its exclusive flock, or ``_TAKEN`` / ``_UNOPENED``."""
    try:
        fd = os.open(
            file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o600
        )
    except OSError as exc:
        return _UNOPENED if exc.errno in _LASTING else _TAKEN
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return _TAKEN
    return fd
