"""Tests of settings by value: Config.to_json/from_json and the library's child processes.

The flusher process and the detached exit drain are real child interpreters delivering to
a real Collector; their command lines are read from /proc, as any local user could.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import WRITE_KEY

from durable_analytics import Client
from durable_analytics import _flusher_process as flusher_process
from durable_analytics._client_processes import FlusherProcess, spawn_drain
from durable_analytics._config import Config
from durable_analytics.exceptions import ConfigError
from durable_analytics.testing import Collector, Reply

PROXY_SECRET = "proxy-pass-5eCr3t"


def every_setting(queue_path: Path, host: str = "https://example.test") -> Config:
    """A Config where every setting that travels differs from its default."""
    return Config.build(
        WRITE_KEY,
        host=host,
        queue_path=queue_path,
        flush_at=7,
        flush_interval=0.7,
        max_batch_bytes=200_000,
        max_message_bytes=16_000,
        durability="full",
        flusher="process",
        on_exit="spawn",
        shutdown_timeout=1.5,
        timeout=4.5,
        max_retries=5,
        lease_timeout=33.0,
        max_queue_bytes=12_345_678,
        overflow="drop_oldest",
        gzip=True,
        sync_mode=True,
        debug=True,
        proxies={"https": f"http://user:{PROXY_SECRET}@proxy.test:3128"},
        on_error=lambda exc, messages: None,
        log_handler=logging.NullHandler(),
    )


def local_only_cleared(config: Config) -> Config:
    return dataclasses.replace(config, on_error=None, log_handler=None)


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_a_config_survives_json_whole_except_in_process_objects(tmp_path: Path) -> None:
    config = every_setting(tmp_path / "q.sqlite3")
    again = Config.from_json(config.to_json())
    assert again == local_only_cleared(config)
    assert "on_error" not in json.loads(config.to_json())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"surprise": 1}, "unknown setting"),
        ({"queue_path": "relative.sqlite3"}, "absolute queue_path"),
        ({"write_key": ""}, "write key"),
        ({"flush_at": 0}, "flush_at"),
    ],
)
def test_from_json_refuses_settings_that_are_not_a_valid_config(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    values = json.loads(every_setting(tmp_path / "q.sqlite3").to_json())
    values.update(change)
    with pytest.raises(ConfigError, match=message):
        Config.from_json(json.dumps(values))


def test_queue_path_is_absolute_from_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = Config.build(WRITE_KEY, queue_path="rel/q.sqlite3")
    assert config.queue_path == tmp_path / "rel" / "q.sqlite3"


# What a child runs instead of the flusher loop: print the Config it received, exit.
_ECHO = textwrap.dedent(
    """
    import sys
    from durable_analytics import _flusher_process as fp
    fp.run_flusher = lambda config, parent: print(config.to_json(), parent, flush=True) or 0
    sys.exit(fp.main(sys.argv[1:]))
    """
)


def test_the_child_receives_exactly_the_parents_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = every_setting(tmp_path / "q.sqlite3")
    real_popen = subprocess.Popen
    children: list[subprocess.Popen[bytes]] = []

    def echoing_popen(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        # The real start(): pipe, pass_fds, settings written after the start. Only the
        # module run is swapped for one that reports what main() read from the pipe.
        assert args[1:3] == ["-m", "durable_analytics._flusher_process_main"]
        kwargs["stdout"] = subprocess.PIPE
        child = real_popen([args[0], "-c", _ECHO, *args[3:]], **kwargs)
        children.append(child)
        return child

    monkeypatch.setattr(subprocess, "Popen", echoing_popen)
    flusher_process.start("flusher", config)
    [child] = children
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    text, parent = out.decode().rsplit(" ", 1)
    assert int(parent) == os.getpid()
    assert Config.from_json(text) == local_only_cleared(config)


def test_the_child_reads_its_settings_while_another_copy_of_the_pipe_stays_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork elsewhere in the parent can inherit the pipe's write end: the child must not
    wait for an end of file that never comes."""
    config = every_setting(tmp_path / "q.sqlite3")
    real_popen, real_pipe = subprocess.Popen, os.pipe
    children: list[subprocess.Popen[bytes]] = []
    copies: list[int] = []

    def pipe_with_a_stray_copy() -> tuple[int, int]:
        read_end, write_end = real_pipe()
        if not copies:  # the settings pipe (subprocess makes its own pipes after it)
            copies.append(os.dup(write_end))  # as a forked process would hold it
        return read_end, write_end

    def echoing_popen(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs["stdout"] = subprocess.PIPE
        child = real_popen([args[0], "-c", _ECHO, *args[3:]], **kwargs)
        children.append(child)
        return child

    monkeypatch.setattr(os, "pipe", pipe_with_a_stray_copy)
    monkeypatch.setattr(subprocess, "Popen", echoing_popen)
    try:
        flusher_process.start("flusher", config)
        [child] = children
        out, _ = child.communicate(timeout=30)
    finally:
        for fd in copies:
            os.close(fd)
    assert child.returncode == 0
    assert Config.from_json(out.decode().rsplit(" ", 1)[0]) == local_only_cleared(config)


def test_no_secret_is_on_the_flusher_process_command_line(
    queue_path: Path, collector: Collector
) -> None:
    client = Client(
        WRITE_KEY,
        host=collector.url,
        queue_path=queue_path,
        flusher="process",
        on_exit="none",
        flush_interval=0.05,
        proxies={"all": f"http://user:{PROXY_SECRET}@127.0.0.1:9"},
        max_retries=0,
    )
    try:
        client.track(user_id="u", event="E")
        child = client._child
        assert child is not None
        # It tried to deliver (through the unreachable proxy): it runs its own code now.
        assert wait_until(lambda: client.stats().last_error is not None)
        line = cmdline(child.pid)
        assert "durable_analytics._flusher_process_main flusher --settings-fd" in line
        assert WRITE_KEY not in line
        assert PROXY_SECRET not in line
    finally:
        client.close(timeout=0)


def test_no_secret_is_on_the_exit_drain_command_line_and_it_delivers(
    queue_path: Path, collector: Collector
) -> None:
    client = Client(
        WRITE_KEY,
        host=collector.url,
        queue_path=queue_path,
        flusher="none",
        on_exit="none",
        proxies={"ftp": f"http://user:{PROXY_SECRET}@proxy.test:3128"},  # not used for http
    )
    client.track(user_id="u", event="E")
    collector.script(Reply(hang=True))  # hold the drain mid-request while we look at it
    drain = spawn_drain(client.config)
    try:
        assert collector.wait_for_requests(1)
        line = cmdline(drain.pid)
        assert "durable_analytics._flusher_process_main drain --settings-fd" in line
        assert WRITE_KEY not in line
        assert PROXY_SECRET not in line
    finally:
        drain.send_signal(signal.SIGKILL)
        drain.wait(10)
    # A second drain (the lease of the killed one is reclaimed) delivers the message.
    again = spawn_drain(client.config)
    assert again.wait(30) == 0
    assert collector.wait_for_messages(1)
    assert client.stats().pending == 0
    client.close(timeout=0)


def test_a_relative_queue_path_is_still_the_one_delivered_after_chdir(
    tmp_path: Path, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "app"
    elsewhere = tmp_path / "elsewhere"
    home.mkdir(mode=0o700)
    elsewhere.mkdir(mode=0o700)
    monkeypatch.chdir(home)
    client = Client(
        WRITE_KEY,
        host=collector.url,
        queue_path="q.sqlite3",
        flusher="process",
        on_exit="none",
        flush_interval=0.05,
    )
    os.chdir(elsewhere)  # the child process starts here, on the first call
    try:
        _, message = client.track(user_id="u", event="E")
        assert collector.wait_for_messages(1)
        assert collector.message_ids() == {message["messageId"]: 1}
        assert wait_until(lambda: client.stats().pending == 0)
    finally:
        client.close(timeout=0)
    assert not (elsewhere / "q.sqlite3").exists()
    assert (home / "q.sqlite3").exists()


def test_the_entry_point_starts_without_a_warning_and_refuses_a_bad_command_line() -> None:
    """The children's command (``python -m``) runs under ``-W error``: runpy does not warn
    (it did when the module run was one the package had already imported)."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", flusher_process._MODULE, "--queue", "x"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "usage" in result.stderr
    assert "Warning" not in result.stderr


def test_close_gives_the_flusher_process_only_what_is_left_of_its_timeout(
    queue_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close(timeout)`` stops the flusher process within what is left of ``timeout``: it
    gave the child at least half a second more (``close(timeout=1)`` took 1.5 s with the
    child's request held by a server that hangs). With nothing left, the child is stopped
    at once (killed if it has not exited), and its leases pass on as a dead holder's do."""
    given: list[float] = []
    real_stop = FlusherProcess.stop

    def spy(self: FlusherProcess, timeout: float) -> None:
        given.append(timeout)
        real_stop(self, timeout)

    monkeypatch.setattr(FlusherProcess, "stop", spy)
    with Collector(WRITE_KEY, delay=60) as collector:
        client = Client(
            WRITE_KEY,
            host=collector.url,
            queue_path=queue_path,
            flusher="process",
            on_exit="none",
        )
        assert client.track("u", "Held")[0]
        child = client._child
        assert child is not None
        client.close(timeout=0)
        assert given == [0.0]
        assert child.wait(30) is not None  # stopped (terminated or killed), not left running
