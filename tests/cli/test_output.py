"""What the commands print: the drain progress line (click's bar, fitted to the terminal)."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import termios

import pytest
from freezegun import freeze_time

from durable_analytics.cli._output import ProgressLine, terminal_columns


def test_progress_line_shows_counts_percent_eta_and_rate_in_a_wide_terminal() -> None:
    with freeze_time("2026-01-01 12:00:00") as frozen:
        progress = ProgressLine(1000, io.StringIO())
        progress(250)
        frozen.tick(2)
        progress(250)
        line = progress.line(200)
    assert line.startswith("drain [")
    assert "500/1000" in line
    assert "50%" in line
    assert "00:00:02" in line  # click's ETA: 500 left at 250 a second
    assert "msg/s" in line


@pytest.mark.parametrize("total", [1, 1000, 123_456_789])
def test_the_line_always_fits_one_column_short_of_the_terminal(total: int) -> None:
    """A line as wide as the terminal (or wider) would wrap, and every redraw would scroll."""
    progress = ProgressLine(total, io.StringIO())
    progress(max(1, total // 3))
    for columns in range(1, 260):
        line = progress.line(columns)
        assert len(line) <= max(columns - 1, 0), (columns, line)
        if columns >= 50:
            assert f"/{total}" in line, (columns, line)  # the count survives at 50 columns
            assert line.count("[") == 1


def test_parts_are_dropped_from_the_right_before_the_bar_gets_too_narrow() -> None:
    # Frozen clock: the rate's and the ETA's widths depend on elapsed time (a run that took
    # a millisecond has no ETA yet and a seven-digit rate), so a real clock made this flaky.
    with freeze_time("2026-01-01 12:00:00") as frozen:
        progress = ProgressLine(1000, io.StringIO())
        frozen.tick(2)
        progress(100)
        wide, narrow = progress.line(200), progress.line(50)
    assert "msg/s" in wide
    assert "msg/s" not in narrow
    assert narrow.startswith("drain [")
    bar = narrow[narrow.index("[") + 1 : narrow.index("]")]
    assert len(bar) >= 10


def test_more_sent_than_counted_at_the_start_extends_the_total() -> None:
    progress = ProgressLine(10, io.StringIO())
    progress(15)
    assert "15/15" in progress.line(120)


def test_render_writes_only_a_changed_line_and_redraws_after_a_clear() -> None:
    stream = io.StringIO()
    progress = ProgressLine(1000, stream, columns=lambda: 80)
    with freeze_time("2026-01-01 12:00:00"):
        progress(250)
        progress.render()
        progress.render()  # same line: nothing written
        assert stream.getvalue().count("\r") == 1
        progress.clear()
        progress.render()  # wiped by a log line: drawn again
    writes = stream.getvalue().split("\r")[1:]
    assert writes[0].endswith("\x1b[K")
    assert writes[1] == "\x1b[K"
    assert writes[2] == writes[0]
    assert "\n" not in stream.getvalue()


def test_the_width_is_the_terminal_the_bar_writes_to_not_stdout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`drain > out.txt` redirects stdout; the bar on stderr still measures stderr's terminal."""
    monkeypatch.delenv("COLUMNS", raising=False)
    master, slave = os.openpty()
    try:
        for cols in (50, 200):
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
            with open(os.dup(slave), "w") as stream:
                assert terminal_columns(stream) == cols
        monkeypatch.setenv("COLUMNS", "77")
        with open(os.dup(slave), "w") as stream:
            assert terminal_columns(stream) == 77
    finally:
        os.close(master)
        os.close(slave)
    assert terminal_columns(io.StringIO()) > 0
