"""A private, throwaway PostgreSQL cluster for the tests that need a real server.

The cluster lives in a fresh temporary directory, listens on a Unix socket only (no TCP
port, so it cannot clash with anything), runs with fsync off (the tests prove protocol
behaviour, not the disk), and is removed when the test session ends. ``initdb`` refuses
to run as root, so as root every server command runs through ``runuser -u postgres``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

PORT = 5432
USER = "postgres"
_SETTINGS = {
    "listen_addresses": "''",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}


class ServerUnavailable(Exception):
    """No PostgreSQL server could be started here (the message says why)."""


def find_bindir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``."""
    override = os.environ.get("DA_TEST_PG_BINDIR")
    candidates: list[str] = []
    if override is not None:
        candidates.append(override)  # only there (the fixture's own tests point it nowhere)
    pg_config = shutil.which("pg_config")
    if pg_config and override is None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(out.stdout.strip())
    initdb = shutil.which("initdb")
    if initdb and override is None:
        candidates.append(str(Path(initdb).resolve().parent))
    if override is None:
        candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for directory in candidates:
        if directory and all(
            os.access(Path(directory, name), os.X_OK) for name in ("initdb", "pg_ctl", "postgres")
        ):
            return Path(directory)
    raise ServerUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl) found: install the 'postgresql' package"
    )


class Cluster:
    """One private PostgreSQL cluster: ``start()``, use ``dsn``, ``stop()``."""

    def __init__(self, **settings: str) -> None:
        """``settings``: server settings over the test defaults (``fsync="on"`` to measure)."""
        self.settings = {**_SETTINGS, **settings}
        self.bindir = find_bindir()
        self.as_root = os.geteuid() == 0
        # Short, under /tmp: a Unix socket path must fit in about 100 bytes.
        self.base = Path(tempfile.mkdtemp(prefix="da-pg-", dir="/tmp"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.dsn = f"postgresql://{USER}@/postgres?host={self.base}&port={PORT}"
        self.started = False

    def _run(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if self.as_root:
            cmd = ["runuser", "-u", USER, "--", *cmd]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.base
        )

    def start(self) -> None:
        """initdb and start the server; raises ServerUnavailable with the reason."""
        if self.as_root:
            try:
                shutil.chown(self.base, user=USER, group=None)
            except (LookupError, OSError) as exc:
                raise ServerUnavailable(f"cannot hand {self.base} to user {USER}: {exc}") from None
        try:
            init = self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                USER,
                "--no-sync",
                "-E",
                "UTF8",
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ServerUnavailable(f"initdb could not run: {exc}") from None
        if init.returncode:
            raise ServerUnavailable(f"initdb failed: {init.stderr.strip()[-500:]}")
        options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        start = self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-k {self.base} -p {PORT} {options}",
            "start",
        )
        if start.returncode:
            log = self.log.read_text(errors="replace")[-800:] if self.log.exists() else ""
            raise ServerUnavailable(f"pg_ctl start failed: {start.stderr.strip()} {log}")
        self.started = True

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete the cluster."""
        if self.started:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                    timeout=30,
                )
            self.started = False
        shutil.rmtree(self.base, ignore_errors=True)


def unique_schema() -> str:
    """A fresh schema name, so that each test has its own queue tables."""
    return f"t_{uuid.uuid4().hex[:12]}"
