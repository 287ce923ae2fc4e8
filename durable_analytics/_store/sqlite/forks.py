"""This process's queues as a whole: what ``fork()`` does to them, and the lock for raw reads.

Every queue's ``Connections`` registers here, so that a ``fork()`` closes them all first
(``close_for_fork``; the parent resumes, a child forgets what it inherited) and a raw read of
a file happens only while none of them is open on it (see ``raw_lock``). This module owns
the process-wide state; each ``Connections`` does the per-file part.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sized
from typing import Protocol

from . import holders

__all__ = [
    "FORK_WAIT",
    "ForkAware",
    "abandon",
    "inherited_open",
    "raw_allowed",
    "raw_lock",
    "register",
]

#: How long ``fork()`` waits for this process's queue operations in flight to finish so that
#: it can close the connections first (see ``Connections.close_for_fork``).
FORK_WAIT = 5.0


class ForkAware(Protocol):
    """What the fork hooks and ``raw_allowed`` need of one queue's ``Connections``."""

    @property
    def real(self) -> str:
        """The queue file's real path."""
        ...

    @property
    def conns(self) -> Sized:
        """This process's open connections to the file."""
        ...

    @property
    def recovering(self) -> bool:
        """Whether connections of a recovery are open on the file."""
        ...

    @property
    def open_at_fork(self) -> bool:
        """Whether ``fork()`` found an operation in flight and left connections open."""
        ...

    def close_for_fork(self) -> None:
        """Close every connection before the fork (or leave them to an operation in flight)."""

    def resume_after_fork(self) -> None:
        """In the parent: let go of what ``close_for_fork`` held."""

    def forget_connections(self) -> None:
        """In the child: drop the parent's connections and locks without using them."""


_registry: weakref.WeakSet[ForkAware] = weakref.WeakSet()
_abandoned: list[object] = []  # connections inherited over fork: never used, never closed
#: In a forked child: the queue files (real paths) that the parent still had open at the
#: fork. SQLite's bookkeeping of their locks, copied into this process, describes locks this
#: process does not hold; any connection opened here would share it and run without real
#: locks (another process could then delete the -wal under it). Never opened here.
_inherited_open: set[str] = set()

#: Held while this process reads a database file other than through SQLite, and while it
#: opens a connection. Closing any descriptor of a file drops every POSIX lock this process
#: holds on it, SQLite's included (SQLite guards only its own descriptors against that): a
#: raw read is made only while no connection of this process is open on the file (see
#: ``raw_allowed``), and none may open meanwhile. Other processes' locks are not affected.
#: This module is its one owner: a forked child gets a fresh one (``raw_lock()``).
_raw = threading.RLock()
_raw_held_for_fork = False


def register(db: ForkAware) -> None:
    """Close ``db``'s connections before every ``fork()`` of this process (held weakly)."""
    _registry.add(db)


def abandon(*inherited: object) -> None:
    """Keep what a forked child inherited referenced: never used, and never closed here."""
    _abandoned.extend(inherited)


def inherited_open(real_path: str) -> bool:
    """Whether this process was forked while its parent had the file open (never open it)."""
    return real_path in _inherited_open


def raw_lock() -> threading.RLock:
    """The process-wide lock for raw reads and connection opens (see ``_raw``)."""
    return _raw


def raw_allowed(real_path: str) -> bool:
    """Whether no connection of this process is open on the file (call under raw_lock)."""
    return not any(db.real == real_path and (db.conns or db.recovering) for db in list(_registry))


def _before_fork() -> None:
    global _raw_held_for_fork  # noqa: PLW0603
    for db in list(_registry):
        db.close_for_fork()
    _raw_held_for_fork = _raw.acquire(timeout=FORK_WAIT)


def _after_fork_in_parent() -> None:
    global _raw_held_for_fork  # noqa: PLW0603
    if _raw_held_for_fork:
        _raw_held_for_fork = False
        _raw.release()
    for db in list(_registry):
        db.resume_after_fork()


def _after_fork_in_child() -> None:
    global _raw, _raw_held_for_fork  # noqa: PLW0603
    holders.reset_after_fork()
    _raw = threading.RLock()
    _raw_held_for_fork = False
    dbs = list(_registry)
    _inherited_open.update(db.real for db in dbs if db.open_at_fork)
    for db in dbs:
        db.forget_connections()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
