"""Delivery slots (``_store/sqlite/slots.py``): with many processes on one queue file, a
few deliver at once, the others' flush loops wait for them and end once their messages are
delivered."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import start_python

from durable_analytics import Client, FlushResult, _drain
from durable_analytics._store.sqlite.slots import SLOTS, DeliverySlots
from durable_analytics.testing import Collector, RecordingTransport, SentBatch


def _nobody(destination: int | None) -> bool:
    return False


def test_at_most_slots_holders_at_once_and_a_freed_slot_is_taken_again(tmp_path: Path) -> None:
    """``SLOTS`` holders (each its own open file, as separate processes are) take the
    slots; one more finds none until a holder leaves."""
    path = tmp_path / "q.db"
    many = [DeliverySlots(path, _nobody, own_turn=True) for _ in range(SLOTS + 1)]
    assert all(s.needed() for s in many)
    held = [s.held() for s in many[:SLOTS]]
    assert [h.__enter__() for h in held] == [True] * SLOTS
    with many[SLOTS].held() as mine:
        assert not mine
    held[0].__exit__(None, None, None)
    with many[SLOTS].held() as mine:
        assert mine
    for h in held[1:]:
        h.__exit__(None, None, None)


def test_threads_of_one_process_share_its_slot(tmp_path: Path) -> None:
    """A second pass of the same process (another thread, nested) rides on the slot it
    holds instead of taking another."""
    path = tmp_path / "q.db"
    mine = DeliverySlots(path, _nobody, own_turn=True)
    others = [DeliverySlots(path, _nobody, own_turn=True) for _ in range(SLOTS - 1)]
    with mine.held() as first, mine.held() as second:
        assert first
        assert second
        entered = [o.held() for o in others]
        assert [e.__enter__() for e in entered] == [True] * (SLOTS - 1)  # one slot used
        for e in entered:
            e.__exit__(None, None, None)


def test_slots_whose_files_cannot_be_opened_are_not_waited_for(tmp_path: Path) -> None:
    """Where no slot file can be opened (here each path is a directory), nobody can hold a
    slot: the first try finds none, and from then on loops deliver without slots instead
    of waiting for a holder that cannot exist."""
    path = tmp_path / "q.db"
    for k in range(SLOTS):
        (tmp_path / f"q.db.slot{k}.lock").mkdir()
    slots = DeliverySlots(path, _nobody, own_turn=True)
    assert slots.needed()
    with slots.held() as mine:
        assert not mine
    assert not slots.needed()


def test_slot_files_that_fail_to_open_for_a_passing_reason_stay_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors (``EMFILE``) while taking a slot: no slot this time, but the slots
    stay in use, and the next try takes one once descriptors are back. (Only an open that
    can never succeed turns them off, as above.)"""
    path = tmp_path / "q.db"
    slots = DeliverySlots(path, _nobody, own_turn=True)
    real_open = os.open

    def out_of_descriptors(file: Any, *args: Any, **kwargs: Any) -> int:
        if str(file).startswith(str(path) + ".slot"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(file, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(os, "open", out_of_descriptors)
        with slots.held() as mine:
            assert not mine
    assert slots.needed()
    with slots.held() as mine:
        assert mine


def test_one_slot_file_that_cannot_be_opened_leaves_the_others_in_use(tmp_path: Path) -> None:
    """A slot file that cannot be opened is skipped: the next one is taken, and once the
    others are held a loop waits (slots still in use) rather than delivering beside them."""
    path = tmp_path / "q.db"
    (tmp_path / "q.db.slot0.lock").mkdir()
    holders = [DeliverySlots(path, _nobody, own_turn=True) for _ in range(SLOTS - 1)]
    entered = [h.held() for h in holders]
    assert [e.__enter__() for e in entered] == [True] * (SLOTS - 1)
    late = DeliverySlots(path, _nobody, own_turn=True)
    with late.held() as mine:
        assert not mine
    assert late.needed()
    for e in entered:
        e.__exit__(None, None, None)


@contextmanager
def _every_slot_held_elsewhere(path: Path) -> Iterator[Callable[[], None]]:
    """Every slot held by other processes (handles with turns of their own) while the block
    runs; yields what frees them before its end."""
    entered = [DeliverySlots(path, _nobody, own_turn=True).held() for _ in range(SLOTS)]
    assert [e.__enter__() for e in entered] == [True] * SLOTS

    def free() -> None:
        while entered:
            entered.pop().__exit__(None, None, None)

    try:
        yield free
    finally:
        free()


def test_a_process_alone_in_the_spool_directory_still_takes_turns_on_the_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every slot held by other processes that deliver this destination, and no journal but
    this process's own in the spool directory (theirs already moved into the file, as at a
    pool's shutdown): its flush waits for a slot, and delivers once one is free. Before,
    a process that counted itself alone there delivered beside the holders (a CI run saw
    4 and 6 requests in flight where one slot allowed 2). Lost 0, duplicated 0."""
    path = tmp_path / "q.db"
    with _every_slot_held_elsewhere(path) as free, Collector(write_key="key") as collector:
        client = Client("key", host=collector.url, queue_path=path, flusher="none")
        ids = [client.track("u", "alone", {"i": i})[1]["messageId"] for i in range(30)]
        slots = client.queue.delivery_slots
        monkeypatch.setattr(slots, "working", lambda destination: True)
        monkeypatch.setattr(slots, "patience", 60.0)
        result: list[FlushResult] = []
        flushing = threading.Thread(target=lambda: result.append(client.flush(timeout=30)))
        flushing.start()
        time.sleep(0.3)  # a loop that did not wait would have sent its 30 by now
        sent_while_held = collector.message_ids()
        free()
        flushing.join(30)
        received = collector.message_ids()
        client.close(timeout=1)
    assert sent_while_held == {}
    assert result[0].pending == 0
    assert {i: received.get(i, 0) for i in ids} == dict.fromkeys(ids, 1)


_FORKS_HOLDING = """
import os, sys, time
from pathlib import Path
from durable_analytics._store.sqlite.slots import DeliverySlots, _try_lock

path = Path(sys.argv[1])
slots = DeliverySlots(path, lambda destination: False, own_turn=True)
# The child lives, not delivering, until the parent has looked at its slot (no timing).
looked, tell = os.pipe()
with slots.held() as mine:
    assert mine
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(tell)  # the parent gone, its read ends
            os.read(looked, 1)
            with slots.held() as child_has:
                code = 0 if child_has and slots._turn.fd >= 0 else 2
        finally:
            os._exit(code)
os.close(looked)
first = path.with_name(path.name + ".slot0.lock")
deadline = time.monotonic() + 10
fd = _try_lock(first)
while fd < 0 and time.monotonic() < deadline:
    time.sleep(0.01)  # the child may not have run its fork hook yet
    fd = _try_lock(first)
os.write(tell, b"x")
_, status = os.waitpid(pid, 0)
print(fd >= 0, os.WEXITSTATUS(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_a_child_forked_while_its_parent_holds_a_slot_does_not_hold_it(tmp_path: Path) -> None:
    """The flock of a forked descriptor is shared with the parent: the child closes its
    copy at the fork (before, only at its own next delivery, so a child that never
    delivered held its parent's slot for its whole life): the parent's slot is free once
    the parent leaves it, while the child lives; the child takes one of its own. (In a
    fresh interpreter: ``fork()`` of a process with threads warns on Python 3.12+.)"""
    child = start_python(_FORKS_HOLDING, str(tmp_path / "q.db"))
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.split() == ["True", "0"]  # the parent's slot freed; the child got its own


_FORKS_WHILE_TAKING = """
import os, sys, threading, time
from pathlib import Path
from durable_analytics._store.sqlite import slots as module

path = Path(sys.argv[1])
slots = module.DeliverySlots(path, lambda destination: False, own_turn=True)
real_try_lock = module._try_lock
flocked = threading.Event()

def slow_try_lock(file):
    # The window: the flock is taken, its descriptor not yet recorded; another thread
    # forks in it.
    fd = real_try_lock(file)
    if fd >= 0 and not flocked.is_set():
        flocked.set()
        time.sleep(0.3)
    return fd

module._try_lock = slow_try_lock
child = []
# The child lives, never delivering, until the parent has looked at its slot.
looked, tell = os.pipe()

def fork_in_the_window():
    flocked.wait(10)
    time.sleep(0.05)
    pid = os.fork()
    if pid == 0:
        os.close(tell)  # the parent gone, its read ends
        os.read(looked, 1)
        os._exit(0)
    child.append(pid)

forker = threading.Thread(target=fork_in_the_window)
forker.start()
with slots.held() as mine:
    assert mine
forker.join()
# The parent left its slot while the child lives: another process (a descriptor of its
# own) must find it free.
first = path.with_name(path.name + ".slot0.lock")
deadline = time.monotonic() + 10
fd = real_try_lock(first)
while fd < 0 and time.monotonic() < deadline:
    time.sleep(0.01)  # the child may not have run its fork hook yet
    fd = real_try_lock(first)
os.write(tell, b"x")
os.waitpid(child[0], 0)
print(fd >= 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_a_fork_while_another_thread_takes_a_slot_leaves_the_child_without_it(
    tmp_path: Path,
) -> None:
    """A fork by one thread while another has taken a slot's flock but not yet recorded its
    descriptor waits for that thread (a fork hook): the child then knows of its copy and
    closes it, and the slot is free once the parent leaves it. Before, the child kept an
    unknown copy and held the slot for its whole life. (In a fresh interpreter, as above.)"""
    child = start_python(_FORKS_WHILE_TAKING, str(tmp_path / "q.db"))
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.split() == ["True"]


_CLOSER = """
import json, os, sys, time
from durable_analytics._store.sqlite import slots
from durable_analytics import _drain
slots.SLOTS = 1
# The turns themselves, not the ways out of them (tested above and below): a loaded CI
# machine may leave the holder without a lease out for longer than the usual grace.
slots.PATIENCE, _drain._IDLE_GRACE, _drain._MOST_WAIT = 60.0, 60.0, 60.0
from durable_analytics import Client
host, path, ready, go = sys.argv[1:5]
client = Client("key", host=host, queue_path=path, max_in_flight=2, flusher="none",
                on_exit="none")
ids = [client.track("u", "closing", {"i": i})[1]["messageId"] for i in range(150)]
open(ready + str(os.getpid()), "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
result = client.flush(timeout=60)
print(json.dumps({"ids": ids, "pending": result.pending}))
"""


def test_processes_flushing_at_once_deliver_one_at_a_time_everything_once(
    tmp_path: Path,
) -> None:
    """Six processes on one queue (one slot, ``max_in_flight=2`` each) flush at once, as
    at a pool's shutdown, against a 20 ms collector: never more than one process's
    requests in flight at the collector, every message delivered by the time every flush
    returned, none twice."""
    path = tmp_path / "q.db"
    ready, go = str(tmp_path / "ready-"), tmp_path / "go"
    with Collector(write_key="key", delay=0.02) as collector:
        procs = [start_python(_CLOSER, collector.url, str(path), ready, str(go)) for _ in range(6)]
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        go.touch()
        outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        received = collector.message_ids()
        peak = collector.peak_concurrency
    sent = [i for o in outs for i in o["ids"]]
    assert [o["pending"] for o in outs] == [0] * 6
    assert peak <= 2
    assert len(sent) == 900
    assert {i: received.get(i, 0) for i in sent} == dict.fromkeys(sent, 1)  # lost 0, dup 0


def test_a_flush_behind_holders_that_deliver_nothing_delivers_without_a_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every slot held by processes that deliver nothing (stopped, hung): a flush waits
    ``patience`` seconds without progress, then delivers without a slot, as before slots.
    Lost 0, duplicated 0."""
    path = tmp_path / "q.db"
    with _every_slot_held_elsewhere(path), Collector(write_key="key") as collector:
        client = Client("key", host=collector.url, queue_path=path, flusher="none")
        ids = [client.track("u", "behind", {"i": i})[1]["messageId"] for i in range(60)]
        slots = client.queue.delivery_slots
        monkeypatch.setattr(slots, "needed", lambda: True)
        monkeypatch.setattr(slots, "patience", 0.2)
        with slots.held() as mine:
            assert not mine  # every slot is taken
        result = client.flush(timeout=30)
        received = collector.message_ids()
        client.close(timeout=1)
    assert result.pending == 0
    assert {i: received.get(i, 0) for i in ids} == dict.fromkeys(ids, 1)


def _as_another_process(client: Client) -> None:
    """Give ``client``'s queue a hold on the slots of its own, as if it ran in a process of
    its own (the handles of one process share one)."""
    mine = client.queue.delivery_slots
    client.queue.delivery_slots = DeliverySlots(  # type: ignore[attr-defined]
        client.queue.path, mine.working, own_turn=True
    )


@contextmanager
def _flushing_in_the_last_slot(path: Path, holder: Client) -> Iterator[None]:
    """Every slot but one held by processes that stay away; ``holder.flush(timeout=30)``
    runs on a thread in the last one while the block runs (joined at its end)."""
    others = [DeliverySlots(path, _nobody, own_turn=True).held() for _ in range(SLOTS - 1)]
    assert [o.__enter__() for o in others] == [True] * (SLOTS - 1)
    working = threading.Thread(target=holder.flush, kwargs={"timeout": 30})
    working.start()
    try:
        deadline = time.monotonic() + 30
        while not holder.queue.delivery_slots.holding() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert holder.queue.delivery_slots.holding()
        yield
    finally:
        working.join()
        for o in others:
            o.__exit__(None, None, None)


@contextmanager
def _one_slot_held_by_a_slow_flush(
    path: Path, holder_key: str, waiter_key: str, older: int
) -> Iterator[tuple[Client, RecordingTransport, RecordingTransport]]:
    """Every slot but one held by processes that stay away; the last by a flush of
    ``older`` messages of ``holder_key`` against a server that answers in 0.2 s (one batch
    at a time). Yields the client of ``waiter_key`` on the same queue (slots needed), and
    the transports of both; the holder's flush is joined at the end."""
    holder_transport = RecordingTransport(_slow)
    holder = Client(
        holder_key,
        queue_path=path,
        flusher="none",
        on_exit="none",
        transport=holder_transport,
        max_in_flight=1,
    )
    waiter_transport = RecordingTransport()
    waiter = Client(
        waiter_key, queue_path=path, flusher="none", on_exit="none", transport=waiter_transport
    )
    for i in range(older):
        holder.track("u", "older", {"i": i})
    for client in (holder, waiter):
        _as_another_process(client)
    with _flushing_in_the_last_slot(path, holder):
        yield waiter, holder_transport, waiter_transport


def _slow(batch: object) -> int:
    time.sleep(0.2)
    return 200


def test_a_flush_whose_destination_nobody_delivers_does_not_wait_for_a_slot(
    tmp_path: Path,
) -> None:
    """Every slot held, the one free by a flush of another write key whose server is slow:
    a flush of this write key (nobody has a lease out on it) delivers without a slot after
    a moment, well within its timeout. Before, it waited the whole patience (2 s) for the
    holders' progress, which never came for its destination: flush(timeout=1.5) sent
    nothing."""
    with _one_slot_held_by_a_slow_flush(tmp_path / "q.db", "KEY-A", "KEY-B", 100) as (
        quick,
        _,
        quick_transport,
    ):
        (_, sent) = quick.track("u", "B")
        result = quick.flush(timeout=1.5)
    assert result.pending == 0
    assert [m["messageId"] for m in quick_transport.messages()] == [sent["messageId"]]


def test_a_flush_behind_a_holder_working_through_older_messages_waits_half_its_timeout(
    tmp_path: Path,
) -> None:
    """The one free slot held by a flush of the same write key working through 400 older
    messages against a slow server (4 s): a later flush's own message lies past what that
    holder was asked for, so the holder never reaches it. The later flush waits at most
    half its timeout for a slot, then delivers without one. Before, the destination's
    falling count kept it waiting its whole timeout: flush(timeout=2) sent nothing."""
    with _one_slot_held_by_a_slow_flush(tmp_path / "q.db", "KEY", "KEY", 400) as (
        later,
        holder_transport,
        later_transport,
    ):
        (_, sent) = later.track("u", "later")
        result = later.flush(timeout=2.0)
    assert result.pending == 0
    # Its pass took older messages too (all of the destination up to its own): each once.
    delivered = Counter(
        m["messageId"] for t in (holder_transport, later_transport) for m in t.messages()
    )
    assert delivered[sent["messageId"]] == 1
    assert len(delivered) == 401
    assert set(delivered.values()) == {1}


def test_a_flush_that_waited_for_the_slot_holder_counts_what_the_holder_dead_lettered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every slot but one held by processes that stay away; the last by another client's
    flush of the same write key, which delivers this client's messages too and
    dead-letters the one the server refuses. This client's flush waits without a slot, and
    its result (of every message its destination had queued: the other client's 40 and
    its own 10) counts 49 sent and 1 dead-lettered: the dead letters are read from the
    queue, whoever moved them. Before, only this process's own dead letters counted, and
    the refused message was reported as sent."""
    path = tmp_path / "q.db"
    # The turns themselves, not the ways out of them: a loaded machine must not make the
    # waiter deliver without a slot.
    monkeypatch.setattr(_drain, "_MOST_WAIT", 60.0)
    monkeypatch.setattr(_drain, "_IDLE_GRACE", 60.0)
    counted = threading.Event()  # the waiter has counted what its flush covers

    def refuse_bad(batch: SentBatch) -> int:
        # Nothing is answered before the waiter counted; then 400 to any batch with the
        # "bad" event (split until it is alone, then dead-lettered).
        assert counted.wait(30)
        return 400 if any(m.get("event") == "bad" for m in batch.messages) else 200

    holder_transport = RecordingTransport(refuse_bad)
    holder = Client(
        "key",
        queue_path=path,
        flusher="none",
        on_exit="none",
        transport=holder_transport,
        max_in_flight=1,
    )
    waiter_transport = RecordingTransport()
    waiter = Client(
        "key", queue_path=path, flusher="none", on_exit="none", transport=waiter_transport
    )
    _as_another_process(holder)
    _as_another_process(waiter)
    waiter.queue.delivery_slots.patience = 60.0
    count_pending = waiter.queue.pending

    def pending_then_go(**kwargs: Any) -> int:
        found = count_pending(**kwargs)
        counted.set()  # the flush's first count (its ``before``) is taken
        return found

    monkeypatch.setattr(waiter.queue, "pending", pending_then_go)
    for i in range(40):
        holder.track("u", "older", {"i": i})
    events = ["mine"] * 9
    events.insert(4, "bad")
    ids = [waiter.track("u", event)[1]["messageId"] for event in events]
    with _flushing_in_the_last_slot(path, holder):
        result = waiter.flush(timeout=30)
    delivered = [m["messageId"] for m in holder_transport.messages()]
    dead = [d.body for d in waiter.queue.dead_letters()]
    assert waiter_transport.messages() == []  # the holder delivered them all
    assert result == FlushResult(sent=49, pending=0, dead_lettered=1)
    assert [i for i in ids if i in delivered] == [
        i for e, i in zip(events, ids, strict=True) if e != "bad"
    ]
    assert len(dead) == 1
    assert b'"bad"' in dead[0]
    holder.close(timeout=1)
    waiter.close(timeout=1)


def test_sync_mode_delivers_its_message_without_taking_a_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sync_mode``'s one message, bounded by its own deadline, never waits for a delivery
    slot: with every slot held by processes delivering its destination, the call delivers
    at once and the slots are not even looked at."""
    path = tmp_path / "q.db"
    transport = RecordingTransport()

    def no_turn() -> None:
        raise AssertionError("sync_mode asked for a delivery slot")

    with _every_slot_held_elsewhere(path):
        client = Client("key", queue_path=path, sync_mode=True, on_exit="none", transport=transport)
        slots = client.queue.delivery_slots
        monkeypatch.setattr(slots, "working", lambda destination: True)
        try:
            with monkeypatch.context() as patched:
                patched.setattr(slots, "held", no_turn)
                ok, message = client.track("u", "now")
            assert ok
            assert [m["messageId"] for m in transport.messages()] == [message["messageId"]]
        finally:
            client.close(timeout=1)


def test_two_clients_of_one_process_share_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every slot but one held by other processes; the last by this process's flush of
    write key A, whose answer the server holds: a flush of write key B by another Client
    on the file in the same process rides on that slot and delivers at once, never waiting
    for a turn. Before, each Client took a slot of its own, as two processes would, and
    the fifth Client of a process waited for the others."""
    path = tmp_path / "q.db"
    b_done = threading.Event()

    def held_until_b(batch: SentBatch) -> int:
        assert b_done.wait(30)
        return 200

    a = Client(
        "KEY-A",
        queue_path=path,
        flusher="none",
        on_exit="none",
        transport=RecordingTransport(held_until_b),
        max_in_flight=1,
    )
    b_transport = RecordingTransport()
    b = Client("KEY-B", queue_path=path, flusher="none", on_exit="none", transport=b_transport)
    a.track("u", "a")
    (_, sent) = b.track("u", "b")

    def never_wait(*args: object, **kwargs: object) -> bool:
        raise AssertionError("a flush waited for a turn its process holds")

    monkeypatch.setattr(_drain._SlotWait, "patient", never_wait)
    with _flushing_in_the_last_slot(path, a):
        try:
            result = b.flush(timeout=30)
        finally:
            b_done.set()  # A's answer, held until B's flush ended
    assert result.pending == 0
    assert [m["messageId"] for m in b_transport.messages()] == [sent["messageId"]]
    a.close(timeout=1)
    b.close(timeout=1)
