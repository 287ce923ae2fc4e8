"""The package's imports go one way: a lower layer never imports a higher one.

The layers are written down in docs/ARCHITECTURE.md ("Modules and the direction of
imports"); this test reads every module's imports with ``ast`` and fails on an upward one,
so a new import that would tie the layers into a knot is caught in review, not in a cycle
at import time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "durable_analytics"

# Lowest first. A module may import from its own layer and from any layer below it.
LAYERS: list[set[str]] = [
    {"exceptions", "_version", "_calls", "_oauth", "_token_endpoint", "_bounded_call"},
    {"_config", "_urls", "_messages", "_message_fields", "_message_json"},
    {"_store"},
    {"_transport"},
    {"_metrics", "_delivery_log", "_reports"},  # counters, log lines, on_error reports
    {"_pipeline", "_quick_retry"},  # _quick_retry: one request and its quick retries
    {"_delivery"},
    {"_pass"},  # the delivery pass (pipeline) every delivery path runs
    {"_flusher", "_drain", "_sync", "_override"},
    {"_flusher_process", "_flusher_process_main"},
    {"_client", "_client_calls", "_client_settings", "_client_processes"},
    {"_default"},
    {"__init__", "testing", "_recording", "_collector_http"},
    {"pytest_plugin", "cli"},
    {"contrib"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: its first component under the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every durable_analytics import in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None:
                # ``from . import x`` names submodules: each is an import of its own.
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, name) for line, name in found if name.split(".")[0] == "durable_analytics"]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_of_the_package_has_a_layer() -> None:
    """A new top-level module must be placed in LAYERS (and in docs/ARCHITECTURE.md)."""
    units = {_unit(_module_name(path)) for path in MODULES}
    assert units - RANK.keys() == set()


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    """Each import of the package's own modules points to the same layer or a lower one."""
    here = _unit(_module_name(path))
    upward = [
        f"line {line}: {target}"
        for line, target in _imports(path)
        if RANK.get(_unit(target), -1) > RANK[here]
    ]
    assert upward == []


def test_storage_and_http_internals_stay_behind_their_seams() -> None:
    """Only ``_store`` reaches a backend's modules and only ``_transport`` the HTTP module.

    Everything else goes through ``open_queue``/``QueueBackend`` and
    ``open_transport``/``Transport``, so a new backend or transport changes no caller. The
    CLI may name the SQLite queue for its file-level commands (recovery, integrity).
    """
    private = {
        "durable_analytics._store.memory": {"_store"},
        "durable_analytics._store.postgres": {"_store"},
        "durable_analytics._store.sqlite": {"_store", "cli"},
        "durable_analytics._transport.http": {"_transport"},
    }
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        for path in MODULES
        for line, target in _imports(path)
        for inner, allowed in private.items()
        if (target == inner or target.startswith(inner + "."))
        and _unit(_module_name(path)) not in allowed
    ]
    assert offenders == []


def test_the_library_never_reaches_the_cli() -> None:
    """No module below the CLI names ``durable_analytics.cli``, not even in a string.

    The library once reached the CLI through a subprocess (``python -m
    durable_analytics.cli drain``); the CLI calls the library, never the reverse.
    """
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for path in MODULES
        if RANK[_unit(_module_name(path))] < RANK["cli"]
        # a whole name: the logger "durable_analytics.client" is not the CLI
        and re.search(r"durable_analytics\.cli\b", path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
