"""What the commands print: the drain progress line."""

from __future__ import annotations

from durable_analytics.cli._output import ProgressLine


def test_progress_line_shows_counts_rate_and_eta() -> None:
    import io

    stream = io.StringIO()
    progress = ProgressLine(1000, stream)
    progress(250)
    line = progress.line()
    assert "250/1,000" in line
    assert "msg/s" in line
    assert "ETA" in line
    progress.render()
    assert stream.getvalue().startswith("\r")
