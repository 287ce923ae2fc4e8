"""The drain progress bar in real terminals: a pty, and tmux at 50 and 200 columns.

The bar is drawn only when stderr is a terminal; its line must stay one column short of the
terminal's width, or every redraw wraps and scrolls a new copy of it down the screen.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import child_env

from durable_analytics.testing import Collector, Reply

from .helpers import fill, pending

MESSAGES = 300  # 15 batches of 20
DELAY = 0.05  # per batch, so the drain lasts long enough for several redraws
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _drain_argv(queue_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "durable_analytics.cli",
        "drain",
        "--queue",
        str(queue_path),
        "--concurrency",
        "1",
    ]


def _env() -> dict[str, str]:
    env = child_env()
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    return env


def _drain_on_a_pty(queue_path: Path, columns: int) -> tuple[str, str, int]:
    """Run drain with stderr on a pty of ``columns``; (what the terminal got, stdout, code)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the slave
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    try:
        child = subprocess.Popen(
            _drain_argv(queue_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            env=_env(),
        )
        os.close(slave)
        slave = -1
        reader.start()
        out, _ = child.communicate(timeout=120)
        reader.join(timeout=10)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return b"".join(chunks).decode(), out.decode(), child.returncode


@pytest.mark.parametrize("columns", [50, 200])
def test_on_a_pty_every_redraw_fits_the_width_and_the_bar_is_wiped_at_the_end(
    queue_path: Path, collector: Collector, columns: int
) -> None:
    collector.set_default(Reply(delay=DELAY))
    ids = fill(queue_path, collector.url, MESSAGES)
    terminal, out, code = _drain_on_a_pty(queue_path, columns)
    assert code == 0, terminal
    assert out.startswith(f"sent {MESSAGES}, left 0, dead-lettered 0 in ")
    assert set(collector.message_ids()) == set(ids)
    assert pending(queue_path) == 0
    assert "\n" not in terminal  # nothing but the bar went to stderr
    draws = [ANSI.sub("", part) for part in terminal.split("\r")[1:]]
    drawn = [d for d in draws if d]
    assert drawn, repr(terminal)
    assert all(len(d) <= columns - 1 for d in drawn), [d for d in drawn if len(d) >= columns]
    assert all(d.startswith("drain [") and f"/{MESSAGES}" in d for d in drawn), drawn
    if columns == 200:
        assert any("msg/s" in d and "%" in d for d in drawn), drawn
    assert draws[-1] == ""  # wiped before the summary
    # Redrawn only when it changed, at most ten times a second.
    assert len(draws) <= 10 * 120 + 2


def test_without_a_terminal_drain_writes_nothing_to_stderr(
    queue_path: Path, collector: Collector
) -> None:
    fill(queue_path, collector.url, 50)
    done = subprocess.run(
        _drain_argv(queue_path),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("sent 50, left 0, dead-lettered 0 in ")


@contextlib.contextmanager
def _tmux(columns: int, command: str) -> Iterator[list[str]]:
    """Run ``command`` in a detached tmux of ``columns`` x 12 on a private server."""
    socket = f"da-test-{uuid.uuid4().hex[:10]}"
    base = ["tmux", "-L", socket, "-f", os.devnull]
    env = _env()
    env.pop("TMUX", None)
    subprocess.run(
        [*base, "new-session", "-d", "-x", str(columns), "-y", "12", "-s", "t", command],
        check=True,
        env=env,
        timeout=30,
    )
    try:
        yield base
    finally:
        subprocess.run([*base, "kill-server"], check=False, timeout=30, capture_output=True)


def _capture(base: list[str]) -> list[str]:
    done = subprocess.run(
        [*base, "capture-pane", "-p", "-t", "t"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.splitlines()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.parametrize("columns", [50, 200])
def test_in_tmux_the_bar_stays_on_one_line_and_the_summary_replaces_it(
    queue_path: Path, collector: Collector, columns: int, tmp_path: Path
) -> None:
    """What a person sees: a screen captured many times during the drain and after it."""
    collector.set_default(Reply(delay=DELAY))
    fill(queue_path, collector.url, MESSAGES)
    done_file = tmp_path / "exit-code"
    command = (
        f"{shlex.join(_drain_argv(queue_path))}; echo $? > {shlex.quote(str(done_file))}; sleep 120"
    )
    screens: list[list[str]] = []
    with _tmux(columns, command) as base:
        deadline = time.monotonic() + 120
        while not done_file.exists() and time.monotonic() < deadline:
            screens.append(_capture(base))
            time.sleep(0.03)
        assert done_file.exists(), "drain did not finish"
        final = [line for line in _capture(base) if line.strip()]
    assert done_file.read_text().strip() == "0"
    during = [[line for line in s if line.strip()] for s in screens]
    with_bar = [s for s in during if any("drain [" in line for line in s)]
    assert with_bar, during[-5:]
    for screen in with_bar:
        # One line on the screen: no wrapped tail, no scrolled copies.
        assert len(screen) == 1, screen
        line = screen[0]
        assert line.startswith("drain ["), screen
        assert "]" in line, screen
        assert f"/{MESSAGES}" in line, screen
        assert len(line) < columns
    if columns == 200:
        assert any("msg/s" in s[0] for s in with_bar), with_bar[-1]
    assert not any("drain [" in line for line in final), final  # the bar was wiped
    # The summary (a plain line, which may wrap once at 50 columns) is all that is left.
    assert "".join(final).startswith(f"sent {MESSAGES}, left 0, dead-lettered 0 in "), final
    print(f"\n{columns} columns, {len(with_bar)} screens with the bar; last: {with_bar[-1][0]!r}")
