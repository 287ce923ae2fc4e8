"""The table of intended differences: every row exercised, and shown in the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .differences import DIFFERENCES, README_END, README_START, render

HERE = Path(__file__).parent
README = HERE.parents[1] / "README.md"


def scenario_sources() -> str:
    return "\n".join(p.read_text() for p in sorted(HERE.glob("test_*.py")))


def test_keys_are_unique() -> None:
    """One row per difference."""
    keys = [d.key for d in DIFFERENCES]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("key", [d.key for d in DIFFERENCES])
def test_every_difference_is_exercised_by_a_scenario(key: str) -> None:
    """Each row is asserted by at least one test (``differs(lib, key, ...)`` or a mark)."""
    pattern = re.compile(
        r'(differs\(\s*lib,\s*|mark\.difference\()"' + re.escape(key) + '"', re.MULTILINE
    )
    assert pattern.search(scenario_sources()), f"no scenario asserts {key!r}"


def test_readme_shows_the_table() -> None:
    """The README's compatibility table is exactly the rendered table (regenerate on change).

    To regenerate: ``python -c "from tests.compat.differences import render; print(render())"``
    and paste it between the markers.
    """
    text = README.read_text()
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    assert text[start:end] == render()
