"""The Client across processes: forked children, its flusher process, and interpreter exit.

Private; ``Client`` uses these. After ``os.fork()`` every live client of the child starts
afresh on its first call (``live_clients``). ``FlusherProcess`` is the child process of
``flusher="process"``, replaced with backoff each time it exits. ``ExitHook`` runs a
client's exit handler once at interpreter exit, in a ``multiprocessing`` child too, and
``spawn_drain`` is what ``on_exit="spawn"`` leaves behind.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _flusher_process
from ._config import Config

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["ExitHook", "FlusherProcess", "live_clients", "spawn_drain"]

# The Client's logger: these are the client's own messages.
log = logging.getLogger("durable_analytics.client")

# Restarts of a flusher process that keeps exiting: the first delay, its cap, and how long a
# child must have run for the next exit to count as a new failure (see FlusherProcess).
_RESTART_FIRST = 0.5
_RESTART_MAX = 60.0
_RESTART_HEALTHY = 60.0

#: Every live Client of this process, held weakly: reset in a forked child, and closed by
#: the framework shutdown hooks (``contrib``).
live_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(live_clients):
        client._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class FlusherProcess:
    """A client's flusher process, replaced each time it exits, backing off while it fails.

    A child that cannot start (a broken environment, an unusable queue) would otherwise
    be restarted in a tight loop: the delay doubles from _RESTART_FIRST up to _RESTART_MAX
    and starts over once a child has run for _RESTART_HEALTHY. One WARNING says why; the
    restarts after it are logged at DEBUG. Messages wait on disk meanwhile.
    """

    def __init__(self, spawn: Callable[[], subprocess.Popen[bytes]]) -> None:
        self._spawn = spawn
        self._lock = threading.Lock()
        self._stopped = False
        #: The child running now (or the last one, once it exited).
        self.child: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the child and the watcher thread that replaces it if it dies."""
        child = self._spawn()
        self.child = child
        threading.Thread(
            target=self._watch, args=(child,), name="durable-analytics-watch", daemon=True
        ).start()

    def _watch(self, child: subprocess.Popen[bytes]) -> None:
        delay = _RESTART_FIRST
        warned = False
        while True:
            started = time.monotonic()
            code = child.wait()
            if time.monotonic() - started >= _RESTART_HEALTHY:
                delay, warned = _RESTART_FIRST, False
            with self._lock:
                if self._stopped:
                    return  # stopped on purpose by the client's close()
            (log.debug if warned else log.warning)(
                "the durable-analytics flusher process exited (%s); starting a new one in "
                "%.1f s (doubling up to %d s while it keeps exiting; its own errors are on "
                "stderr)",
                _exit_reason(code),
                delay,
                _RESTART_MAX,
            )
            warned = True
            time.sleep(delay)
            with self._lock:
                if self._stopped:
                    return
                child = self._spawn()
                self.child = child
            delay = min(delay * 2, _RESTART_MAX)

    def stop(self, timeout: float) -> None:
        """Replace it no more; terminate the child, killing it after ``timeout`` seconds."""
        with self._lock:
            self._stopped = True
            child = self.child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()


class ExitHook:
    """Where a client's exit handler is registered: once, on the client's first call.

    It keeps no reference to the handler (a bound method would tie the client to itself in
    a cycle): until the first call, a dropped client is freed at once, its files with it.
    """

    def __init__(self) -> None:
        self._atexit = False
        self._mp_finalizer = False

    def register(self, handler: Callable[[], None]) -> None:
        """Register ``handler`` with atexit and, in a multiprocessing child, its finalizers."""
        if not self._atexit:
            atexit.register(handler)
            self._atexit = True
        if not self._mp_finalizer and multiprocessing.parent_process() is not None:
            # A multiprocessing child ends with os._exit() after its target returns,
            # skipping atexit; multiprocessing's own finalizers still run there.
            multiprocessing.util.Finalize(None, handler, exitpriority=10)
            self._mp_finalizer = True

    def after_fork(self) -> None:
        """In a forked child: atexit's registration carried over, a finalizer may not have."""
        self._mp_finalizer = False


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def spawn_drain(config: Config) -> subprocess.Popen[bytes]:
    """Start a detached drain of ``config``'s queue with ``config``'s settings; return at once.

    The drain is the library's own (``python -m durable_analytics._flusher_process_main drain``),
    not the CLI; it receives the whole Config over a pipe and exits when done. At most one
    runs per queue: a second one finds the drain lock taken and exits.
    """
    return _flusher_process.start("drain", config, detach=True)
