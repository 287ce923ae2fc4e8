"""A blocking call that takes no deadline of its own, made to return by one.

urllib3 (the proxied batch POST, the OAuth token request) bounds each socket operation by
its timeout, not the request as a whole: a server or proxy that sends its answer a byte at
a time keeps every read within the timeout and the request alive indefinitely, past any
``flush(timeout)``, exit or ``drain --timeout``; and a user's ``on_error`` callback may block
for as long as it likes. ``call_within`` runs such a call on a helper thread and stops
waiting for it at the deadline. The abandoned call goes on in the
background until the server lets go of it; its result is dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["call_within"]

T = TypeVar("T")


def call_within(seconds: float, call: Callable[[], T], what: str) -> T:
    """``call()``'s result (or its exception), or ``TimeoutError`` after ``seconds``.

    ``what`` names the call in the ``TimeoutError``'s message. Where no thread can start
    (interpreter exit on CPython 3.12.0-3.12.2), ``call`` runs in the caller's thread, bounded
    only by its own timeouts.
    """
    outcome: list[tuple[bool, object]] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append((False, exc))
        finally:
            done.set()

    try:
        threading.Thread(target=run, name="durable-analytics-request", daemon=True).start()
    except RuntimeError:
        return call()
    if not done.wait(max(0.0, seconds)):
        raise TimeoutError(f"{what} took longer than {seconds:g}s")
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[return-value]
    raise value  # type: ignore[misc]
