"""Name lookups end by the caller's deadline (``durable_analytics._transport._resolve``).

A resolver that does not answer cannot be made real on a test machine (the system resolver
reads /etc/resolv.conf), so ``socket.getaddrinfo`` is the one thing replaced here: names
ending in ``.hang.test`` block until the test lets them go, every name answers 127.0.0.1.
The servers, the client, the queue and the flush are real.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import WRITE_KEY, run_python

import durable_analytics
from durable_analytics._transport import _resolve
from durable_analytics._transport._resolve import Resolver
from durable_analytics._transport._wire import WireClient, origin_of
from durable_analytics.testing import Collector

_real_getaddrinfo = socket.getaddrinfo


class FakeResolver:
    """``getaddrinfo`` for ``*.test`` names: counted, and blocking on ``*.hang.test``."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []
        self.fail = False

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".test"):
            self.calls.append(host)
            if host.endswith(".hang.test"):
                self.release.wait(30)
            if self.fail:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            host = "127.0.0.1"
        return _real_getaddrinfo(host, port, *args, **kwargs)


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeResolver]:
    fake = FakeResolver()
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    yield fake
    fake.release.set()  # let a lookup thread still waiting end


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])


def test_a_lookup_that_hangs_ends_at_the_deadline_and_its_late_answer_is_used(
    fake_dns: FakeResolver, collector: Collector
) -> None:
    """The request times out while the lookup still hangs; once the resolver answers, the
    next request uses that answer instead of asking again (a resolver slower than every
    deadline still lets delivery go on)."""
    client = WireClient()
    origin = origin_of(f"http://api.hang.test:{_port(collector.url)}/v1/batch")
    body = b'{"batch":[],"sentAt":"2026-01-01T00:00:00Z"}'
    basic = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    head = f"Authorization: Basic {basic}\r\nContent-Type: application/json\r\n".encode()
    with pytest.raises(TimeoutError, match=r"looking up 'api\.hang\.test'"):
        client.post(origin, head, body, timeout=0.2, max_body=65536)
    assert not fake_dns.release.is_set()  # returned while the lookup was still blocked
    fake_dns.release.set()
    answer = client.post(origin, head, body, timeout=5.0, max_body=65536)
    assert answer.status == 200
    assert fake_dns.calls == ["api.hang.test"]
    client.close()


def test_flush_with_a_timeout_returns_while_the_lookup_hangs_then_delivers(
    fake_dns: FakeResolver, collector: Collector, queue_path: Path
) -> None:
    """``flush(timeout=...)`` returns by its deadline with the message still pending while
    the name lookup hangs, and a later flush delivers it: nothing lost, nothing sent twice."""
    client = durable_analytics.Client(
        WRITE_KEY,
        host=f"http://ingest.hang.test:{_port(collector.url)}",
        queue_path=queue_path,
        flusher="none",
        on_exit="none",
    )
    client.track("user-1", "Signed Up")
    result = client.flush(timeout=0.3)
    assert not fake_dns.release.is_set()
    assert (result.sent, result.pending) == (0, 1)
    fake_dns.release.set()
    result = client.flush(timeout=10)
    assert (result.sent, result.pending) == (1, 0)
    assert [m["event"] for m in collector.messages()] == ["Signed Up"]
    client.close(timeout=1)


def test_close_honours_its_timeout_while_the_lookup_hangs(
    fake_dns: FakeResolver, collector: Collector, queue_path: Path
) -> None:
    """An exit (``close``) with a budget ends by it behind a resolver that does not
    answer; the message stays on disk for the next process."""
    client = durable_analytics.Client(
        WRITE_KEY,
        host=f"http://ingest.hang.test:{_port(collector.url)}",
        queue_path=queue_path,
        on_exit="none",
    )
    client.track("user-1", "Signed Up")
    client.close(timeout=0.3)
    assert not fake_dns.release.is_set()
    with durable_analytics.Client(
        WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="none", on_exit="none"
    ) as later:
        assert later.queue.pending() == 1


def test_callers_waiting_for_the_same_name_share_one_lookup(fake_dns: FakeResolver) -> None:
    """Ten threads that need the same name while its lookup hangs cost one lookup thread,
    not ten; all get its answer."""
    resolver = Resolver()
    answers: list[int] = []

    def need() -> None:
        answers.append(len(resolver.addresses("shared.hang.test", 80, time.monotonic() + 10)))

    threads = [threading.Thread(target=need) for _ in range(10)]
    for thread in threads:
        thread.start()
    while len(fake_dns.calls) < 1:
        time.sleep(0.001)
    fake_dns.release.set()
    for thread in threads:
        thread.join()
    assert fake_dns.calls == ["shared.hang.test"]
    assert len(answers) == 10
    assert all(n >= 1 for n in answers)


def test_an_answer_is_kept_for_the_ttl_and_a_failure_not_at_all(
    fake_dns: FakeResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that answered is not looked up again within ``TTL``, and is after it; a name
    that failed is asked again by the next caller (the failure is raised as it came)."""
    resolver = Resolver()
    later = time.monotonic() + 5
    resolver.addresses("kept.test", 80, later)
    resolver.addresses("kept.test", 80, later)
    assert fake_dns.calls == ["kept.test"]
    monkeypatch.setattr(_resolve, "TTL", -1.0)
    resolver.addresses("kept.test", 80, later)
    assert fake_dns.calls == ["kept.test"] * 2

    fake_dns.fail = True
    for _ in range(2):
        with pytest.raises(socket.gaierror):
            resolver.addresses("unknown.test", 80, later)
    assert fake_dns.calls.count("unknown.test") == 2


def test_an_ip_address_needs_no_lookup_thread(fake_dns: FakeResolver) -> None:
    """Addresses are answered on the caller's thread: no thread is started for them."""
    before = threading.active_count()
    v4 = Resolver().addresses("127.0.0.1", 8080, time.monotonic() + 5)
    v6 = Resolver().addresses("::1", 8080, time.monotonic() + 5)
    assert v4[0][4] == ("127.0.0.1", 8080)
    assert v6[0][4][:2] == ("::1", 8080)
    assert threading.active_count() == before
    assert fake_dns.calls == []


def test_a_forked_child_does_not_wait_for_the_parents_hung_lookup() -> None:
    """The parent forks while its lookup of a name hangs: the child looks the name up on a
    thread of its own and gets an answer (the parent's thread does not exist there)."""
    code = """
        import os, socket, threading, time
        from durable_analytics._transport._resolve import Resolver
        real = socket.getaddrinfo
        parent = os.getpid()
        def fake(host, port, *args, **kwargs):
            if host == "name.test":
                if os.getpid() == parent:
                    threading.Event().wait(30)  # the parent's resolver never answers
                host = "127.0.0.1"
            return real(host, port, *args, **kwargs)
        socket.getaddrinfo = fake
        resolver = Resolver()
        try:
            resolver.addresses("name.test", 80, time.monotonic() + 0.2)
        except TimeoutError:
            pass
        pid = os.fork()
        if pid == 0:
            found = resolver.addresses("name.test", 80, time.monotonic() + 5)
            os._exit(0 if found[0][4] == ("127.0.0.1", 80) else 3)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        os._exit(0)
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0"]


def test_a_lookup_runs_on_the_callers_thread_where_no_thread_can_start(
    fake_dns: FakeResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``Thread.start`` refuses (interpreter exit on CPython 3.12.0-3.12.2, imitated
    here on this interpreter), the lookup still answers, on the caller's own thread."""

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    found = Resolver().addresses("exit.test", 80, time.monotonic() + 5)
    assert found[0][4] == ("127.0.0.1", 80)
    assert fake_dns.calls == ["exit.test"]


def test_an_exit_delivers_to_a_host_given_by_name(collector: Collector, queue_path: Path) -> None:
    """A script that tracks one event and exits delivers it to ``http://localhost:port``
    (a name, so looked up): on CPython 3.12.0-3.12.2, where no thread starts at exit, the
    lookup runs in the exit's own thread (it was lost to a RuntimeError there, the message
    left on disk)."""
    result = run_python(
        f"""
        from durable_analytics import Client
        client = Client({WRITE_KEY!r}, host="http://localhost:{_port(collector.url)}",
                        queue_path={str(queue_path)!r}, flusher="none", shutdown_timeout=5)
        client.track("user-1", "Signed Up")
        """
    )
    assert result.returncode == 0, result.stderr
    assert [m["event"] for m in collector.messages()] == ["Signed Up"]
    queue = durable_analytics.Client(
        WRITE_KEY, host=collector.url, queue_path=queue_path, flusher="none", on_exit="none"
    )
    assert queue.queue.pending() == 0
    queue.close(timeout=0)


def test_importing_the_library_imports_the_codec_getaddrinfo_needs() -> None:
    """``getaddrinfo`` imports the "idna" codec on its first call. On a flusher thread, a
    ``fork()`` meanwhile left that import's lock held in the child by a thread it does not
    have, and the child's first lookup waited forever (a gunicorn master that tracked and
    then forked its workers). The library imports it itself, before any thread can."""
    result = run_python(
        """
        import sys
        import durable_analytics
        print("encodings.idna" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
