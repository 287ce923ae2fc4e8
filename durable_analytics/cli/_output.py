"""What the commands print: counts, sizes, ages, the drain progress line, one-line errors."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import TextIO

import click

PROG = "durable-analytics"


def one_line(text: str) -> str:
    """``text`` with every run of white space (newlines too) folded into one space."""
    return " ".join(str(text).split())


def error_line(message: str) -> None:
    """Print ``durable-analytics: error: <message>`` on stderr, on a line of its own."""
    clear_progress_line()
    click.echo(f"{PROG}: error: {one_line(message)}", err=True)


def count(n: int, noun: str) -> str:
    """``1 message``, ``2,000 messages``."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def human_bytes(n: int) -> str:
    """``512 B``, ``1.5 KB``, ``2.0 MB`` (powers of 1000)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover


def human_age(seconds: float | None) -> str:
    """``<1s``, ``42s``, ``3m 5s``, ``2h 10m``, ``4d 1h``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if seconds < 1:
        return "<1s"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def duration(seconds: float) -> str:
    """An elapsed time: ``1.23s`` under ten seconds, else as :func:`human_age`."""
    return f"{seconds:.2f}s" if seconds < 10 else human_age(seconds)


def stderr_is_tty() -> bool:
    """Whether stderr is a terminal (the progress line is drawn only there)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressLine:
    """Messages sent / total, rate and ETA on one terminal line, redrawn by its own thread.

    The drain workers only add to a counter (``__call__``), so the cost to delivery does not
    grow with the rate; the line is redrawn ``1 / interval`` times a second.
    """

    def __init__(self, total: int, stream: TextIO, *, interval: float = 0.1) -> None:
        self.total = max(total, 0)
        self.done = 0
        self.updates = 0
        #: CPU seconds the redrawing thread used (known once closed), for the benchmark.
        self.render_cpu = 0.0
        self._stream = stream
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"{PROG}-progress", daemon=True)

    def __call__(self, sent: int) -> None:
        with self._lock:
            self.done += sent
            self.updates += 1

    def start(self) -> ProgressLine:
        global _active_progress  # noqa: PLW0603 - one progress line per process at a time
        _active_progress = self
        self._started = time.monotonic()
        self._thread.start()
        return self

    def close(self) -> None:
        global _active_progress  # noqa: PLW0603
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        _active_progress = None
        self.clear()

    def clear(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.write("\r\x1b[K")
            self._stream.flush()

    def line(self) -> str:
        with self._lock:
            done = self.done
        total = max(self.total, done)
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = done / elapsed
        eta = "-" if rate <= 0 else human_age((total - done) / rate)
        width = 24
        filled = width if total == 0 else int(width * done / total)
        bar = "#" * filled + "-" * (width - filled)
        return f"drain [{bar}] {done:,}/{total:,}  {rate:,.0f} msg/s  ETA {eta}"

    def render(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.write("\r" + self.line() + "\x1b[K")
            self._stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.render()
        self.render_cpu = time.thread_time()


_active_progress: ProgressLine | None = None


def clear_progress_line() -> None:
    """Wipe the progress line, if one is drawn, so a log or error line starts clean."""
    progress = _active_progress
    if progress is not None:
        progress.clear()
