"""Who holds a lease: boot id, pid namespace, pid and process start time, and when a lease
is over (its holder provably gone, or its time up on the right clock).

The whole protocol: docs/ARCHITECTURE.md, "The lease protocol".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from durable_analytics._store.base import CLOCK_JUMP_MARGIN


def _read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid``, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return -1  # exists but unreadable: treat as alive
    fields = data[data.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


@dataclass(frozen=True)
class Holder:
    boot: str
    pidns: int
    pid: int
    start: int


_BOOT_ID = _read_boot_id()
_holder_cache: Holder | None = None


def holder() -> Holder:
    global _holder_cache  # noqa: PLW0603 - per-process identity, reset after fork
    cached = _holder_cache
    if cached is None or cached.pid != os.getpid():
        pid = os.getpid()
        cached = Holder(_BOOT_ID, _pid_namespace(), pid, _process_start(pid) or 0)
        _holder_cache = cached
    return cached


def holder_gone(
    boot: str, pidns: int, pid: int, pstart: int, seen: dict[int, int | None] | None = None
) -> bool:
    """True only when the lease holder provably no longer exists.

    A lease of this very process (same boot, pid namespace, pid and start time) is never
    probed: this process is alive by definition, and a scan meets one such lease per batch
    it has in flight. ``seen`` memoizes the probes of one scan (pid -> start time), so the
    leases of another process cost one ``/proc`` read between them, and a scan never trusts
    an earlier scan's answer (a process killed since is seen gone at the next one).
    """
    me = holder()
    if not boot or not me.boot:
        return False
    if boot != me.boot:
        return True  # the machine rebooted since: no process of that boot survives
    if pidns != me.pidns or pidns == 0:
        return False  # another pid namespace: its pids mean nothing here
    if pid == me.pid and pstart == me.start:
        return False  # this process: alive while it asks
    if seen is None:
        start = _process_start(pid)
    elif pid in seen:
        start = seen[pid]
    else:
        start = seen[pid] = _process_start(pid)
    return start is None or start not in (-1, pstart)


def reset_after_fork() -> None:
    """In a forked child: the cached identity is the parent's."""
    global _holder_cache  # noqa: PLW0603
    _holder_cache = None


def lease_over(
    lease_timeout: float,
    now_wall: float,
    now_mono: float,
    boot: str,
    pidns: int,
    pid: int,
    pstart: int,
    mono_exp: float,
    wall_exp: float,
    seen: dict[int, int | None] | None = None,
) -> bool:
    """Whether a lease record has expired or lost its holder (``seen``: see ``holder_gone``)."""
    me = holder()
    if boot and boot == me.boot and (pidns, pid, pstart) == (me.pidns, me.pid, me.start):
        # This process's own lease (one per batch it has in flight, most of the records of
        # a scan while it pipelines): alive by definition, so only its expiry counts, with
        # no identity checks per record.
        return now_mono > mono_exp
    if boot and boot == me.boot:
        expired = now_mono > mono_exp  # one boot, one monotonic clock for every process
    else:
        # Another boot (or no boot id): the wall clock, ignoring an expiry so far
        # ahead that only a backwards clock jump explains it.
        expired = now_wall > wall_exp or wall_exp > now_wall + lease_timeout + CLOCK_JUMP_MARGIN
    return expired or holder_gone(boot, pidns, pid, pstart, seen)
