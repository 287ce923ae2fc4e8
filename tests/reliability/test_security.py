"""Security (issue 5, row 8): the write key, file modes, unsafe paths, SQL, log lines, TLS.

Already proven elsewhere and only extended here:

- canary key in the Client's logs, exceptions, reprs and request bodies, and in a child
  process's stderr: tests/test_client.py (``test_a_canary_write_key_never_leaks*``). Here: the
  CLI (every command's stdout and stderr, ``-vv``), dead letters, the child processes' argv.
- 0600 / 0700 whatever the umask, symlinks, world-writable directories, at the ``Queue``
  level: tests/store/. Here: through ``Client`` and the CLI, and the drain lock file.
"""

from __future__ import annotations

import ast
import atexit
import base64
import contextlib
import importlib
import inspect
import json
import logging
import os
import pkgutil
import re
import shlex
import socket
import sqlite3
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from _rawserver import make_certificate
from click.testing import CliRunner, Result
from conftest import WRITE_KEY

from durable_analytics import Client, ConfigError, QueuePermissionError
from durable_analytics._client_processes import spawn_drain
from durable_analytics._config import Config
from durable_analytics._store import sqlite as sqlite_package
from durable_analytics._store.sqlite import SqliteQueue as Queue
from durable_analytics._store.sqlite import connections as connections_module
from durable_analytics._store.sqlite import schema as schema_module
from durable_analytics.cli import cli
from durable_analytics.testing import Collector, Reply

CANARY = "canary-SECRET-write-key-7f3a9c"
# The Authorization header's token: the key in another spelling, just as secret.
CANARY_TOKEN = base64.b64encode(f"{CANARY}:".encode()).decode()
ENV_NAMES = ("DURABLE_ANALYTICS_QUEUE", "DURABLE_ANALYTICS_WRITE_KEY", "DURABLE_ANALYTICS_HOST")


@pytest.fixture(autouse=True)
def _library_logger_restored() -> Iterator[None]:
    """The CLI installs its own handler (and stops propagation): undo it for later tests."""
    logger = logging.getLogger("durable_analytics")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def backoff_over(queue_path: Path) -> None:
    """Make a retry backoff due now (destination and messages), instead of waiting it out."""
    conn = sqlite3.connect(queue_path, timeout=30)
    try:
        with conn:
            conn.execute("UPDATE destinations SET not_before = 0")
            conn.execute("UPDATE messages SET not_before = NULL")
    finally:
        conn.close()


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env=dict.fromkeys(ENV_NAMES))


def invoke(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(cli, list(args), catch_exceptions=False)


class Records(logging.Handler):
    """Every record of the library's logger, at DEBUG."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def texts(self) -> list[str]:
        return [self.format(r) for r in self.records]


@pytest.fixture
def records() -> Iterator[Records]:
    logger = logging.getLogger("durable_analytics")
    handler = Records()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


# --------------------------------------------------------------------------- the canary key


def test_a_canary_write_key_never_leaks_through_the_cli(
    runner: CliRunner, queue_path: Path
) -> None:
    """Every CLI command, at -vv, with a server that echoes the key in its error bodies."""
    outputs: list[str] = []

    def run(*args: str) -> Result:
        result = invoke(runner, *args)
        outputs.extend([result.stdout, result.stderr])
        return result

    q = ["--queue", str(queue_path)]
    with Collector(CANARY) as server:
        ids = []
        for i in range(6):
            result = run(
                "track",
                "-vv",
                *q,
                "--write-key",
                CANARY,
                "--host",
                server.url,
                "--user-id",
                f"u{i}",
                "--event",
                "E",
            )
            assert result.exit_code == 0, result.output
            ids.append(result.stdout.strip())
        run("identify", "-vv", *q, "--write-key", CANARY, "--host", server.url, "--user-id", "u")

        # A 503 whose body repeats the key: drain fails, status shows the last error.
        server.script(Reply(503, body=f'{{"message":"overloaded for {CANARY}"}}'))
        assert run("drain", "-vv", *q, "--max-retries", "0").exit_code == 1
        assert run("status", "-vv", *q).exit_code == 0
        assert run("status", "--json", *q).exit_code == 0
        # One message rejected (dead-lettered), the rest delivered.
        backoff_over(queue_path)
        server.reject_message_ids(ids[0], status=400)
        assert run("drain", "-vv", "--json", *q).exit_code == 0
        # A 400 whose body repeats the key: a dead letter whose excerpt must not hold it.
        server.set_default(Reply(400, body=f'{{"message":"bad payload for {CANARY}"}}'))
        run(
            "track",
            *q,
            "--write-key",
            CANARY,
            "--host",
            server.url,
            "--user-id",
            "u",
            "--event",
            "X",
        )
        assert run("drain", "-vv", *q).exit_code == 0
        # A 401 whose body repeats the key; then the key given to drain on its command line.
        server.set_default(Reply(401, body=f'{{"message":"bad key {CANARY}"}}'))
        run(
            "track",
            *q,
            "--write-key",
            CANARY,
            "--host",
            server.url,
            "--user-id",
            "u",
            "--event",
            "Y",
        )
        assert run("drain", "-vv", *q, "--max-retries", "0").exit_code == 1
        backoff_over(queue_path)
        assert run("drain", "-vv", *q, "--write-key", CANARY, "--host", server.url).exit_code == 1
        assert run("status", *q).exit_code == 0
        assert run("dead-letters", "list", *q).exit_code == 0
        listed = json.loads(run("dead-letters", "list", "--json", *q).stdout)
        assert len(listed) == 2
        assert listed[0]["message_id"] == ids[0]
        assert "<write key>" in listed[1]["excerpt"]  # the echoed key, scrubbed
        assert run("dead-letters", "requeue", "--json", *q).exit_code == 0
        # Bad input next to the key: the errors must not repeat it.
        run(
            "track",
            *q,
            "--write-key",
            CANARY,
            "--host",
            "ftp://nowhere",
            "--user-id",
            "u",
            "--event",
            "E",
        )
        run(
            "track",
            *q,
            "--write-key",
            CANARY + "\n",
            "--host",
            server.url,
            "--user-id",
            "u",
            "--event",
            "E",
        )
        bodies = [b.raw_body for b in server.batches]
        headers = [dict(b.headers) for b in server.batches]

    assert server.batches
    assert all(b.authorized for b in server.batches)
    for text in outputs:
        assert CANARY not in text, text
        assert CANARY_TOKEN not in text, text
    for body in bodies:
        assert CANARY.encode() not in body
    for header in headers:  # only in Authorization, where it belongs
        assert [k for k, v in header.items() if CANARY_TOKEN in v or CANARY in v] == [
            "authorization"
        ]


def test_the_key_is_never_on_a_child_process_command_line(
    queue_path: Path, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """argv is world-readable (/proc/<pid>/cmdline): the flusher process and the detached
    drain must find the key in the queue file, never on their command line."""
    started: list[list[str]] = []

    class FakePopen:
        """A child that runs until terminated, and only records its command line."""

        pid = 0

        def __init__(self, args: list[str], **kwargs: Any) -> None:
            started.append([str(a) for a in args])
            self.args = args
            self.returncode: int | None = None
            self._ended = threading.Event()

        def poll(self) -> int | None:
            return self.returncode

        def wait(self, timeout: float | None = None) -> int:
            if not self._ended.wait(timeout):
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            return self.returncode or 0

        def terminate(self) -> None:
            self.returncode = -15
            self._ended.set()

        kill = terminate

    monkeypatch.setattr(subprocess, "Popen", FakePopen)  # as _client calls it
    process = Client(CANARY, host=collector.url, queue_path=queue_path, flusher="process")
    process.track("u", "E")
    spawn = Client(
        CANARY, host=collector.url, queue_path=queue_path, flusher="none", on_exit="spawn"
    )
    spawn.track("u", "E")
    spawn._at_exit()
    atexit.unregister(spawn._at_exit)
    process.close(timeout=0)
    assert len(started) == 2, started
    for argv in started:
        assert not any(CANARY in a or CANARY_TOKEN in a for a in argv), argv


PROXY_PASSWORD = "pr0xy-PASSWORD-4e1d"


def running_cmdline(child: subprocess.Popen[bytes]) -> list[str]:
    """The command line the kernel shows every local user for ``child``, once it is running
    our module (right after fork it still shows the parent's)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            raw = Path(f"/proc/{child.pid}/cmdline").read_bytes()
        except FileNotFoundError:
            break
        if b"_flusher_process" in raw:
            return raw.decode().split("\0")
        time.sleep(0.005)
    raise AssertionError(f"never saw {child.pid} running the flusher module")


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_no_secret_on_the_real_command_line_of_the_flusher_process_or_the_exit_drain(
    queue_path: Path,
) -> None:
    """/proc/<pid>/cmdline of the real children (not a stand-in Popen): neither the write key,
    its Basic token, nor a proxy password; the settings arrive over a pipe. The message
    tracked is delivered by the flusher process (the proxy is for https only)."""
    with Collector(CANARY) as collector:
        proxies = {"https": f"http://analytics:{PROXY_PASSWORD}@127.0.0.1:9"}
        client = Client(
            CANARY, host=collector.url, queue_path=queue_path, flusher="process", proxies=proxies
        )
        try:
            client.track("u", "E")
            assert client._child is not None
            argvs = [running_cmdline(client._child)]
            assert collector.wait_for_messages(1, timeout=30)
        finally:
            client.close(timeout=5)
        config = Config.build(
            CANARY, host=collector.url, queue_path=queue_path, proxies=proxies, flusher="none"
        )
        drain = spawn_drain(config)
        try:
            argvs.append(running_cmdline(drain))
        finally:
            drain.wait(30)
        for argv in argvs:
            assert "--settings-fd" in argv, argv
            text = " ".join(argv)
            for secret in (CANARY, CANARY_TOKEN, PROXY_PASSWORD):
                assert secret not in text, argv
        assert len(collector.messages()) == 1


def test_an_echoed_authorization_header_is_scrubbed_too(queue_path: Path, records: Records) -> None:
    with Collector(CANARY) as server:
        echo = f"bad request; headers were: Authorization: Basic {CANARY_TOKEN}"
        server.script(Reply(503, body=echo), Reply(400, body=echo))
        client = Client(
            CANARY,
            host=server.url,
            queue_path=queue_path,
            flusher="none",
            on_exit="none",
            max_retries=0,
            flush_at=1,
        )
        client.track("u", "E")
        client.flush()
        backoff_over(queue_path)
        client.flush(timeout=2)
        texts = [
            json.dumps(client.stats().as_dict()),
            json.dumps([d.as_dict() for d in client.queue.dead_letters()]),
            *records.texts(),
        ]
        client.close(timeout=0)
    assert client.queue.dead_letters()  # the 400 was dead-lettered with its excerpt
    for text in texts:
        assert CANARY_TOKEN not in text, text


# A key whose Basic token holds "/" and "=": its URL-encoded spellings differ from the plain.
ODD_KEY = "canary/SECRET+key?0"


def spellings(key: str) -> dict[str, str]:
    """Every form in which a server might echo ``key`` back."""
    token = base64.b64encode(f"{key}:".encode()).decode()
    forms = {
        "raw": key,
        "basic token": token,
        "unpadded token": token.rstrip("="),
        "url-safe token": token.replace("/", "_").replace("+", "-"),
        "url-encoded key": quote(key, safe=""),
        "form-encoded key": quote_plus(key, safe=""),
        "url-encoded token": quote(token, safe=""),
    }
    forms["lower-case escapes"] = re.sub(
        r"%[0-9A-F]{2}", lambda m: m.group().lower(), forms["url-encoded token"]
    )
    return forms


def fragments(key: str, text: str) -> list[str]:
    """The 8-character pieces of any spelling of ``key`` that ``text`` holds."""
    return sorted(
        {
            form[i : i + 8]
            for form in spellings(key).values()
            for i in range(len(form) - 7)
            if form[i : i + 8] in text
        }
    )


@pytest.mark.parametrize("offset", [0, 1990], ids=["at-start", "across-the-cut"])
@pytest.mark.parametrize("form", sorted(spellings(ODD_KEY)))
def test_a_400_echoing_the_key_in_any_spelling_leaves_none_of_it_in_dead_letters_or_logs(
    queue_path: Path, records: Records, form: str, offset: int
) -> None:
    """The excerpt is scrubbed first and cut after: with the cut first, an echo that starts
    just before the 2,000th character kept its first characters. One message: one dead
    letter, nothing pending, and no 8 characters of any spelling of the key anywhere."""
    echo = "x" * offset + spellings(ODD_KEY)[form] + " was refused" + "y" * 100
    with Collector(ODD_KEY) as server:
        server.script(Reply(400, body=echo))
        client = Client(
            ODD_KEY,
            host=server.url,
            queue_path=queue_path,
            flusher="none",
            on_exit="none",
            max_retries=0,
        )
        client.track("u", "E")
        result = client.flush(timeout=5)
        dead = client.queue.dead_letters()
        texts = [
            json.dumps(client.stats().as_dict()),
            json.dumps([d.as_dict() for d in dead]),
            *records.texts(),
        ]
        client.close(timeout=0)
    assert (result.sent, result.dead_lettered, result.pending) == (0, 1, 0)
    assert len(dead) == 1
    assert dead[0].excerpt.startswith("x" * min(offset, 10))
    assert "<write k" in dead[0].excerpt  # scrubbed, then cut
    for text in texts:
        assert fragments(ODD_KEY, text) == [], text


# --------------------------------------------------------------------------- file modes


def modes(*paths: Path) -> dict[str, str]:
    return {p.name: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in paths if p.exists()}


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o000, 0o002, 0o022, 0o077], ids=oct)
def test_client_and_cli_create_0600_files_in_0700_directories_whatever_the_umask(
    tmp_path: Path, runner: CliRunner, collector: Collector, mask: int
) -> None:
    api_path = tmp_path / "api" / "deep" / "queue.sqlite3"
    cli_path = tmp_path / "cli" / "deep" / "queue.sqlite3"
    with umask(mask):
        client = Client(WRITE_KEY, host=collector.url, queue_path=api_path, flusher="none")
        client.track("u", "E")
        client.flush(timeout=5)
        client.track("u", "E")  # the -wal and -shm exist and hold data
        result = invoke(
            runner,
            "track",
            "--queue",
            str(cli_path),
            "--write-key",
            WRITE_KEY,
            "--host",
            collector.url,
            "--user-id",
            "u",
            "--event",
            "E",
        )
        assert result.exit_code == 0, result.output
        drained = invoke(runner, "drain", "--queue", str(cli_path), "--once-lock")
        assert drained.exit_code == 0, drained.output
        client.close(timeout=0)
    for path in (api_path, cli_path):
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        files += [path.with_name(path.name + ".drain.lock")]
        found = modes(*files)
        assert path.name in found
        assert set(found.values()) == {"0o600"}, found
        assert modes(path.parent, path.parent.parent) == {
            path.parent.name: "0o700",
            path.parent.parent.name: "0o700",
        }
    assert modes(cli_path.with_name(cli_path.name + ".drain.lock"))  # the lock was made


# --------------------------------------------------------------------------- unsafe paths


def test_a_symlinked_queue_path_is_refused_by_the_client_and_every_cli_command(
    queue_path: Path, runner: CliRunner, collector: Collector
) -> None:
    target = queue_path.parent / "elsewhere.sqlite3"
    queue_path.symlink_to(target)  # dangling: nothing may be created through it
    with pytest.raises(QueuePermissionError, match="symlink"):
        Client(WRITE_KEY, host=collector.url, queue_path=queue_path)
    q = ["--queue", str(queue_path)]
    for args in (
        ["track", *q, "--write-key", WRITE_KEY, "--user-id", "u", "--event", "E"],
        ["status", *q],
        ["drain", *q],
        ["dead-letters", "list", *q],
    ):
        result = invoke(runner, *args)
        assert result.exit_code == 3, (args, result.output)
        assert "symlink" in result.stderr, result.stderr
        assert "Traceback" not in result.output
    assert not target.exists()
    Queue(target).close()  # now it exists: still refused through the link
    with pytest.raises(QueuePermissionError, match="symlink"):
        Client(WRITE_KEY, host=collector.url, queue_path=queue_path)


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o703], ids=oct)
def test_a_directory_writable_by_others_is_refused_by_the_client_and_the_cli(
    tmp_path: Path, runner: CliRunner, collector: Collector, mode: int
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    path = shared / "queue.sqlite3"
    with pytest.raises(QueuePermissionError, match="writable by other users"):
        Client(WRITE_KEY, host=collector.url, queue_path=path)
    result = invoke(
        runner,
        "track",
        "--queue",
        str(path),
        "--write-key",
        WRITE_KEY,
        "--user-id",
        "u",
        "--event",
        "E",
    )
    assert result.exit_code == 3, result.output
    assert "writable by other users" in result.stderr
    assert list(shared.iterdir()) == []  # nothing created
    # The advice is a private directory, never narrowing the shared one; only a directory
    # of this user's that is not sticky (widened by mistake) also gets a chmod.
    where = shlex.quote(str(shared))
    assert f"mkdir -m 700 {shlex.quote(str(shared / 'myapp'))}" in result.stderr
    assert f"chmod 700 {where}" not in result.stderr
    if mode & stat.S_ISVTX:
        assert "chmod" not in result.stderr
    else:
        assert f"chmod o-w {where}" in result.stderr


def test_a_queue_in_tmp_is_refused_with_advice_to_make_a_private_directory_not_chmod_tmp(
    runner: CliRunner,
) -> None:
    """The user's first try, ``queue_path='/tmp/q.sqlite3'``: never told to chmod /tmp."""
    tmp = Path("/tmp")
    if not tmp.stat().st_mode & stat.S_IWOTH:
        pytest.skip("/tmp is not world-writable here")
    path = tmp / f"durable-analytics-test-{os.getpid()}-{time.monotonic_ns()}.sqlite3"
    with pytest.raises(QueuePermissionError) as info:
        Client(WRITE_KEY, queue_path=path, flusher="none", on_exit="none")
    result = invoke(
        runner, "track", "--queue", str(path), "--write-key", WRITE_KEY, "--user-id", "u",
        "--event", "E",
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    for text in (str(info.value), result.stderr):
        assert "writable by other users" in text
        assert "mkdir -m 700 /tmp/myapp" in text
        assert "chmod" not in text
    assert not path.exists()


@pytest.mark.parametrize("mode", [0o1777, 0o700], ids=oct)
def test_a_queue_path_that_is_a_directory_says_so_whatever_its_parent(
    tmp_path: Path, runner: CliRunner, mode: int
) -> None:
    """That the path is a directory is the error, also in a shared parent like /tmp."""
    parent = tmp_path / "parent"
    parent.mkdir()
    os.chmod(parent, mode)
    path = parent / "somedir"
    path.mkdir(mode=0o700)
    with pytest.raises(QueuePermissionError, match="is a directory, not a regular file"):
        Client(WRITE_KEY, queue_path=path, flusher="none", on_exit="none")
    for args in (["status"], ["drain"], ["dead-letters", "list"]):
        result = invoke(runner, *args, "--queue", str(path))
        assert result.exit_code == 3, (args, result.output)
        assert "is a directory, not a regular file" in result.stderr
        assert "writable by other users" not in result.stderr
    assert list(path.iterdir()) == []


def test_what_is_not_refused_a_group_writable_or_symlinked_parent_directory(
    tmp_path: Path, collector: Collector
) -> None:
    """Documented behaviour, not a promise: only world-writable directories and a symlink as
    the file itself are refused. A symlinked parent (/var/run → /run) is followed."""
    group = tmp_path / "group"
    group.mkdir()
    os.chmod(group, 0o770)
    Client(WRITE_KEY, host=collector.url, queue_path=group / "q.sqlite3").queue.close()
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    Client(WRITE_KEY, host=collector.url, queue_path=tmp_path / "link" / "q.sqlite3").queue.close()
    assert (real / "q.sqlite3").exists()


# --------------------------------------------------------------------------- SQL

HOSTILE = [
    "'); DROP TABLE messages; --",
    '"); DELETE FROM destinations; --',
    "x' OR '1'='1",
    "1; PRAGMA user_version=99; --",
    "?', ?, ?); --",
    "Robert'); DROP TABLE leases;--\x00\n",
]


def test_hostile_strings_are_stored_and_delivered_verbatim_and_never_reach_sql_text(
    queue_path: Path, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements: list[str] = []
    real_execute = connections_module.Connection.execute

    def recording(self: Any, sql: str, *args: Any) -> Any:
        statements.append(sql)
        return real_execute(self, sql, *args)

    monkeypatch.setattr(connections_module.Connection, "execute", recording)
    hostile_key = "k'); DROP TABLE destinations; --"
    with Collector(hostile_key) as server:
        client = Client(
            hostile_key,
            host=server.url,
            queue_path=queue_path,
            flusher="none",
            on_exit="none",
            max_retries=0,
        )
        sent = []
        for text in HOSTILE:
            ok, message = client.track(text, text, {text: text}, message_id=text + "-id")
            assert ok
            sent.append(message)
        server.reject_message_ids(HOSTILE[0] + "-id", status=400)
        server.script(Reply(503, body="'); DROP TABLE dead_letters; --"))
        client.flush()  # a 503 first: its excerpt goes to last_error
        backoff_over(queue_path)
        result = client.flush(timeout=10)
        assert result.pending == 0, result
        [dead] = client.queue.dead_letters()
        assert dead.message_id == HOSTILE[0] + "-id"
        assert client.queue.requeue_dead_letters() == 1
        assert client.queue.purge_dead_letters() == 0
        stats = client.stats()
        received = {m["messageId"]: m for m in server.messages()}
        client.close(timeout=0)

    for message in sent[1:]:
        got = received[message["messageId"]]
        assert got["event"] == got["userId"] == message["event"]
        assert got["properties"] == message["properties"]
    assert stats.destinations[0].write_key == "k');"[:4] + "…"
    conn = Queue(queue_path)._conn()
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"messages", "destinations", "leases", "dead_letters", "counters"} <= tables
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema_module.SCHEMA_VERSION
    assert conn.execute("SELECT write_key FROM destinations").fetchall() == [(hostile_key,)]
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # Every value went in as a parameter: no hostile text is part of any statement.
    assert len(statements) > 20
    fragments = [*HOSTILE, hostile_key, "DROP TABLE", "OR '1'='1"]
    for sql in statements:
        for fragment in fragments:
            assert fragment not in sql, sql


def test_hostile_strings_through_the_cli_are_stored_verbatim(
    runner: CliRunner, queue_path: Path
) -> None:
    key = "k'); DROP TABLE destinations; --"
    for text in HOSTILE:
        clean = text.replace("\x00", "")  # argv cannot hold NUL
        result = invoke(
            runner,
            "track",
            "--queue",
            str(queue_path),
            "--write-key",
            key,
            "--host",
            "https://collector.invalid",
            "--user-id",
            clean,
            "--event",
            clean,
            "--properties",
            json.dumps({clean: clean}),
            "--message-id",
            clean + "-id",
        )
        assert result.exit_code == 0, result.output
    status = json.loads(invoke(runner, "status", "--json", "--queue", str(queue_path)).stdout)
    assert status["pending"] == len(HOSTILE)
    assert status["destinations"][0]["write_key"] == "k');"[:4] + "…"
    queue = Queue(queue_path)
    stored = [json.loads(b) for b in queue.bodies()]
    assert [m["event"] for m in stored] == [t.replace("\x00", "") for t in HOSTILE]
    assert all(m["properties"] == {m["event"]: m["event"]} for m in stored)
    assert queue.integrity_check() == "ok"
    queue.close()


# SQL text is built with f-strings in _store/sqlite/. What may be interpolated: "?" placeholders,
# constants (literals, module constants, parameters every caller passes a constant for), and
# numbers: names and attributes annotated int or float (mypy --strict, run in CI, holds every
# assignment to that), and arithmetic with an int literal. A number cannot carry SQL, and
# PRAGMA values cannot be "?" parameters. Anything else that is safe goes here, by hand:
_CHECKED_BY_HAND: set[str] = set()
_PLACEHOLDERS = re.compile(r"','\.join\('\?' \* len\([\w.]+\)\)")
_SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|PRAGMA|WHERE|VALUES|FROM|IN)\b")


class _SqlTaint:
    """Decides whether an expression interpolated into SQL can only hold placeholders or
    constants, following names to their assignments and parameters to their call sites."""

    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
        self.functions: dict[str, list[ast.FunctionDef]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                self.functions.setdefault(node.name, []).append(node)
        self.module_values: dict[str, list[ast.expr]] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        self.module_values.setdefault(t.id, []).append(node.value)
            elif (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and node.value is not None
            ):
                self.module_values.setdefault(node.target.id, []).append(node.value)
        self._seen: set[tuple[int, str]] = set()
        # Fields declared ``name: int`` (or float) in a class body.
        self.numeric_attrs = {
            node.target.id
            for cls in ast.walk(tree)
            if isinstance(cls, ast.ClassDef)
            for node in cls.body
            if isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(node.annotation, ast.Name)
            and node.annotation.id in ("int", "float")
        }

    def function_of(self, node: ast.AST) -> ast.FunctionDef | None:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, ast.FunctionDef):
                return node
        return None

    def safe(self, expr: ast.expr, where: ast.AST) -> bool:
        snippet = ast.unparse(expr)
        if snippet in _CHECKED_BY_HAND or _PLACEHOLDERS.fullmatch(snippet.replace('"', "'")):
            return True
        if isinstance(expr, ast.Constant):
            return isinstance(expr.value, (str, int)) and not isinstance(expr.value, bool)
        if isinstance(expr, ast.JoinedStr):
            return all(
                self.safe(v.value, where) for v in expr.values if isinstance(v, ast.FormattedValue)
            )
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return self.safe(expr.left, where) and self.safe(expr.right, where)
        if isinstance(expr, ast.IfExp):
            return self.safe(expr.body, where) and self.safe(expr.orelse, where)
        if isinstance(expr, ast.BoolOp):
            return all(self.safe(v, where) for v in expr.values)
        if isinstance(expr, ast.BinOp):  # x & 0x7FFFFFFF: a number, whatever x was
            return any(
                isinstance(side, ast.Constant) and type(side.value) is int
                for side in (expr.left, expr.right)
            )
        if isinstance(expr, ast.Attribute):
            return expr.attr in self.numeric_attrs or self.safe_attribute(expr.attr)
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name):
            return expr.func.id in ("int", "len")
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
            # str methods of safe text (_MIGRATIONS[v].split(";")) stay safe text
            return expr.func.attr in ("split", "strip") and self.safe(expr.func.value, where)
        if isinstance(expr, ast.Subscript):
            return self.safe(expr.value, where)  # an item of a container of safe text
        if isinstance(expr, ast.Dict):
            return all(v is not None and self.safe(v, where) for v in expr.values)
        if isinstance(expr, (ast.List, ast.Tuple)):
            return all(self.safe(e, where) for e in expr.elts)
        if isinstance(expr, ast.Name):
            return self.safe_name(expr.id, where)
        return False

    def safe_name(self, name: str, where: ast.AST) -> bool:
        """Follow ``name`` to its bindings: in the enclosing functions (closures too), then
        the module."""
        function = self.function_of(where)
        while function is not None:
            verdict = self._safe_in(function, name)
            if verdict is not None:
                return verdict
            function = self.function_of(function)
        values = self.module_values.get(name, [])
        return bool(values) and all(self.safe(v, self.tree) for v in values)

    def _safe_in(self, function: ast.FunctionDef, name: str) -> bool | None:
        """Whether ``name`` as bound in ``function`` is safe; None if not bound there."""
        key = (id(function), name)
        if key in self._seen:
            return True  # a cycle (version += 1): the other assignments decide
        bound: list[tuple[ast.expr, ast.AST]] = []
        for node in ast.walk(function):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if node.value is not None and any(
                    isinstance(t, ast.Name) and t.id == name for t in targets
                ):
                    bound.append((node.value, node))
            elif (  # a loop variable holds the items of what it loops over
                isinstance(node, ast.For)
                and isinstance(node.target, ast.Name)
                and node.target.id == name
            ):
                bound.append((node.iter, node))
        arguments = function.args.args + function.args.kwonlyargs
        params = [a.arg for a in arguments]
        if name not in params and not bound:
            return None
        self._seen.add(key)
        annotation = next((a.annotation for a in arguments if a.arg == name), None)
        if isinstance(annotation, ast.Name) and annotation.id in ("int", "float"):
            return True  # a number, as mypy --strict (run in CI) holds every caller to
        if name in params and not self.safe_parameter(function, name, params):
            return False
        return all(self.safe(value, at) for value, at in bound)

    def safe_attribute(self, attr: str) -> bool:
        """Every ``<something>.attr = value`` in the module assigns a safe value."""
        key = (0, "." + attr)
        if key in self._seen:
            return True
        self._seen.add(key)
        values = [
            (node.value, node)
            for node in ast.walk(self.tree)
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            and node.value is not None
            and any(
                isinstance(t, ast.Attribute) and t.attr == attr
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            )
        ]
        return bool(values) and all(self.safe(v, at) for v, at in values)

    def safe_parameter(self, function: ast.FunctionDef, name: str, params: list[str]) -> bool:
        """Every call of ``function`` passes a safe value for ``name`` (or leaves the default)."""
        index = params.index(name)
        is_method = bool(params) and params[0] in ("self", "cls")
        defaults = dict(
            zip(
                [a.arg for a in function.args.args][-len(function.args.defaults) or len(params) :],
                function.args.defaults,
                strict=False,
            )
        )
        defaults.update(
            {
                a.arg: d
                for a, d in zip(function.args.kwonlyargs, function.args.kw_defaults, strict=True)
                if d is not None
            }
        )
        calls = [
            node
            for node in ast.walk(self.tree)
            if isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == function.name)
                or (isinstance(node.func, ast.Name) and node.func.id == function.name)
            )
        ]
        for call in calls:
            position = index - (1 if is_method and isinstance(call.func, ast.Attribute) else 0)
            given = [k.value for k in call.keywords if k.arg == name]
            if not given and 0 <= position < len(call.args):
                given = [call.args[position]]
            if not given:
                default = defaults.get(name)
                if default is None or not self.safe(default, function):
                    return False
            elif not self.safe(given[0], call):
                return False
        return bool(calls)


# Every module of the SQLite backend that runs SQL, with how many execute() calls (and how
# many with SQL text built at run time) it had when this list was written.
_SQL_MODULES = {
    "append": (11, 5),
    "bydest": (10, 5),
    "connections": (7, 1),
    "dead_letters": (13, 7),
    "files": (1, 1),
    "inspect": (10, 1),
    "journal_moves": (2, 1),
    "leases": (12, 3),
    "move_records": (3, 2),
    "queue": (9, 2),
    "reads": (4, 0),
    "ready": (3, 1),
    "recovery": (15, 1),
    "salvage": (15, 3),
    "schema": (12, 3),
    "sidefiles": (10, 1),
    "spool": (1, 0),
    "spool_counts": (1, 1),
    "spool_moves": (3, 1),
    "transactions": (7, 1),
    "wal": (1, 1),
}


@pytest.mark.parametrize("name", sorted(_SQL_MODULES))
def test_sql_in_the_queue_modules_interpolates_only_placeholders_and_constants(
    name: str,
) -> None:
    """A grep with a parser: the text of every execute(), followed back through f-strings,
    names, parameters and call sites. A failure names the line: pass the value as a ``?``
    parameter, or, if it is a number or a constant identifier, make that visible here."""
    least_executes, least_built = _SQL_MODULES[name]
    # The package is read as one tree, so that a name imported from a sibling module and a
    # parameter filled in by another module's call are followed too.
    bodies = {
        info.name: ast.parse(
            inspect.getsource(importlib.import_module(f"{sqlite_package.__name__}.{info.name}"))
        ).body
        for info in pkgutil.iter_modules(sqlite_package.__path__)
    }
    taint = _SqlTaint(ast.Module(body=[n for b in bodies.values() for n in b], type_ignores=[]))
    tree = ast.Module(body=bodies[name], type_ignores=[])
    executes = built = 0
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("execute", "executemany", "executescript")
            and node.args
        ):
            executes += 1
            text = node.args[0]
            built += not isinstance(text, ast.Constant)
            assert taint.safe(text, node), f"line {node.lineno}: execute({ast.unparse(text)})"
        # No %-formatting or .format() of SQL text at all.
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            left = node.left
            if isinstance(left, ast.Constant) and isinstance(left.value, str):
                assert not _SQL_WORDS.search(left.value), f"line {node.lineno}: % into SQL"
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"
            and isinstance(node.func.value, ast.Constant)
            and isinstance(node.func.value.value, str)
        ):
            assert not _SQL_WORDS.search(node.func.value.value), f"line {node.lineno}"
    assert executes >= least_executes
    assert built >= least_built  # the check did meet SQL built at run time


def test_every_module_of_the_sqlite_backend_that_runs_sql_is_checked() -> None:
    """A module split off (or added) that calls execute() joins ``_SQL_MODULES``, so the
    check above reads its SQL too (the spool modules and five others had been missed)."""
    running_sql = set()
    for info in pkgutil.iter_modules(sqlite_package.__path__):
        module = importlib.import_module(f"{sqlite_package.__name__}.{info.name}")
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("execute", "executemany", "executescript")
                and node.args
            ):
                running_sql.add(info.name)
    assert running_sql == set(_SQL_MODULES)


def test_sql_in_the_queue_modules_uses_only_nameless_placeholders() -> None:
    """Parameters go as sequences, so every placeholder is a bare ``?``: numbered (``?1``) or
    named ones with a sequence raise DeprecationWarning on Python 3.12 (an error under
    ``-W error``, and in 3.14)."""
    numbered = re.compile(r"\?\d|(?<![:\w]):[a-z_]\w*\b")
    found = []
    for info in pkgutil.iter_modules(sqlite_package.__path__):
        module = importlib.import_module(f"{sqlite_package.__name__}.{info.name}")
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and _SQL_WORDS.search(node.value)
                and numbered.search(node.value)
            ):
                found.append(f"{info.name}:{node.lineno}: {node.value}")
    assert found == []


def test_the_sql_taint_check_catches_interpolated_data() -> None:
    """The check above is not vacuous: it flags a value from a caller."""
    bad = ast.parse(
        "def f(conn, event):\n"
        "    conn.execute(f\"SELECT * FROM messages WHERE event = '{event}'\")\n"
        "def g(conn):\n"
        "    f(conn, input())\n"
    )
    taint = _SqlTaint(bad)
    call = next(
        n
        for n in ast.walk(bad)
        if isinstance(n, ast.Call) and ast.unparse(n.func) == "conn.execute"
    )
    assert not taint.safe(call.args[0], call)
    good = ast.parse(
        "T = 'messages'\n"
        "def f(conn, table, ids):\n"
        "    conn.execute(f\"DELETE FROM {table} WHERE id IN ({','.join('?' * len(ids))})\", ids)\n"
        "def g(conn):\n"
        "    f(conn, T, [1])\n"
    )
    taint = _SqlTaint(good)
    call = next(
        n
        for n in ast.walk(good)
        if isinstance(n, ast.Call) and ast.unparse(n.func) == "conn.execute"
    )
    assert taint.safe(call.args[0], call)


# --------------------------------------------------------------------------- one record, one line

NEWLINES = ["\n", "\r", "\r\n", "\u2028", "\x85"]


def one_line(text: str) -> bool:
    return not any(n in text for n in NEWLINES)


def test_user_data_with_newlines_never_splits_a_log_record(
    queue_path: Path, collector: Collector, records: Records
) -> None:
    """Event names, ids, properties with line breaks, through deliveries, retries, dead
    letters, 401s: every record's message is one line (the library does not log user data)."""
    evil = "Signed Up\nINFO durable_analytics: forged line\r\nx\u2028y"
    client = Client(
        WRITE_KEY,
        host=collector.url,
        queue_path=queue_path,
        flusher="none",
        on_exit="none",
        debug=True,
        max_retries=1,
        flush_at=3,
    )
    ids = []
    for i in range(6):
        _, message = client.track(
            f"user\n{i}", evil, {evil: evil}, anonymous_id=evil, message_id=f"id\n{i}"
        )
        ids.append(message["messageId"])
    collector.reject_message_ids(ids[0], status=400)
    collector.script(500)
    client.flush()
    backoff_over(queue_path)
    client.flush(timeout=5)
    collector.set_default(401)
    client.track("u", evil)
    client.flush()
    client.close(timeout=0)
    assert len(records.records) >= 4
    assert any("dead-lettered" in r.getMessage() for r in records.records)
    for record in records.records:
        assert one_line(record.getMessage()), record.getMessage()


def test_a_write_key_with_a_newline_is_refused_in_one_line(collector: Collector) -> None:
    for key in ("key\nforged", "key\r", "key\x00"):
        with pytest.raises(ConfigError) as info:
            Client(key, host=collector.url)
        assert one_line(str(info.value))
        assert "forged" not in str(info.value)


def test_a_server_response_with_newlines_never_splits_a_log_record(
    queue_path: Path, collector: Collector, records: Records
) -> None:
    collector.script(Reply(503, body="busy\nERROR durable_analytics: forged\r\n"))
    client = Client(
        WRITE_KEY,
        host=collector.url,
        queue_path=queue_path,
        flusher="none",
        on_exit="none",
        max_retries=0,
    )
    client.track("u", "E")
    client.flush()
    client.close(timeout=0)
    assert any("503" in r.getMessage() for r in records.records)
    for record in records.records:
        assert one_line(record.getMessage()), record.getMessage()


@pytest.mark.parametrize(
    "host", ["http://exa\nmple.com", "https://api.segment.io/x\r\ny", "http://a\x00"]
)
def test_a_host_with_control_characters_is_refused(host: str) -> None:
    with pytest.raises(ConfigError):
        Client(WRITE_KEY, host=host, send=False)


def test_cli_log_lines_each_start_with_the_program_name(
    runner: CliRunner, queue_path: Path, collector: Collector
) -> None:
    evil = "E\ndurable-analytics: error: forged"
    for i in range(3):
        invoke(
            runner,
            "track",
            "--queue",
            str(queue_path),
            "--write-key",
            WRITE_KEY,
            "--host",
            collector.url,
            "--user-id",
            f"u\n{i}",
            "--event",
            evil,
        )
    collector.script(500)
    result = invoke(runner, "drain", "-vv", "--queue", str(queue_path), "--max-retries", "1")
    for line in result.stderr.splitlines():
        assert line.startswith("durable-analytics"), line
    assert "forged" not in result.stderr


# --------------------------------------------------------------------------- http:// and TLS


@pytest.mark.parametrize(
    ("host", "warns"),
    [
        ("http://127.0.0.1:{port}", False),  # this machine: a local collector or sidecar
        ("http://localhost:{port}", False),
        ("http://analytics.example.test:{port}", True),  # off this machine: the key travels
        ("https://127.0.0.1:{port}", False),
    ],
)
def test_plain_http_warns_only_off_this_machine_and_works(
    queue_path: Path, collector: Collector, records: Records, host: str, warns: bool
) -> None:
    url = host.format(port=collector.port)
    client = Client(WRITE_KEY, host=url, queue_path=queue_path, flusher="none", on_exit="none")
    warnings = [r for r in records.records if "plain http://" in r.getMessage()]
    assert len(warnings) == (1 if warns else 0)
    if warns:
        assert warnings[0].levelno == logging.WARNING
        assert url in warnings[0].getMessage()
        assert WRITE_KEY not in warnings[0].getMessage()
    elif url.startswith("http://"):
        client.track("u", "E")
        assert client.flush(timeout=5).sent == 1  # and it works
    client.close(timeout=0)


def test_tls_to_a_plain_http_port_fails_and_keeps_the_messages(
    queue_path: Path, collector: Collector, runner: CliRunner
) -> None:
    client = Client(
        WRITE_KEY,
        host=f"https://127.0.0.1:{collector.port}",
        queue_path=queue_path,
        flusher="none",
        on_exit="none",
        max_retries=0,
    )
    for _ in range(5):
        client.track("u", "E")
    result = client.flush()
    stats = client.stats()
    client.close(timeout=0)
    assert (result.sent, result.pending) == (0, 5)
    assert stats.pending == 5
    assert stats.dead_letters == 0
    assert stats.last_error is not None
    assert "TLS" in stats.last_error["message"]
    assert collector.requests == 0  # the handshake failed: no request went out
    status = invoke(runner, "status", "--queue", str(queue_path))
    assert "TLS error" in status.stdout


class TLSFront:
    """TLS termination in front of the plain Collector, with a given certificate."""

    def __init__(self, upstream: int, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.upstream = upstream
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.handshakes_failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshakes_failed += 1
            conn.close()
            return
        with tls, socket.create_connection(("127.0.0.1", self.upstream), timeout=5) as up:
            pump = threading.Thread(target=self._copy, args=(up, tls), daemon=True)
            pump.start()
            self._copy(tls, up)
            pump.join(5)

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join()


@pytest.fixture
def tls_front(tmp_path: Path, collector: Collector) -> Iterator[Callable[[str], TLSFront]]:
    fronts: list[TLSFront] = []

    def make(name: str) -> TLSFront:
        cert, key = make_certificate(tmp_path, name)
        front = TLSFront(collector.port, cert, key)
        fronts.append(front)
        return front

    yield make
    for front in fronts:
        front.stop()


def test_a_self_signed_certificate_keeps_the_messages_until_it_is_trusted(
    queue_path: Path,
    collector: Collector,
    tls_front: Callable[[str], TLSFront],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Verification is on: a self-signed certificate is refused and the messages wait; with
    the certificate in REQUESTS_CA_BUNDLE the same queue delivers them over TLS."""
    front = tls_front("localhost")
    host = f"https://localhost:{front.port}"
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    client = Client(
        WRITE_KEY,
        host=host,
        queue_path=queue_path,
        flusher="none",
        on_exit="none",
        max_retries=0,
    )
    ids = [client.track("u", "E")[1]["messageId"] for _ in range(4)]
    assert client.flush().pending == 4
    error = client.stats().last_error
    assert error is not None
    assert "TLS error" in error["message"]
    assert "CERTIFICATE_VERIFY_FAILED" in error["message"]
    assert collector.requests == 0
    # The front counts the refused handshake once the client's alert reaches it, which may
    # be after the client has given up and flush() returned.
    deadline = time.monotonic() + 10
    while front.handshakes_failed < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert front.handshakes_failed >= 1
    client.close(timeout=0)

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "localhost.pem"))
    trusting = Client(WRITE_KEY, host=host, queue_path=queue_path, flusher="none", on_exit="none")
    backoff_over(queue_path)
    assert trusting.flush(timeout=10).sent == 4
    assert sorted(collector.message_ids()) == sorted(ids)
    trusting.close(timeout=0)


def test_a_trusted_certificate_for_another_name_is_refused(
    queue_path: Path,
    collector: Collector,
    tls_front: Callable[[str], TLSFront],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    front = tls_front("wrong.example")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "wrong.example.pem"))
    client = Client(
        WRITE_KEY,
        host=f"https://localhost:{front.port}",
        queue_path=queue_path,
        flusher="none",
        on_exit="none",
        max_retries=0,
    )
    client.track("u", "E")
    assert client.flush().pending == 1
    error = client.stats().last_error
    assert error is not None
    assert "TLS error" in error["message"]
    assert "match" in error["message"] or "CERTIFICATE_VERIFY_FAILED" in error["message"]
    assert collector.requests == 0
    client.close(timeout=0)
