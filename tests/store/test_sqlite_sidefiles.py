"""The identity check of the -wal and -shm before each write (``sidefiles.SideFiles``).

Real files in ``tmp_path``; what follows a detection (reopening, storing again) is proven by
tests/reliability/test_side_files.py with real processes. Each test's name states the
behaviour it proves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from durable_analytics._store.sqlite.sidefiles import CHECK_EVERY, SideFiles


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[Path, SideFiles]]:
    path = tmp_path / "queue.sqlite3"
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").write_bytes(b"x")
    fd = os.open(tmp_path, os.O_RDONLY)
    side = SideFiles(path, lambda: fd)
    side.record()
    try:
        yield path, side
    finally:
        os.close(fd)


def replace(path: Path) -> None:
    """Another file under the same name, as a new process would create (made before the old
    one goes, so that it cannot get the freed inode number)."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(b"y")
    os.replace(fresh, path)


def test_unchanged_side_files_are_reported_unchanged_on_every_write(
    files: tuple[Path, SideFiles],
) -> None:
    _, side = files
    assert all(side.changed() == "" for _ in range(3 * CHECK_EVERY))
    assert side.changed(both=True) == ""


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_changed_shm_is_reported_on_the_very_next_write(
    files: tuple[Path, SideFiles], how: str
) -> None:
    path, side = files
    shm = Path(f"{path}-shm")
    side.changed()
    if how == "deleted":
        shm.unlink()
    else:
        replace(shm)
    assert side.changed() == f"{path.name}-shm"


def test_a_replaced_wal_is_reported_within_check_every_writes_and_with_both(
    files: tuple[Path, SideFiles],
) -> None:
    path, side = files
    replace(Path(f"{path}-wal"))
    assert side.changed(both=True) == f"{path.name}-wal"
    seen = [side.changed() for _ in range(CHECK_EVERY)]
    assert f"{path.name}-wal" in seen


def test_both_replaced_are_named_together(files: tuple[Path, SideFiles]) -> None:
    path, side = files
    replace(Path(f"{path}-wal"))
    replace(Path(f"{path}-shm"))
    assert side.changed(both=True) == f"{path.name}-wal and {path.name}-shm"


def test_nothing_is_compared_before_the_files_are_recorded_or_after_forget(
    tmp_path: Path,
) -> None:
    path = tmp_path / "queue.sqlite3"
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        side = SideFiles(path, lambda: fd)
        assert side.changed() == ""  # nothing recorded yet
        Path(f"{path}-shm").write_bytes(b"x")
        side.record()
        side.forget()
        replace(Path(f"{path}-shm"))
        assert side.changed() == ""
    finally:
        os.close(fd)


def test_an_unreachable_directory_compares_nothing(files: tuple[Path, SideFiles]) -> None:
    path, side = files

    def no_directory() -> int:
        raise OSError("the directory cannot be opened")

    side._dir_fd = no_directory
    replace(Path(f"{path}-shm"))
    assert side.changed() == ""
    assert side.changed(both=True) == ""
