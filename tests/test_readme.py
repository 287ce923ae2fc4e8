"""Every Python snippet in README.md runs as written: no name it uses is left undefined.

A trial user pasted the FastAPI snippet and met ``NameError: FastAPI`` and an undefined
``your_lifespan``. Each ```python block is checked on its own with ruff's undefined-name
rule (a block is a file: settings.py and views.py are two blocks), and the snippets that
are tests are run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def _line(block: str) -> str:
    return block.splitlines()[0][:60]


def test_the_readme_has_python_snippets() -> None:
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("block", BLOCKS, ids=_line)
def test_a_readme_snippet_uses_no_undefined_name(block: str) -> None:
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--isolated",
            "--no-cache",
            "--select",
            "F821,F822,F823",
            "--output-format",
            "concise",
            "--stdin-filename",
            "snippet.py",
            "-",
        ],
        input=block,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


TESTS = [block for block in BLOCKS if re.search(r"^def test_\w+\(tmp_path\):", block, re.M)]


@pytest.mark.parametrize("block", TESTS, ids=_line)
def test_a_readme_snippet_that_is_a_test_passes(block: str, tmp_path: Path) -> None:
    namespace: dict[str, Any] = {"__name__": "readme_snippet"}
    exec(compile(block, "README.md", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert tests
    for test in tests:
        test(tmp_path / test.__name__)
