"""A raw page reader for damaged SQLite files: B-tree pages read straight from the bytes,
with the committed frames of the -wal laid over them (checksums verified)."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .probe import SQLITE_MAGIC, WAL_MAGICS, header_page_size, u16, u32

__all__ = ["RawPages", "decode_record"]


def _varint(b: bytes, i: int) -> tuple[int, int]:
    value = 0
    for k in range(8):
        byte = b[i + k]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, i + k + 1
    return (value << 8) | b[i + 8], i + 9


def _wal_checksum(data: bytes, s0: int, s1: int, big: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big else '<'}{len(data) // 4}I", data)
    for k in range(0, len(words), 2):
        s0 = (s0 + words[k] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[k + 1] + s0) & 0xFFFFFFFF
    return s0, s1


class RawPages:
    """Pages of a damaged database read straight from its bytes, with the committed frames
    of its -wal laid over them (checksums verified), for when SQLite cannot read the file."""

    def __init__(self, path: Path, *, use_wal: bool) -> None:
        self._main = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._size = os.fstat(self._main.fileno()).st_size
        self._wal: Any = None
        self.frames: dict[int, int] = {}
        header = self._main.read(100)
        self.page_size = header_page_size(header) if header[:16] == SQLITE_MAGIC else 0
        if use_wal:
            self._read_wal(Path(f"{path}-wal"))
        if not self.page_size:
            self.page_size = self._guess_page_size()
        self.usable = self.page_size  # files of this module reserve no bytes per page

    def close(self) -> None:
        self._main.close()
        if self._wal is not None:
            self._wal.close()

    def _guess_page_size(self) -> int:
        for size in (4096, 1024, 2048, 8192, 16384, 32768, 65536, 512):
            self.page_size = size
            first, second = self.page(1), self.page(2)
            if first and second and first[100] in (5, 13) and second[0] in (2, 5, 10, 13):
                return size
        return 4096

    def _read_wal(self, wal_path: Path) -> None:
        try:
            wal = open(wal_path, "rb")  # noqa: SIM115 - kept open while pages are read
        except OSError:
            return
        header = wal.read(32)
        if len(header) < 32 or u32(header, 0) not in WAL_MAGICS:
            wal.close()
            return
        big = bool(u32(header, 0) & 1)
        page_size = u32(header, 8)
        if self.page_size and page_size != self.page_size:
            wal.close()
            return
        if not (512 <= page_size <= 65536 and page_size & (page_size - 1) == 0):
            wal.close()
            return
        s0, s1 = _wal_checksum(header[:24], 0, 0, big)
        if (s0, s1) != (u32(header, 24), u32(header, 28)):
            wal.close()
            return
        salts = header[16:24]
        pending: dict[int, int] = {}
        offset = 32
        while True:
            frame = wal.read(24 + page_size)
            if len(frame) < 24 + page_size or frame[8:16] != salts:
                break
            s0, s1 = _wal_checksum(frame[:8], s0, s1, big)
            s0, s1 = _wal_checksum(frame[24:], s0, s1, big)
            if (s0, s1) != (u32(frame, 16), u32(frame, 20)):
                break
            pending[u32(frame, 0)] = offset + 24
            if u32(frame, 4):  # a commit frame: everything up to here is committed
                self.frames.update(pending)
                pending = {}
            offset += 24 + page_size
        if self.frames:
            self._wal = wal
            self.page_size = page_size
        else:
            wal.close()

    def page(self, number: int) -> bytes | None:
        size = self.page_size
        if number < 1:
            return None
        offset = self.frames.get(number)
        if offset is not None:
            self._wal.seek(offset)
            data: bytes = self._wal.read(size)
        else:
            start = (number - 1) * size
            if start + size > self._size:
                return None
            self._main.seek(start)
            data = self._main.read(size)
        return data if len(data) == size else None

    def _payload(self, page: bytes, i: int, total: int, index: bool) -> bytes | None:
        usable = self.usable
        most = usable - 35 if not index else (usable - 12) * 64 // 255 - 23
        if total <= most:
            end = i + total
            return page[i:end] if end <= usable else None
        least = (usable - 12) * 32 // 255 - 23
        local = least + (total - least) % (usable - 4)
        if local > most:
            local = least
        if i + local + 4 > usable:
            return None
        out = bytearray(page[i : i + local])
        nxt = u32(page, i + local)
        seen: set[int] = set()
        while len(out) < total:
            if nxt in seen:
                return None
            seen.add(nxt)
            overflow = self.page(nxt)
            if overflow is None:
                return None
            nxt = u32(overflow, 0)
            out += overflow[4:usable]
        return bytes(out[:total])

    @property
    def page_count(self) -> int:
        in_main = self._size // self.page_size if self.page_size else 0
        return max([in_main, *self.frames])

    def freelist(self) -> set[int]:
        """The free pages (trunks and leaves) named by page 1's header, as far as readable."""
        first = self.page(1)
        free: set[int] = set()
        if first is None or first[:16] != SQLITE_MAGIC:
            return free
        trunk = u32(first, 32)
        while trunk and trunk not in free and len(free) <= self.page_count:
            free.add(trunk)
            page = self.page(trunk)
            if page is None:
                break
            count = u32(page, 4)
            if 8 + 4 * count > self.usable:
                break
            free.update(u32(page, 8 + 4 * k) for k in range(count))
            trunk = u32(page, 0)
        return free

    def cells(self, number: int) -> tuple[list[int], list[tuple[int | None, bytes | None]]]:
        """The child pages and the ``(rowid, payload)`` cells of one b-tree page.

        ``rowid`` is None in index (and WITHOUT ROWID) trees; a cell that cannot be read is
        ``(None, None)``. A page that is not a b-tree page gives ``([], [(None, None)])``.
        """
        page = self.page(number)
        base = 100 if number == 1 else 0
        if page is None or page[base] not in (2, 5, 10, 13):
            return [], [(None, None)]
        kind = page[base]
        interior, index = kind in (2, 5), kind in (2, 10)
        ncells = u16(page, base + 3)
        pointers = base + (12 if interior else 8)
        if pointers + 2 * ncells > self.usable:
            return [], [(None, None)]
        children: list[int] = []
        out: list[tuple[int | None, bytes | None]] = []
        for k in range(ncells):
            at = u16(page, pointers + 2 * k)
            rowid: int | None = None
            try:
                if at < pointers or at >= self.usable:
                    raise IndexError(at)
                if interior:
                    children.append(u32(page, at))
                    if kind == 5:
                        continue  # table interior cells hold only keys
                    at += 4
                total, at = _varint(page, at)
                if not index:
                    rowid, at = _varint(page, at)
                payload = self._payload(page, at, total, index)
            except IndexError:
                payload = None
            out.append((rowid, payload) if payload is not None else (None, None))
        if interior:
            children.append(u32(page, base + 8))
        return children, out

    def walk(
        self, root: int, deadline: float, visited: set[int] | None = None
    ) -> Iterator[tuple[int | None, bytes | None]]:
        """``(rowid, payload)`` of every cell reachable from ``root``; ``(None, None)`` for
        each page or cell that could not be read (the walk goes on past it). The b-tree
        pages reached are added to ``visited``."""
        stack = [root]
        seen: set[int] = set() if visited is None else visited
        while stack:
            if time.monotonic() > deadline:
                yield None, None
                return
            number = stack.pop()
            if number in seen or number < 1:
                continue
            seen.add(number)
            children, cells = self.cells(number)
            yield from cells
            stack.extend(reversed(children))


def decode_record(payload: bytes) -> list[Any] | None:
    """The column values of one SQLite record, or None when it does not parse."""
    try:
        header_len, i = _varint(payload, 0)
        types = []
        while i < header_len:
            serial, i = _varint(payload, i)
            types.append(serial)
        pos = header_len
        values: list[Any] = []
        for serial in types:
            if serial == 0:
                values.append(None)
            elif serial <= 6:
                width = (0, 1, 2, 3, 4, 6, 8)[serial]
                if pos + width > len(payload):
                    return None
                values.append(int.from_bytes(payload[pos : pos + width], "big", signed=True))
                pos += width
            elif serial == 7:
                if pos + 8 > len(payload):
                    return None
                values.append(struct.unpack(">d", payload[pos : pos + 8])[0])
                pos += 8
            elif serial in (8, 9):
                values.append(serial - 8)
            elif serial >= 12:
                width = (serial - 12) // 2
                if pos + width > len(payload):
                    return None
                chunk = payload[pos : pos + width]
                values.append(bytes(chunk) if serial % 2 == 0 else chunk.decode("utf-8"))
                pos += width
            else:
                return None
        return values
    except (IndexError, UnicodeDecodeError, struct.error):
        return None


# ------------------------------------------------------------------ salvage
