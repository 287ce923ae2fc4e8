"""The library's child processes: the flusher of ``flusher="process"`` and the exit drain.

``python -m durable_analytics._flusher_process_main flusher`` delivers one queue for its
parent on its own core (and its own GIL), and ends after the parent exits: it then delivers
what it can within ``shutdown_timeout`` and leaves the rest on disk.
``python -m durable_analytics._flusher_process_main drain`` is the detached drain that
``on_exit="spawn"`` starts: it delivers what is queued and exits (one per queue at a time).

Both receive the parent's whole ``Config`` as JSON over an inherited pipe (``--settings-fd``),
never as flags: a command line is world-readable and must not hold the write key or proxy
credentials, and flags would re-declare (and drift from) the parent's settings. Where these
processes fit: docs/ARCHITECTURE.md, "The process model".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from ._config import Config
from ._delivery import make_deliverer
from ._drain import deliver_until, drain_lock, drain_queue, lock_path
from ._flusher import Flusher
from ._store import open_queue
from .exceptions import ConfigError, QueueBusy

__all__ = ["main", "start"]

log = logging.getLogger("durable_analytics.delivery")

# The command children run: a module the package does not import, so that ``python -m``
# finds it new (running this one, which the package imports, makes runpy warn).
_MODULE = "durable_analytics._flusher_process_main"
_MODES = ("flusher", "drain")


def start(mode: str, config: Config, *, detach: bool = False) -> subprocess.Popen[bytes]:
    """Start ``mode`` (``"flusher"`` or ``"drain"``) for ``config`` in a new interpreter.

    The settings travel over a pipe the child inherits; its command line only names the
    mode and the pipe's descriptor. ``detach`` starts it in its own session, so it outlives
    the parent and its terminal.
    """
    payload = json.dumps({"parent": os.getpid(), "config": config.to_json()}).encode()
    read_end, write_end = os.pipe()  # both non-inheritable: only pass_fds crosses
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", _MODULE, mode, "--settings-fd", str(read_end)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if detach else None,
            close_fds=True,
            pass_fds=(read_end,),
            start_new_session=detach,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    try:
        with open(write_end, "wb") as pipe:
            # Length first: the child reads exactly that much rather than waiting for EOF,
            # which never comes if a fork elsewhere in this process inherited the write end.
            pipe.write(b"%d\n" % len(payload) + payload)
    except BrokenPipeError:
        log.warning("the durable-analytics %s process exited before reading its settings", mode)
    return child


def _read_settings(fd: int) -> tuple[int, Config]:
    with open(fd, "rb") as pipe:
        header = pipe.readline(32)
        try:
            size = int(header)
        except ValueError:
            raise ConfigError("unreadable settings from the parent: no length") from None
        data = pipe.read(size)
    try:
        payload: Any = json.loads(data)
        parent = int(payload["parent"])
        text = payload["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"unreadable settings from the parent: {exc}") from None
    return parent, Config.from_json(text)


def _parent_alive(parent: int) -> bool:
    if os.getppid() != parent:
        return False  # re-parented: the parent exited
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_flusher(config: Config, parent: int) -> int:
    """Run the flusher loop until the parent exits or SIGTERM arrives, then deliver the rest."""
    queue = open_queue(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    flusher = Flusher(
        make_deliverer(config, queue), flush_interval=config.flush_interval, poll_interval=0.1
    )
    flusher.start()
    while not stop.is_set() and _parent_alive(parent):
        stop.wait(0.1)
    # The parent is gone (or we were asked to stop): finish the batch in flight and deliver
    # the rest, all within one shutdown_timeout. Every queue wait of every thread (the
    # flusher's lease or ack behind another process's lock, maybe a frozen one) ends by
    # then too: the flusher thread gives its batch back instead of waiting out busy_timeout.
    deadline = time.monotonic() + config.shutdown_timeout
    try:
        with queue.bounded(config.shutdown_timeout):
            flusher.stop(config.shutdown_timeout)
            flusher.deliverer.transport.close()
            if time.monotonic() < deadline and queue.pending():
                deliver_until(queue, lambda: make_deliverer(config, queue), deadline=deadline)
    except QueueBusy:
        pass  # a lock held past the deadline: what is left stays queued
    return 0


def run_drain(config: Config) -> int:
    """Deliver what ``config``'s queue holds now, unless another exit drain is at it."""
    if config.queue_url is None and not os.path.lexists(config.queue_path):
        return 0
    with contextlib.ExitStack() as stack:
        if not stack.enter_context(drain_lock(lock_path(config))):
            return 0  # another drain has this queue
        queue = open_queue(config)
        stack.callback(queue.close)
        result = drain_queue(queue, config)
    return 1 if result.left else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``<mode> --settings-fd N``; the settings are read from descriptor N."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] not in _MODES or args[1] != "--settings-fd":
        print(f"usage: python -m {_MODULE} {{flusher,drain}} --settings-fd N", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="durable-analytics %(message)s")
    try:
        parent, config = _read_settings(int(args[2]))
    except (ConfigError, ValueError, OSError) as exc:
        log.error("%s: %s", args[0], exc)
        return 2
    if args[0] == "drain":
        return run_drain(config)
    return run_flusher(config, parent)
