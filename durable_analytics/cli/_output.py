"""What the commands print: counts, sizes, ages, the drain progress line, one-line errors."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
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


def terminal_columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` writes to (``COLUMNS`` wins; 80 if unknown)."""
    # shutil.get_terminal_size() asks stdout, which `drain > summary.txt` redirects while
    # stderr, where the bar goes, is still the terminal.
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return shutil.get_terminal_size((80, 24)).columns


#: The label and the bar's narrowest and widest; what does not fit is dropped (rate, percent,
#: ETA, label, in that order) rather than let the line wrap.
_LABEL = "drain"
_MIN_BAR = 10
_MAX_BAR = 40
_PARTS = (
    ("label", "pos", "percent", "eta", "rate"),
    ("label", "pos", "percent", "eta"),
    ("label", "pos", "eta"),
    ("label", "pos"),
    ("pos",),
    (),
)


class ProgressLine:
    """Messages sent / total, percent, ETA and rate on one terminal line (click's progress bar).

    The drain workers only add to a counter (``__call__``), so the cost to delivery does not
    grow with the rate; the line is redrawn by its own thread ``1 / interval`` times a second,
    and only when it changed. Every redraw measures the terminal and fits the line in one
    column less than its width: parts are dropped before the line could wrap (a wrapped
    ``\r`` line scrolls a new copy on every redraw). Draw it only on a terminal.
    """

    def __init__(
        self,
        total: int,
        stream: TextIO,
        *,
        interval: float = 0.1,
        columns: Callable[[], int] | None = None,
    ) -> None:
        self.total = max(total, 0)
        self.done = 0
        self.updates = 0
        #: CPU seconds the redrawing thread used (known once closed), for the benchmark.
        self.render_cpu = 0.0
        self._stream = stream
        self._interval = interval
        self._columns = columns or (lambda: terminal_columns(stream))
        self._lock = threading.Lock()
        # Held while writing: a log line's clear() never lands in the middle of a redraw.
        self._draw = threading.Lock()
        self._drawn = ""
        self._stop = threading.Event()
        self._started = time.monotonic()
        # click's bar keeps the position, the smoothed ETA and formats the line; writing is
        # done here (it would measure stdout, and never redraw a line a log message wiped).
        self._bar = click.progressbar(
            length=max(self.total, 1),
            label=_LABEL,
            hidden=True,  # it formats; render() writes
            file=io.StringIO(),
            bar_template="%(label)s[%(bar)s]  %(info)s",
            show_pos=True,
            show_percent=True,
            show_eta=True,
            item_show_func=lambda rate: rate,
        )
        self._shown = 0
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
        """Stop redrawing and wipe the line (the summary is printed in its place)."""
        global _active_progress  # noqa: PLW0603
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        _active_progress = None
        self.clear()

    def clear(self) -> None:
        """Wipe the line; the next redraw draws it again."""
        with self._draw:
            self._drawn = ""
            with contextlib.suppress(OSError, ValueError):
                self._stream.write("\r\x1b[K")
                self._stream.flush()

    def line(self, columns: int | None = None) -> str:
        """The line as it would be drawn now in ``columns`` (the terminal's width if None)."""
        with self._lock:
            done = self.done
        bar = self._bar
        if done > self._shown:
            # More than counted at the start (a lease another holder gave up): extend.
            bar.length = max(bar.length or 0, self.total, done)
            bar.update(done - self._shown)
            self._shown = done
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = f"{done / elapsed:,.0f} msg/s"
        limit = (self._columns() if columns is None else columns) - 1
        for parts in _PARTS:
            bar.label = f"{_LABEL} " if "label" in parts else ""
            bar.show_pos = "pos" in parts
            bar.show_percent = "percent" in parts
            bar.show_eta = "eta" in parts
            bar.current_item = rate if "rate" in parts else None
            bar.width = 0
            room = limit - len(bar.format_progress_line())
            if room >= _MIN_BAR or not parts:
                bar.width = max(0, min(_MAX_BAR, room))
                break
        return bar.format_progress_line()[: max(limit, 0)]

    def render(self) -> None:
        """Redraw the line if it changed (or was wiped)."""
        text = self.line()
        with self._draw:
            if text == self._drawn:
                return
            self._drawn = text
            with contextlib.suppress(OSError, ValueError):
                self._stream.write("\r" + text + "\x1b[K")
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
