"""Host name lookups that end by the caller's deadline.

``socket.getaddrinfo`` takes no timeout and cannot be interrupted: behind a resolver that
does not answer it blocks for the system's own timeouts (5 s per try and server in glibc's
defaults, often several), whatever a ``flush(timeout=1)`` or an exit's ``shutdown_timeout``
promised. So a name is looked up on a daemon thread and the caller waits for at most what is
left of its deadline (``TimeoutError`` then, which the transport reports as a timed-out
request: the batch stays queued).

- One lookup per host and port at a time: callers that come while it runs wait for the same
  one, so a resolver that hangs costs one thread per name, never one per request.
- A lookup that answered is kept for ``TTL`` seconds. A lookup that outlived its callers is
  not wasted: the next caller takes its answer, so a slow resolver (slower than a flush's
  deadline) still lets delivery go on. Failures are not kept: the next caller asks again.
- Addresses (``127.0.0.1``, ``::1``) skip the thread: the system answers those at once.
- After a fork the child starts empty (a lookup thread of the parent does not run there).
- Where no thread can start (interpreter exit on CPython 3.12.0-3.12.2) the lookup runs on
  the caller's thread, bounded only by the resolver, as it did before: an exit there still
  reaches a host given by name (``_bounded_call.Background``).
"""

from __future__ import annotations

import codecs
import functools
import ipaddress
import os
import socket
import threading
import time
from typing import Any

from durable_analytics._bounded_call import Background

from ._answer import remaining

__all__ = ["TTL", "LookupTimeout", "Resolver"]

#: How long an answer is used for new connections before the name is looked up again.
TTL = 30.0

# ``getaddrinfo`` encodes the host with the "idna" codec, whose module the first call
# imports. A process that forks while its flusher thread is inside that import (a gunicorn
# master that tracked, then forked its workers) leaves the module's import lock held in the
# children by a thread they do not have: their first lookup then waits forever (seen in
# tests/reliability/test_process_model.py). Imported here, with this module, before any
# thread of ours can run a lookup.
codecs.lookup("idna")

_AddrInfo = list[tuple[Any, ...]]
_Lookup = Background[_AddrInfo]


class LookupTimeout(TimeoutError):
    """The name lookup did not answer before the deadline."""


def _numeric(host: str, port: int) -> _AddrInfo | None:
    """The address of a host given as an IP address (no lookup needed), else None."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)


class Resolver:
    """Looks names up for one ``WireClient`` (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lookups: dict[tuple[str, int], _Lookup] = {}
        self._pid = os.getpid()

    def addresses(self, host: str, port: int, deadline: float) -> _AddrInfo:
        """The addresses of ``host`` (``getaddrinfo``'s answer), waiting until ``deadline``.

        Raises what ``getaddrinfo`` raised (``socket.gaierror`` for an unknown name), or
        ``LookupTimeout`` (a ``TimeoutError``) when the deadline (a ``time.monotonic()``
        value) passes first.
        """
        numeric = _numeric(host, port)
        if numeric is not None:
            return numeric
        key = (host, port)
        new = None
        with self._lock:
            if self._pid != os.getpid():
                self._lookups = {}
                self._pid = os.getpid()
            lookup = self._lookups.get(key)
            if lookup is None or (
                lookup.done and (lookup.failed or time.monotonic() - lookup.finished_at > TTL)
            ):
                lookup = new = self._lookups[key] = Background(
                    functools.partial(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM),
                    "durable-analytics-resolve",
                )
        if new is not None:
            new.start()  # outside the lock: where no thread can start, it runs right here
        if not lookup.wait(remaining(deadline)):
            raise LookupTimeout(f"looking up {host!r} took longer than the time left")
        return lookup.result()
