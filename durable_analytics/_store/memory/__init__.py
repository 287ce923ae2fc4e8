"""The in-memory reference backend: the ``QueueBackend`` contract with nothing on disk.

Selected by ``queue_path=":memory:"``; see ``queue.py``.
"""

from __future__ import annotations

from .queue import MEMORY_PATH, MemoryQueue

__all__ = ["MEMORY_PATH", "MemoryQueue"]
