"""A blocking call that takes no deadline of its own, made to return by one.

urllib3 (the proxied batch POST, the OAuth token request) bounds each socket operation by
its timeout, not the request as a whole: a server or proxy that sends its answer a byte at
a time keeps every read within the timeout and the request alive indefinitely, past any
``flush(timeout)``, exit or ``drain --timeout``; a user's ``on_error`` callback may block
for as long as it likes; ``socket.getaddrinfo`` takes no timeout at all. ``call_within``
runs such a call on a helper thread and stops waiting for it at the deadline; the abandoned
call goes on in the background until it ends, and its result is dropped. ``Background`` is
the call on its thread, for a caller that shares it between waiters (the name lookups of
``_transport/_resolve.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Background", "call_within"]

T = TypeVar("T")


class Background(Generic[T]):
    """``call()`` run once on a daemon thread; any number of threads may wait for it.

    ``start()`` starts it. Where no thread can start (interpreter exit on CPython
    3.12.0-3.12.2) it runs in the starting thread instead, bounded only by its own timeouts:
    better late than never sent.
    """

    def __init__(self, call: Callable[[], T], name: str) -> None:
        self._call = call
        self._name = name
        self._done = threading.Event()
        self._outcome: tuple[bool, object] = (False, None)
        #: ``time.monotonic()`` when the call ended (0 while it runs).
        self.finished_at = 0.0

    def start(self) -> None:
        try:
            threading.Thread(target=self._run, name=self._name, daemon=True).start()
        except RuntimeError:
            self._run()

    def _run(self) -> None:
        try:
            self._outcome = (True, self._call())
        except BaseException as exc:  # handed to the threads that wait for it
            self._outcome = (False, exc)
        finally:
            self.finished_at = time.monotonic()
            self._done.set()

    @property
    def done(self) -> bool:
        """Whether the call has ended."""
        return self._done.is_set()

    @property
    def failed(self) -> bool:
        """Whether the call has ended with an exception."""
        return self._done.is_set() and not self._outcome[0]

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the call to end; whether it has."""
        return self._done.wait(max(0.0, seconds))

    def result(self) -> T:
        """The call's result, or its exception raised (call once ``wait`` said it ended)."""
        ok, value = self._outcome
        if ok:
            return value  # type: ignore[return-value]
        raise value  # type: ignore[misc]


def call_within(seconds: float, call: Callable[[], T], what: str) -> T:
    """``call()``'s result (or its exception), or ``TimeoutError`` after ``seconds``.

    ``what`` names the call in the ``TimeoutError``'s message. Where no thread can start
    (interpreter exit on CPython 3.12.0-3.12.2), ``call`` runs in the caller's thread, bounded
    only by its own timeouts.
    """
    background = Background(call, "durable-analytics-request")
    background.start()
    if not background.wait(seconds):
        raise TimeoutError(f"{what} took longer than {seconds:g}s")
    return background.result()
