"""Run a framework's real server in a child process, drive it over HTTP, and stop it."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.conftest import child_env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait until ``port`` accepts connections; fail with the server's output if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {output(proc)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"the server did not listen on {port} within {timeout}s")


def output(proc: subprocess.Popen[bytes]) -> str:
    """What the (exited) server wrote to its log file."""
    log = getattr(proc, "log_path", None)
    return Path(log).read_text(errors="replace")[-4000:] if log else ""


@contextlib.contextmanager
def server(
    argv: Sequence[str], cwd: Path, env: dict[str, str], port: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``python -m argv…`` in ``cwd`` (its own process group); SIGKILL it all at the end."""
    log_path = cwd / "server.log"
    full_env = {**child_env(), **env}
    full_env["PYTHONPATH"] = str(cwd) + os.pathsep + full_env["PYTHONPATH"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv],
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.log_path = str(log_path)  # type: ignore[attr-defined]
    try:
        if port is not None:
            wait_for_port(port, proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Send ``sig`` to the server (its main process) and wait for it to exit."""
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server did not exit within {timeout}s: {output(proc)}") from None


def get(port: int, paths: Sequence[str], connections: int = 1) -> list[int]:
    """GET each path (spread over ``connections`` kept-alive connections); the statuses."""
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(connections)]
    statuses = []
    try:
        for i, path in enumerate(paths):
            conn = conns[i % connections]
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        for conn in conns:
            conn.close()
    return statuses
