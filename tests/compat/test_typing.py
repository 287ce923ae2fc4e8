"""mypy --strict over ``typing/uses.py``: the right uses pass, each marked mistake is caught."""

from __future__ import annotations

import re
from pathlib import Path

USES = Path(__file__).parent / "typing" / "uses.py"
ROOT = Path(__file__).resolve().parents[2]
_MARK = re.compile(r"#\s*E:\s*([a-z-]+)\s*$")
_ERROR = re.compile(r"^[^:]+:(\d+): error: .*\[([a-z-]+)\]$")


def expected_errors() -> set[tuple[int, str]]:
    found = set()
    for number, line in enumerate(USES.read_text().splitlines(), start=1):
        match = _MARK.search(line)
        if match:
            found.add((number, match.group(1)))
    return found


def mypy_errors() -> tuple[set[tuple[int, str]], str]:
    from mypy import api

    out, err, _ = api.run(
        [
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--no-error-summary",
            "--show-error-codes",
            "--hide-error-context",
            "--no-pretty",
            str(USES),
        ]
    )
    errors = set()
    for line in out.splitlines():
        match = _ERROR.match(line.strip())
        if match:
            errors.add((int(match.group(1)), match.group(2)))
    return errors, out + err


def test_mypy_catches_exactly_the_marked_mistakes() -> None:
    """Each ``# E:`` line errs with that code under mypy --strict, and no other line does."""
    assert len(expected_errors()) >= 10
    errors, output = mypy_errors()
    assert errors == expected_errors(), output
