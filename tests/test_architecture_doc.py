"""docs/ARCHITECTURE.md stays true to the code that cites it.

Its layer table is the ``LAYERS`` list that ``tests/test_layers.py`` enforces; every section
a comment or docstring cites exists; and nothing in the repository cites a design file from
outside it, which a maintainer who clones the project could not read.
"""

from __future__ import annotations

import re
from pathlib import Path

from test_layers import LAYERS

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
LAYER_HEADING = "Modules and the direction of imports"


def _headings() -> list[str]:
    """The doc's section titles, without their numbers and backticks."""
    titles = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#{2,4} (?:[\d.]+ )?(.+)", line)
        if match:
            titles.append(match.group(1).replace("`", "").strip())
    return titles


def _doc_layers() -> list[set[str]]:
    """The layer table: the first code block after the layers heading, lowest layer first."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split(LAYER_HEADING, 1)[1]
    block = section.split("```", 2)[1]
    rows = []
    for line in block.strip().splitlines():
        rank, names = line.split(maxsplit=1)
        rows.append((int(rank), {name.strip() for name in names.split(",")}))
    rows.sort()
    assert [rank for rank, _ in rows] == list(range(len(rows)))
    return [names for _, names in rows]


def _sources() -> list[Path]:
    """The package, the tests, the docs, benchmarks and the top-level documents."""
    found = [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    for folder in ("durable_analytics", "tests", "docs", "benchmarks"):
        found += sorted(
            p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md") and p.is_file()
        )
    return [p for p in found if p.exists()]


def test_the_layer_table_in_the_doc_is_the_one_test_layers_enforces() -> None:
    """Adding a module to LAYERS without the doc (or the reverse) fails here."""
    assert _doc_layers() == LAYERS


def test_every_cited_section_of_the_doc_exists() -> None:
    """A section the code cites by its quoted title is the start of one of the doc's headings."""
    titles = _headings()
    cited: list[tuple[str, str]] = []
    for path in _sources():
        # Join lines (and comment markers) so a citation broken over two lines still reads.
        text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", path.read_text(encoding="utf-8"))
        for title in re.findall(r'docs/ARCHITECTURE\.md[\s,(]*"([^"]+)"', text):
            cited.append((str(path.relative_to(ROOT)), title.replace("`", "")))
    assert cited, "no citation found: the pattern no longer matches how the code cites"
    missing = [(p, t) for p, t in cited if not any(h.startswith(t) for h in titles)]
    assert missing == []


def test_nothing_in_the_repository_cites_a_design_file_outside_it() -> None:
    """No source, test or document cites the old outside design file or its sections."""
    outside = re.compile("DESIGN" + r"(?:\.md| §)|/work/" + "shared")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _sources()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if outside.search(line)
    ]
    assert offenders == []
