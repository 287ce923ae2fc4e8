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
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from typing import Any

from ._answer import remaining

__all__ = ["TTL", "LookupTimeout", "Resolver"]

#: How long an answer is used for new connections before the name is looked up again.
TTL = 30.0

_AddrInfo = list[tuple[Any, ...]]


class LookupTimeout(TimeoutError):
    """The name lookup did not answer before the deadline."""


class _Lookup:
    """One ``getaddrinfo`` call on its own thread, and its answer once it has one."""

    def __init__(self, host: str, port: int) -> None:
        self.done = threading.Event()
        self.answer: _AddrInfo | None = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        thread = threading.Thread(
            target=self._run, args=(host, port), name="durable-analytics-resolve", daemon=True
        )
        thread.start()

    def _run(self, host: str, port: int) -> None:
        try:
            self.answer = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except BaseException as exc:  # handed to the caller that waits for it
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.done.set()


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
        with self._lock:
            if self._pid != os.getpid():
                self._lookups = {}
                self._pid = os.getpid()
            lookup = self._lookups.get(key)
            if lookup is None or (
                lookup.done.is_set()
                and (lookup.error is not None or time.monotonic() - lookup.finished_at > TTL)
            ):
                lookup = self._lookups[key] = _Lookup(host, port)
        if not lookup.done.wait(remaining(deadline)):
            raise LookupTimeout(f"looking up {host!r} took longer than the time left")
        if lookup.error is not None or lookup.answer is None:
            raise lookup.error or ConnectionError(f"no address for {host!r}")
        return lookup.answer
